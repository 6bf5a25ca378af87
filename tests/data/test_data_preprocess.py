"""tools/preprocess_data.py: round trip, determinism, bad input, atomicity."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from btx_data_testlib import REPO_ROOT, ROUND_TRIP_TEXTS, preprocess_texts, train_tiny_tokenizer, write_jsonl

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
    from btx_megatron.data.math_problems import math_document

    write_jsonl(str(tmp_path / "big.jsonl"), [math_document(1, i) for i in range(20000)])
    prefix = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input", str(tmp_path / "big.jsonl"),
         "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
         "--append-eod", "--log-interval", "100"],
        stderr=subprocess.PIPE, text=True,
    )
    # Kill once it reports progress, i.e. mid-write.
    line = proc.stderr.readline()
    while line and "processed" not in line:
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "processed" in line
    assert not os.path.exists(f"{prefix}.bin") and not os.path.exists(f"{prefix}.idx")
    from btx_megatron.data import validate_prefix

    with pytest.raises(ValueError, match="run tools/preprocess_data.py"):
        validate_prefix(str(prefix))


def test_cli_main(tmp_path, tokenizer_model, capsys):
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), ["alpha beta", "gamma"])
    rc = preprocess_data.main(["--input", jsonl, "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type",
                               "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model, "--append-eod", "--workers", "2"])
    assert rc == 0 and "2 documents" in capsys.readouterr().out
    rc = preprocess_data.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "x"),
                               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
