"""Training blends and per-domain evaluation sets through Megatron's dataset builder."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tests.data.btx_data_testlib import DataCfg, preprocess_texts, train_tiny_tokenizer

from btx_megatron.data import (
    build_domain_eval_datasets,
    build_pretraining_datasets,
    build_tokenizer,
    check_vocab_fits,
    parse_blend,
)
from btx_megatron.data.math_problems import math_document

SEQ = 32

# Two sources with disjoint characters, so their token sets are disjoint (bar EOD and the space).
DIGIT_TEXTS = [" ".join(str((7 * i + j) % 1000) for j in range(40)) for i in range(60)]
LETTER_TEXTS = [" ".join("abcdefghij"[(i + j) % 10] * (1 + (i * j) % 4) for j in range(60)) for i in range(60)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    model = train_tiny_tokenizer(str(root / "tok"))
    tokenizer = build_tokenizer("SentencePieceTokenizer", model)
    digits, _ = preprocess_texts(str(root), "digits", DIGIT_TEXTS, model)
    letters, _ = preprocess_texts(str(root), "letters", LETTER_TEXTS, model)
    math, _ = preprocess_texts(str(root), "math", [math_document(5, i) for i in range(80)], model)
    return {"root": root, "model": model, "tokenizer": tokenizer, "digits": digits, "letters": letters, "math": math}


def _token_set(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return set(np.concatenate([dataset[i] for i in range(len(dataset))]).tolist())


def _cfg(env, **kw):
    kw.setdefault("data_cache_path", str(env["root"] / "cache"))
    return DataCfg(tokenizer_model=env["model"], **kw)


def test_items_are_tensors_of_the_right_shape(env):
    train, valid, test = build_pretraining_datasets(_cfg(env, data_path=[env["math"]], split="90,10,0"), env["tokenizer"],
                                                    seq_length=SEQ, seed=1, num_samples=(40, 8, 0))
    assert test is None and len(train) >= 40 and len(valid) >= 8
    item = train[0]
    assert item["tokens"].shape == (SEQ,) and item["tokens"].dtype == torch.int64
    assert item["labels"].dtype == torch.int64 and item["position_ids"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])  # labels are the next tokens
    assert item.get("attention_mask") is None  # causal masking is the model's job


def test_blend_weights_seed_and_resume(env):
    tok = env["tokenizer"]
    cfg = _cfg(env, data_path=["0.25", env["digits"], "0.75", env["letters"]], split="100,0,0")
    n = 400
    train, _, _ = build_pretraining_datasets(cfg, tok, seq_length=SEQ, seed=1234, num_samples=(n, 0, 0))
    counts = np.bincount(train.dataset_index[:n], minlength=2)
    assert abs(counts[0] / n - 0.25) < 0.02 and abs(counts[1] / n - 0.75) < 0.02

    # Each sample comes from the prefix the blend index says (disjoint token sets).
    digit_only = _token_set(env["digits"]) - _token_set(env["letters"])
    for k in range(0, n, 37):
        tokens = set(train[k]["tokens"].tolist())
        assert bool(tokens & digit_only) == (train.dataset_index[k] == 0)

    # Same seed: same order, even from a fresh cache (a resumed job re-building its datasets
    # reads item k exactly where the consumed-samples counter points).
    fresh_cfg = _cfg(env, data_path=cfg.data_path, split=cfg.split, data_cache_path=str(env["root"] / "cache_fresh"))
    again, _, _ = build_pretraining_datasets(fresh_cfg, tok, seq_length=SEQ, seed=1234, num_samples=(n, 0, 0))
    consumed = 137
    for k in range(consumed, consumed + 20):
        assert torch.equal(again[k]["tokens"], train[k]["tokens"])
    # A different seed gives a different order.
    other, _, _ = build_pretraining_datasets(cfg, tok, seq_length=SEQ, seed=99, num_samples=(n, 0, 0))
    assert any(not torch.equal(other[k]["tokens"], train[k]["tokens"]) for k in range(20))


def test_domain_eval_sets_hold_only_their_domain(env):
    tok = env["tokenizer"]
    cfg = _cfg(env, eval_domains={"letters": [env["letters"]], "digits": [env["digits"]]})
    sets = build_domain_eval_datasets(cfg, tok, seq_length=SEQ, seed=1, num_samples=None)
    assert list(sets) == ["digits", "letters"]
    token_sets = {name: _token_set(env[name]) for name in sets}
    for name, dataset in sets.items():
        other = "letters" if name == "digits" else "digits"
        only_other = token_sets[other] - token_sets[name]
        seen = set()
        for k in range(len(dataset)):
            seen |= set(dataset[k]["tokens"].tolist())
        assert seen <= token_sets[name] and not seen & only_other
        # num_samples None: one pass over the whole prefix (no train/test carve-out).
        assert len(dataset) == (len(_all_tokens(env[name])) - 1) // SEQ


def _all_tokens(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return np.concatenate([dataset[i] for i in range(len(dataset))])


def test_mock_data_with_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", None, vocab_size=128)
    assert tok.vocab_size == 128
    train, valid, _ = build_pretraining_datasets(DataCfg(mock_data=True, tokenizer_type="NullTokenizer", vocab_size=128), tok,
                                                 seq_length=SEQ, seed=1, num_samples=(10, 2, 0))
    assert len(train) >= 10 and train[0]["tokens"].shape == (SEQ,) and int(train[0]["tokens"].max()) < 128


def test_user_mistakes_raise_clear_errors(env, tmp_path):
    tok = env["tokenizer"]
    with pytest.raises(ValueError, match="--vocab-size is 100"):
        check_vocab_fits(tok, 100)
    check_vocab_fits(tok, tok.vocab_size)

    # .bin without .idx
    shutil.copy(env["digits"] + ".bin", tmp_path / "half.bin")
    with pytest.raises(ValueError, match=r"half' is missing .*half.idx.*run tools/preprocess_data.py"):
        build_pretraining_datasets(_cfg(env, data_path=[str(tmp_path / "half")]), tok, seq_length=SEQ, seed=1, num_samples=(4, 0, 0))

    with pytest.raises(ValueError, match="blend weight 'heavy' .* is not a number"):
        build_pretraining_datasets(_cfg(env, data_path=["heavy", env["digits"], "0.5", env["letters"]]), tok,
                                   seq_length=SEQ, seed=1, num_samples=(4, 0, 0))
    with pytest.raises(ValueError, match="--eval-domain math: blend weight"):
        build_domain_eval_datasets(_cfg(env, eval_domains={"math": ["x", env["math"], "1", env["digits"]]}), tok,
                                   seq_length=SEQ, seed=1, num_samples=4)
    with pytest.raises(ValueError, match="pairs"):
        parse_blend(["0.5", env["digits"], "0.5"])
    with pytest.raises(ValueError, match=">= 0"):
        parse_blend(["-1", env["digits"]])
    assert parse_blend([env["digits"], env["letters"]]).weights is None  # size-weighted, as Megatron
    assert parse_blend("0.3 a 0.7 b").weights == [0.3, 0.7]

    # A dataset made with another tokenizer.
    other_model = train_tiny_tokenizer(str(tmp_path / "other_tok"), vocab_size=500)
    other = build_tokenizer("SentencePieceTokenizer", other_model)
    with pytest.raises(ValueError, match=r"made with another tokenizer .*sha256.*re-run tools/preprocess_data.py"):
        build_pretraining_datasets(_cfg(env, data_path=[env["digits"]]), other, seq_length=SEQ, seed=1, num_samples=(4, 0, 0))

    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2'"):
        build_tokenizer("GPT2", None)
    with pytest.raises(ValueError, match="needs a positive --vocab-size"):
        build_tokenizer("NullTokenizer", None)
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="could not be loaded as a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", str(bad))


def _rank_main(rank, world_size, init_file, env, cache, out):
    """One rank: gloo group, then every rank builds the same blend and eval set and dumps items."""
    import torch.distributed as dist

    if "tokenizer" not in env:  # spawned: rebuild the tokenizer from its model file
        from btx_megatron.data import build_tokenizer

        env = {**env, "tokenizer": build_tokenizer("SentencePieceTokenizer", env["model"])}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    cfg = DataCfg(data_path=["0.5", env["digits"], "0.5", env["letters"]], split="90,10,0", data_cache_path=cache,
                  eval_domains={"digits": [env["digits"]]}, tokenizer_model=env["model"])
    train, valid, _ = build_pretraining_datasets(cfg, env["tokenizer"], seq_length=SEQ, seed=7, num_samples=(64, 8, 0))
    evals = build_domain_eval_datasets(cfg, env["tokenizer"], seq_length=SEQ, seed=7, num_samples=None)
    result = {
        "train": [train[k]["tokens"].tolist() for k in range(0, 64, 9)],
        "valid": [valid[k]["tokens"].tolist() for k in range(4)],
        "eval": [evals["digits"][k]["tokens"].tolist() for k in range(len(evals["digits"]))],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_starting_together_build_the_cache_once_and_agree(env, tmp_path):
    """Three gloo ranks on an empty cache directory."""
    import multiprocessing

    cache, out = tmp_path / "shared_cache", tmp_path / "out"
    out.mkdir()
    world_size = 3
    # spawn, not fork: the test process may already hold torch threads and process groups.
    context = multiprocessing.get_context("spawn")
    child_env = {k: v for k, v in env.items() if k != "tokenizer"}
    procs = [context.Process(target=_rank_main, args=(r, world_size, str(tmp_path / "init"), child_env, str(cache), str(out)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * world_size
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert results[0] == results[1] == results[2]
    # A single-process build from that cache gives the same samples.
    cfg = DataCfg(data_path=["0.5", env["digits"], "0.5", env["letters"]], split="90,10,0", data_cache_path=str(cache),
                  tokenizer_model=env["model"])
    train, _, _ = build_pretraining_datasets(cfg, env["tokenizer"], seq_length=SEQ, seed=7, num_samples=(64, 8, 0))
    assert [train[k]["tokens"].tolist() for k in range(0, 64, 9)] == results[0]["train"]


def test_works_with_the_projects_data_config(env):
    """The trainer passes btx_megatron.config.DataConfig; the stand-in must not hide a mismatch."""
    try:
        from btx_megatron.config.schema import DataConfig
    except ImportError:
        pytest.skip("btx_megatron.config is not available")
    cfg = DataConfig(data_path=[env["math"]], split="90,10,0", eval_domains={"math": [env["math"]]},
                     tokenizer_type="SentencePieceTokenizer", tokenizer_model=env["model"],
                     data_cache_path=str(env["root"] / "cache"))
    train, valid, _ = build_pretraining_datasets(cfg, env["tokenizer"], seq_length=SEQ, seed=1, num_samples=(8, 2, 0))
    evals = build_domain_eval_datasets(cfg, env["tokenizer"], seq_length=SEQ, seed=1, num_samples=4)
    assert len(train) >= 8 and len(evals["math"]) >= 4


def test_small_prefix_with_the_default_split(env):
    """969,30,1 on 60 documents leaves test empty. Megatron alone would loop forever building it;
    here it is None (with a warning when samples were asked for), and an empty train is an error."""
    cfg = _cfg(env, data_path=[env["digits"]], split="969,30,1")
    train, valid, test = build_pretraining_datasets(cfg, env["tokenizer"], seq_length=SEQ, seed=1, num_samples=(16, 2, 0))
    assert test is None and len(train) >= 16 and len(valid) >= 2
    with pytest.warns(UserWarning, match=r"leaves the test split of .*digits.* \(60 documents\) empty"):
        _, _, test = build_pretraining_datasets(cfg, env["tokenizer"], seq_length=SEQ, seed=1, num_samples=(16, 2, 2))
    assert test is None
    with pytest.raises(ValueError, match="leaves the train split .* empty"):
        build_pretraining_datasets(_cfg(env, data_path=[env["digits"]], split="1,999,0"), env["tokenizer"],
                                   seq_length=SEQ, seed=1, num_samples=(16, 2, 0))


def test_prefix_remade_in_place_does_not_reuse_stale_indices(env, tmp_path):
    """Megatron keys cached indices on the path; re-making a prefix in place (another tokenizer,
    other documents) must not cut samples of the new file at the old offsets."""
    tok = env["tokenizer"]
    prefix, _ = preprocess_texts(str(tmp_path), "remade", DIGIT_TEXTS[:30], env["model"])
    cfg = DataCfg(data_path=[prefix], split="100,0,0", tokenizer_model=env["model"])  # default cache dir
    first, _, _ = build_pretraining_datasets(cfg, tok, seq_length=SEQ, seed=3, num_samples=(24, 0, 0))
    first_samples = [first[k]["tokens"].tolist() for k in range(24)]

    preprocess_texts(str(tmp_path), "remade", LETTER_TEXTS[:45], env["model"])  # same prefix, new contents
    again, _, _ = build_pretraining_datasets(cfg, tok, seq_length=SEQ, seed=3, num_samples=(24, 0, 0))
    fresh_cfg = DataCfg(data_path=[prefix], split="100,0,0", tokenizer_model=env["model"],
                        data_cache_path=str(tmp_path / "fresh_cache"))
    fresh, _, _ = build_pretraining_datasets(fresh_cfg, tok, seq_length=SEQ, seed=3, num_samples=(24, 0, 0))
    again_samples = [again[k]["tokens"].tolist() for k in range(24)]
    assert again_samples == [fresh[k]["tokens"].tolist() for k in range(24)]
    assert again_samples != first_samples
    letters_only = _token_set(env["letters"]) - _token_set(env["digits"])
    assert all(set(s) & letters_only for s in again_samples)
