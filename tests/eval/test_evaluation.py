"""evaluate_checkpoint and evaluate_btm against a direct computation from the models' logits.

One worker process builds three tiny checkpoints (two dense, one 4-expert top-2 MoE, 2 steps on
random tokens each), evaluates them on the built-in corpora's held-out splits, and recomputes
every figure by hand: the model built straight from the manifest, one sequence at a time,
``-log_softmax(logits)[label]`` in float64, masked sum / token count. The BTM checks use the
three checkpoints as the math, code and wiki branches (the MoE stands in as a branch: BTM only
needs each branch's probability of the target) with the real training splits as profiles.
"""

from __future__ import annotations

import json
import math

from tests.tools import load_tool
import pytest

from tests.dist_utils import run_distributed

BRANCHES = {"math": "dense_a", "code": "dense_b", "wiki": "moe"}


def _hand_losses(path: str, corpora: str, num_samples: int) -> dict:
    """Per-token NLL [n, s] float64 and mask per domain, straight from the logits."""
    import torch
    import torch.nn.functional as F

    from btx_megatron import checkpoint as fmt
    from btx_megatron.config import Config
    from btx_megatron.data import build_domain_eval_datasets, build_tokenizer
    from btx_megatron.models import build_model_chunks, transformer_config
    from btx_megatron.training.checkpointing import load_model_weights
    from tests.eval.eval_helpers import domain_prefixes, tokenizer_flags

    manifest = fmt.read_manifest(fmt.resolve(path)[0])
    tok = tokenizer_flags(corpora)
    cfg = Config.from_dict({"model": manifest["model"], "train": {"seed": 1234},
                            "data": {"eval_domains": domain_prefixes(corpora), **tok}})
    model = build_model_chunks(cfg, transformer_config(cfg))[0]
    load_model_weights([model], path)
    model.eval()
    tokenizer = build_tokenizer(tok["tokenizer_type"], tok["tokenizer_model"], cfg.model.vocab_size)
    datasets = build_domain_eval_datasets(cfg.data, tokenizer, seq_length=cfg.model.seq_length, seed=1234, num_samples=None)
    out = {}
    with torch.no_grad():
        for name, ds in datasets.items():
            nll, mask = [], []
            for i in range(num_samples):
                item = ds[i]
                tokens = torch.as_tensor(item["tokens"])[None]
                logits = model(tokens, torch.as_tensor(item["position_ids"])[None], None)
                logp = F.log_softmax(logits.double(), dim=-1)[0]
                labels = torch.as_tensor(item["labels"])
                nll.append(-logp.gather(-1, labels[:, None])[:, 0])
                mask.append(torch.as_tensor(item["loss_mask"]).double())
            out[name] = {"nll": torch.stack(nll), "mask": torch.stack(mask), "len": len(ds)}
    return out


def _worker(corpora: str, work: str) -> dict:
    import sys
    from pathlib import Path

    from btx_megatron.eval.btm import BTMOptions, evaluate_btm
    from btx_megatron.eval.perplexity import evaluate_checkpoint
    from tests.eval.eval_helpers import domain_prefixes, make_checkpoints, tokenizer_flags

    ckpts = make_checkpoints(work, {
        "dense_a": ["--seed", "3"], "dense_b": ["--seed", "4"],
        "moe": ["--seed", "5", "--num-experts", "4", "--moe-router-topk", "2"],
    })
    tok, valid = tokenizer_flags(corpora), domain_prefixes(corpora)
    res: dict = {"eval": {}, "hand": {}}
    for name, path in ckpts.items():
        # micro batch 3 does not divide the sample count: the padded last batch must not count.
        res["eval"][name] = evaluate_checkpoint(path, valid, micro_batch_size=3, progress=False, **tok)
        n = res["eval"][name]["num_samples"]
        res["hand"][name] = _hand_losses(path, corpora, n)
    branches = {b: ckpts[c] for b, c in BRANCHES.items()}
    train = domain_prefixes(corpora, "train")
    res["btm_k1"] = evaluate_btm(branches, train, valid, btm=BTMOptions(topk=1, context="prefix"), progress=False, **tok)
    res["btm_uniform"] = evaluate_btm(branches, train, valid, btm=BTMOptions(topk=3, weighting="uniform"),
                                      progress=False, **tok)
    res["btm_causal"] = evaluate_btm(branches, train, valid, btm=BTMOptions(topk=2), progress=False, **tok)
    # Forced routing: a merge of dense_a and dense_b whose shared weights are all dense_a's
    # (--weights a=1,b=0) routed wholly to expert "a" is dense_a, token for token.
    import os
    import subprocess

    merged = Path(work) / "merged_ab"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "tools" / "merge_branches.py"),
                    "--branch", f"a={ckpts['dense_a']}", "--branch", f"b={ckpts['dense_b']}", "--weights", "a=1,b=0",
                    "--output", str(merged), "--quiet"], check=True, capture_output=True,
                   env={k: v for k, v in os.environ.items()  # its own world, not this worker's
                        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    res["forced_a"] = evaluate_checkpoint(str(merged), valid, force_expert={"*": "a"}, progress=False, **tok)
    res["forced_mixed"] = evaluate_checkpoint(str(merged), valid, force_expert={"math": "a", "code": "b"},
                                              progress=False, **tok)
    res["unforced"] = evaluate_checkpoint(str(merged), valid, progress=False, **tok)
    res["dense_a_default"] = evaluate_checkpoint(ckpts["dense_a"], valid, progress=False, **tok)
    try:
        evaluate_checkpoint(str(merged), valid, force_expert={"*": "nope"}, progress=False, **tok)
    except ValueError as exc:
        res["bad_expert"] = str(exc)
    # The command line on the dense checkpoint.
    cli = load_tool("evaluate")

    out = Path(work) / "cli.json"
    argv = ["--load", ckpts["dense_a"], "--output", str(out), "--micro-batch-size", "3",
            "--tokenizer-type", tok["tokenizer_type"], "--tokenizer-model", tok["tokenizer_model"]]
    for d, prefixes in valid.items():
        argv += ["--eval-domain", f"{d}={prefixes[0]}"]
    res["cli_rc"] = cli.main(argv)
    res["cli"] = json.loads(out.read_text())
    return res


@pytest.fixture(scope="module")
def results(corpora, tmp_path_factory):
    return run_distributed(_worker, 1, corpora, str(tmp_path_factory.mktemp("eval_ckpts")))[0]


def _hand_mean(hand: dict) -> float:
    return float((hand["nll"] * hand["mask"]).sum() / hand["mask"].sum())


@pytest.mark.parametrize("model", ["dense_a", "moe"])
def test_evaluate_equals_direct_logits_computation(results, model):
    ev, hand = results["eval"][model], results["hand"][model]
    n = ev["num_samples"]
    # Default sample count: the smallest domain's one pass, the same for every domain.
    assert n == min(h["len"] for h in hand.values())
    assert ev["kind"] == ("moe" if model == "moe" else "dense")
    for domain, r in ev["domains"].items():
        assert r["samples"] == n and r["tokens"] == int(hand[domain]["mask"].sum())
        assert r["loss"] == pytest.approx(_hand_mean(hand[domain]), abs=2e-6, rel=0)
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert ev["average_loss"] == pytest.approx(sum(r["loss"] for r in ev["domains"].values()) / 3)


def test_forced_routing_to_an_expert_is_that_expert_s_dense_model(results):
    want = results["dense_a_default"]["domains"]
    forced = results["forced_a"]
    assert forced["forced_experts"] == {d: "a" for d in want}
    for d in want:
        assert forced["domains"][d]["loss"] == pytest.approx(want[d]["loss"], abs=2e-5, rel=0), d
    # Per-domain forcing: math -> a (= dense_a), code -> b (b's FFN on a's trunk: not dense_a),
    # wiki unforced (the router's choice, as in the unforced run).
    mixed, unforced = results["forced_mixed"], results["unforced"]
    assert mixed["forced_experts"] == {"math": "a", "code": "b"}
    assert mixed["domains"]["math"]["loss"] == pytest.approx(want["math"]["loss"], abs=2e-5, rel=0)
    assert abs(mixed["domains"]["code"]["loss"] - want["code"]["loss"]) > 1e-3
    assert mixed["domains"]["wiki"]["loss"] == pytest.approx(unforced["domains"]["wiki"]["loss"], abs=1e-6, rel=0)
    assert abs(unforced["domains"]["math"]["loss"] - want["math"]["loss"]) > 1e-4  # forcing did something
    assert "nope" in results["bad_expert"] and "['a', 'b']" in results["bad_expert"]


def test_models_differ(results):
    """Guards the equalities above against comparing a model with itself."""
    a, b = results["eval"]["dense_a"]["domains"], results["eval"]["moe"]["domains"]
    assert all(abs(a[d]["loss"] - b[d]["loss"]) > 1e-4 for d in a)


def test_btm_k1_prefix_picks_the_domain_branch_and_equals_its_loss(results):
    r = results["btm_k1"]
    sel = r["selection"]["math"]["top1_fraction"]
    assert sel["math"] == 1.0, sel  # every math sequence's prefix is closest to the math profile
    # One branch with weight 1: the mixture is that branch's loss, bit for bit.
    assert r["domains"]["math"]["loss"] == r["branches"]["math"]["math"]["loss"]
    assert r["branches"]["math"]["math"]["loss"] == results["eval"]["dense_a"]["domains"]["math"]["loss"]
    assert r["branches"]["wiki"]["code"]["loss"] == results["eval"]["moe"]["domains"]["code"]["loss"]


def test_btm_uniform_k_equals_log_mean_probability(results):
    import torch

    r = results["btm_uniform"]
    for domain, figures in r["domains"].items():
        nll = torch.stack([results["hand"][c][domain]["nll"] for c in BRANCHES.values()])
        mask = results["hand"]["dense_a"][domain]["mask"]
        expected = -torch.log(torch.exp(-nll).mean(0))
        assert figures["loss"] == pytest.approx(float((expected * mask).sum() / mask.sum()), abs=2e-6, rel=0)
        assert all(w == pytest.approx(1 / 3) for w in r["selection"][domain]["mean_weight"].values())
        # Jensen: -log(mean p) <= mean(-log p) per token, so never worse than the branches' mean.
        assert figures["loss"] <= sum(_hand_mean({"nll": n, "mask": mask}) for n in nll) / len(nll)


def test_btm_default_runs_on_every_domain(results):
    """Default options (causal context, top-2, softmax): finite figures on the common sequences."""
    import math

    r = results["btm_causal"]
    assert set(r["domains"]) == {"math", "code", "wiki"} and r["num_samples"] == results["eval"]["moe"]["num_samples"]
    for domain, figures in r["domains"].items():
        assert math.isfinite(figures["loss"]) and figures["tokens"] == results["eval"]["moe"]["domains"][domain]["tokens"]
        assert sum(r["selection"][domain]["mean_weight"].values()) == pytest.approx(1.0)
    # Routing follows the text: math tokens mostly go to the math branch.
    assert r["selection"]["math"]["top1_fraction"]["math"] > 0.9


def test_cli_writes_the_same_figures(results):
    assert results["cli_rc"] == 0
    assert results["cli"]["domains"] == results["eval"]["dense_a"]["domains"]
