"""tools/preprocess_data.py: round trip, determinism, bad input, atomicity."""

import io
import json
import os
import signal
import time

from tests.tools import load_tool
import pytest

from tests.data.btx_data_testlib import ROUND_TRIP_TEXTS, preprocess_texts, train_tiny_tokenizer, write_jsonl

from btx_megatron.data import build_tokenizer
from btx_megatron.data.preprocess import PreprocessConfig, preprocess


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_round_trip_jsonl_and_txt(tmp_path, tokenizer_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    prefix, result = preprocess_texts(str(tmp_path), "rt", ROUND_TRIP_TEXTS, tokenizer_model)
    assert result.num_documents == len(ROUND_TRIP_TEXTS) and result.num_skipped == 0
    documents = _read_documents(prefix)
    assert len(documents) == len(ROUND_TRIP_TEXTS)
    for ids, text in zip(documents, ROUND_TRIP_TEXTS):
        assert ids[-1] == tokenizer.eod  # --append-eod
        assert tokenizer.detokenize(ids[:-1]) == text
    assert result.num_tokens == sum(len(d) for d in documents)

    # Plain text: one document per file, no EOD without --append-eod.
    txt = tmp_path / "doc.txt"
    txt.write_text(ROUND_TRIP_TEXTS[1], encoding="utf-8")
    preprocess(PreprocessConfig(input=[str(txt)], output_prefix=str(tmp_path / "txt"), tokenizer_type="SentencePieceTokenizer",
                                tokenizer_model=tokenizer_model, log_interval=0))
    (ids,) = _read_documents(str(tmp_path / "txt"))
    assert tokenizer.detokenize(ids) == ROUND_TRIP_TEXTS[1]

    meta = json.loads((tmp_path / "rt.meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == tokenizer.vocab_size and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["num_documents"] == len(ROUND_TRIP_TEXTS)


def test_output_is_identical_for_1_and_2_workers(tmp_path, tokenizer_model):
    from btx_megatron.data.math_problems import math_document

    texts = [math_document(3, i) for i in range(150)] + ROUND_TRIP_TEXTS
    outputs = []
    for workers in (1, 2):
        prefix, result = preprocess_texts(str(tmp_path), f"w{workers}", texts, tokenizer_model, workers=workers, chunksize=4)
        outputs.append(tuple((open(prefix + s, "rb").read()) for s in (".bin", ".idx")))
        assert result.num_documents == len(texts)
    assert outputs[0] == outputs[1]


def test_bad_records_are_skipped_counted_and_reported(tmp_path, tokenizer_model):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b"{not json\n")
        f.write(b'{"body": "no text key"}\n')
        f.write(b'["a", "list"]\n')
        f.write(b'{"text": 42}\n')
        f.write(b'{"text": "bad \xff\xfe bytes"}\n')
        f.write(b"\n")  # blank lines are not records
        f.write(b'{"text": ""}\n')  # empty document: skipped, counted separately
        f.write(b'{"text": "good two"}\n')
    log = io.StringIO()
    cfg = PreprocessConfig(input=[str(path)], output_prefix=str(tmp_path / "out"), tokenizer_type="SentencePieceTokenizer",
                           tokenizer_model=tokenizer_model, log_interval=0)
    result = preprocess(cfg, log_stream=log)
    assert result.num_documents == 2
    assert result.skipped == {"invalid_json": 1, "invalid_utf8": 1, "missing_key": 1, "non_string_value": 1, "not_an_object": 1}
    assert result.num_empty == 1
    text = log.getvalue()
    assert "skipped 5 bad records" in text and f"{path}:2: not valid JSON" in text and "no key 'text'" in text
    assert len(_read_documents(str(tmp_path / "out"))) == 2

    cfg.strict = True
    cfg.output_prefix = str(tmp_path / "strict")
    with pytest.raises(ValueError, match=r"--strict.*bad.jsonl:2: not valid JSON"):
        preprocess(cfg, log_stream=io.StringIO())
    assert not any(p.name.startswith("strict") for p in tmp_path.iterdir())


def test_missing_empty_and_unusable_inputs(tmp_path, tokenizer_model):
    def run(inputs, **kw):
        return preprocess(PreprocessConfig(input=inputs, output_prefix=str(tmp_path / "o"), tokenizer_type="SentencePieceTokenizer",
                                           tokenizer_model=tokenizer_model, log_interval=0, **kw), log_stream=io.StringIO())

    with pytest.raises(ValueError, match="does not exist"):
        run([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="matches no files"):
        run([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        run([str(tmp_path / "empty.jsonl")])
    write_jsonl(str(tmp_path / "other.jsonl"), ["a", "b"], key="body")
    with pytest.raises(ValueError, match="no documents.*--json-keys"):
        run([str(tmp_path / "other.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        run([str(tmp_path / "x.csv")])
    with pytest.raises(ValueError, match="--tokenizer-model .*missing.model.* is not a file"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.idx").exists()


def test_interrupted_run_leaves_no_dataset_and_keeps_the_old_one(tmp_path, tokenizer_model, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix, _ = preprocess_texts(str(tmp_path), "ds", ["old dataset"], tokenizer_model)
    old = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()

    calls = {"n": 0}
    original = IndexedDatasetBuilder.add_document

    def failing_add_document(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", failing_add_document)
    with pytest.raises(KeyboardInterrupt):
        preprocess_texts(str(tmp_path), "ds", ROUND_TRIP_TEXTS, tokenizer_model)
    assert (open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx", "ds.jsonl", "ds.meta.json"]


def test_killed_process_leaves_no_pair(tmp_path, tokenizer_model):
    """SIGKILL mid-write (no cleanup code runs): no .bin/.idx pair appears."""
    from btx_megatron.data import validate_prefix
    from btx_megatron.data.math_problems import math_document

    jsonl = write_jsonl(str(tmp_path / "big.jsonl"), [math_document(1, i) for i in range(3000)])
    prefix = str(tmp_path / "killed")
    log_path = tmp_path / "progress.log"
    pid = os.fork()  # the child inherits the imports, so this costs no interpreter start-up
    if pid == 0:
        try:
            with open(log_path, "w") as log:
                preprocess(PreprocessConfig(input=[jsonl], output_prefix=prefix, tokenizer_type="SentencePieceTokenizer",
                                            tokenizer_model=tokenizer_model, append_eod=True, log_interval=50), log_stream=log)
        finally:
            os._exit(0)
    deadline = time.time() + 60
    while time.time() < deadline and "processed" not in (log_path.read_text() if log_path.exists() else ""):
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the child finished before it was killed; give it more input"
    assert "processed" in log_path.read_text()
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # it was mid-write
    assert not os.path.exists(f"{prefix}.bin") and not os.path.exists(f"{prefix}.idx")
    with pytest.raises(ValueError, match="run tools/preprocess_data.py"):
        validate_prefix(prefix)


def test_cli_main(tmp_path, tokenizer_model, capsys):
    preprocess_data = load_tool("preprocess_data")
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), ["alpha beta", "gamma"])
    rc = preprocess_data.main(["--input", jsonl, "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type",
                               "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model, "--append-eod", "--workers", "2"])
    assert rc == 0 and "2 documents" in capsys.readouterr().out
    rc = preprocess_data.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "x"),
                               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_hugging_face_tokenizer_directory(tmp_path):
    """A local HF tokenizer directory (tokenizer.json) through Megatron's HuggingFaceTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from btx_megatron.data import build_pretraining_datasets
    from tests.data.btx_data_testlib import DataCfg

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(ROUND_TRIP_TEXTS * 20, trainer)
    directory = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>").save_pretrained(str(directory))

    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(directory))
    assert tokenizer.eod == hf.token_to_id("<|endoftext|>")
    result = preprocess(PreprocessConfig(input=[write_jsonl(str(tmp_path / "in.jsonl"), ROUND_TRIP_TEXTS * 3)],
                                         output_prefix=str(tmp_path / "hfds"), tokenizer_type="HuggingFaceTokenizer",
                                         tokenizer_model=str(directory), append_eod=True, log_interval=0))
    documents = _read_documents(str(tmp_path / "hfds"))
    assert [tokenizer.detokenize(d[:-1]) for d in documents] == ROUND_TRIP_TEXTS * 3
    cfg = DataCfg(data_path=[str(tmp_path / "hfds")], split="1,0,0", tokenizer_type="HuggingFaceTokenizer",
                  tokenizer_model=str(directory), data_cache_path=str(tmp_path / "cache"))
    train, _, _ = build_pretraining_datasets(cfg, tokenizer, seq_length=16, seed=1, num_samples=(8, 0, 0))
    assert len(train) >= 8 and result.num_documents == len(documents)
    with pytest.raises(ValueError, match="is not a directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "in.jsonl"))
