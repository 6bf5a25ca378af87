"""Built-in corpora and tokenizer training: deterministic, offline, three distinct domains."""

import hashlib
import json
import os

from tests.tools import load_tool
import pytest

from tests.data.btx_data_testlib import train_tiny_tokenizer

from btx_megatron.data import CorporaConfig, build_corpora, build_domain_eval_datasets, build_tokenizer
from btx_megatron.data.documents import roff_to_text
from btx_megatron.data.math_problems import math_document

TOKENS = 20_000


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_tokenizer_training_is_deterministic_and_llama_style(tmp_path):
    import sentencepiece as spm

    first = train_tiny_tokenizer(str(tmp_path / "a"))
    second = train_tiny_tokenizer(str(tmp_path / "b"))
    assert _sha(first) == _sha(second)
    sp = spm.SentencePieceProcessor(model_file=first)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.piece_to_id("<0xFF>") > 2  # byte fallback pieces exist
    tokenizer = build_tokenizer("SentencePieceTokenizer", first)
    assert tokenizer.eod == 2
    text = "Ωμέγα → ∑ unseen 🧪\n\tindent"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_math_documents_are_reproducible():
    assert math_document(1, 5) == math_document(1, 5)
    assert math_document(1, 5) != math_document(2, 5)
    assert "Step 1:" in math_document(1, 0) and "Answer:" in math_document(1, 0)


def test_roff_to_text():
    page = '.TH GZIP 1\n.SH NAME\ngzip \\- compress files\n.SH DESCRIPTION\nThe\n.B gzip\ncommand reduces\n.BR size (1).\n.\\" comment\n'
    text = roff_to_text(page)
    assert "gzip - compress files" in text and "Description" in text and "size(1)." in text
    assert "comment" not in text and ".B" not in text


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpora"))
    return out, build_corpora(CorporaConfig(output=out, tokens_per_domain=TOKENS, vocab_size=1000))


def test_build_corpora_outputs(corpora):
    out, manifest = corpora
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert set(manifest["domains"]) == {"math", "code", "wiki"}
    tokenizer = build_tokenizer("SentencePieceTokenizer", os.path.join(out, manifest["tokenizer"]["path"]))
    samples = {}
    for domain, splits in manifest["domains"].items():
        assert splits["train"]["num_tokens"] >= TOKENS
        assert splits["valid"]["num_tokens"] >= TOKENS // 50 and splits["valid"]["num_documents"] >= 1
        for split, info in splits.items():
            dataset = IndexedDataset(os.path.join(out, info["prefix"]))
            assert len(dataset) == info["num_documents"]
            assert sum(int(n) for n in dataset.sequence_lengths) == info["num_tokens"]
        with open(os.path.join(out, splits["train"]["jsonl"])) as f:
            first = json.loads(f.readline())
        samples[domain] = first["text"]
        # Keep the dataset alive while its mmap-backed arrays are read (closing it unmaps them).
        train_ds = IndexedDataset(os.path.join(out, splits["train"]["prefix"]))
        assert tokenizer.detokenize(train_ds[0][:-1].tolist()) == first["text"]
    assert "Problem 1." in samples["math"] and "Answer:" in samples["math"]
    assert "import " in samples["code"] or "def " in samples["code"]
    # Validation documents are held out from training.
    for domain in manifest["domains"]:
        read = lambda s: {json.loads(l)["text"] for l in open(os.path.join(out, manifest["domains"][domain][s]["jsonl"]))}
        assert not read("train") & read("valid")


def test_build_corpora_is_deterministic_and_skips_finished_work(corpora, tmp_path):
    out, manifest = corpora
    bin_path = os.path.join(out, manifest["domains"]["code"]["train"]["prefix"] + ".bin")
    mtime = os.path.getmtime(bin_path)
    again = build_corpora(CorporaConfig(output=out, tokens_per_domain=TOKENS, vocab_size=1000, workers=1))
    assert again == manifest and os.path.getmtime(bin_path) == mtime

    # A fresh directory gets the same bytes.
    fresh = build_corpora(CorporaConfig(output=str(tmp_path), tokens_per_domain=TOKENS, vocab_size=1000, workers=1))
    assert fresh["files"] == manifest["files"]


def test_domain_eval_on_built_corpora(corpora):
    out, manifest = corpora
    from tests.data.btx_data_testlib import DataCfg

    model = os.path.join(out, manifest["tokenizer"]["path"])
    cfg = DataCfg(tokenizer_model=model, eval_domains={d: [os.path.join(out, s["valid"]["prefix"])] for d, s in manifest["domains"].items()})
    sets = build_domain_eval_datasets(cfg, build_tokenizer("SentencePieceTokenizer", model), seq_length=64, seed=1, num_samples=None)
    assert list(sets) == ["code", "math", "wiki"] and all(len(ds) > 0 for ds in sets.values())


def test_cli(tmp_path, capsys):

    cli, train_tokenizer = load_tool("build_corpora"), load_tool("train_tokenizer")
    assert cli.main(["--output", str(tmp_path / "c"), "--tokens-per-domain", "10"]) == 2
    assert "too small" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("\n".join(math_document(0, i) for i in range(30)))
    assert train_tokenizer.main(["--input", str(text), "--model-prefix", str(tmp_path / "m"), "--vocab-size", "400"]) == 0
    assert os.path.isfile(tmp_path / "m.model")
    assert train_tokenizer.main(["--input", str(tmp_path / "none.txt"), "--model-prefix", str(tmp_path / "m2")]) == 2
