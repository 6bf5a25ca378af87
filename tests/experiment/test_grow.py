"""Growing and pruning the experiment's BTX model (btx_megatron.experiment.grow) and its fourth
domain (btx_megatron.data.extra_domains.build_extra_domain).

Default tier: the extra domain built into a small corpora directory with its existing tokenizer,
the grow stage's run plans and its report on given numbers, the pipeline hook's refusal without a
finished run. The slow test runs the whole pipeline at test scale and then ``--stages grow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from btx_megatron.experiment import load_pipeline
from btx_megatron.experiment.grow import Grow, GrowOptions
from btx_megatron.experiment.grow_report import format_grow_markdown, removal_row
from btx_megatron.experiment.state import PipelineError

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "examples" / "tiny" / "experiment.yaml"


# ---------------------------------------------------------------------------------------------
# The fourth domain, tokenized with the existing tokenizer
# ---------------------------------------------------------------------------------------------


def _fake_corpora(root: Path) -> Path:
    """A corpora directory as build_corpora leaves it, as far as an extra domain reads it: the
    tokenizer and manifest.json (the three domains' data is not needed)."""
    from tests.data.btx_data_testlib import train_tiny_tokenizer
    from btx_megatron.data.corpora import sha256_file

    tok = train_tiny_tokenizer(str(root / "tok_build"))
    (root / "tokenizer").mkdir(parents=True)
    os.replace(tok, root / "tokenizer" / "tokenizer.model")
    manifest = {"config": {"tokens_per_domain": 3000, "seed": 1234, "valid_every": 5, "version": 2},
                "tokenizer": {"path": "tokenizer/tokenizer.model",
                              "sha256": sha256_file(str(root / "tokenizer" / "tokenizer.model"))},
                "domains": {}, "files": {}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def test_extra_domain_is_c_headers_tokenized_with_the_existing_tokenizer(tmp_path, monkeypatch):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from btx_megatron.data import documents
    from btx_megatron.data.extra_domains import ExtraDomainConfig, build_extra_domain

    root = _fake_corpora(tmp_path / "corpora")
    before = (root / "manifest.json").read_bytes()
    m = build_extra_domain(ExtraDomainConfig(corpora=str(root), min_tokens=1000, workers=1))
    assert m["config"]["tokens"] == 3000 and m["config"]["valid_every"] == 5  # the corpora's own options
    assert (root / "manifest.json").read_bytes() == before  # the three-domain build's manifest untouched
    assert json.loads((root / "extra_domains" / "headers.json").read_text()) == m
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer" / "tokenizer.model"))
    for split in ("train", "valid"):
        docs = [json.loads(line) for line in (root / "jsonl" / f"headers_{split}.jsonl").read_text().splitlines()]
        assert docs and all(d["source"].endswith(".h") and "/c++/" not in d["source"] for d in docs)
        assert sum(("#define" in d["text"]) or ("#include" in d["text"]) for d in docs) >= 0.8 * len(docs)
        ds = IndexedDataset(str(root / "data" / f"headers_{split}"))
        assert len(ds) == len(docs) == m["splits"][split]["num_documents"]
        ids = ds[0].tolist()
        assert ids[-1] == sp.eos_id() and sp.decode(ids[:-1]) == docs[0]["text"]
    assert m["splits"]["train"]["num_tokens"] >= 3000 and m["splits"]["valid"]["num_tokens"] >= 600
    # A second call with the same options reuses everything.
    stamp = os.stat(root / "data" / "headers_train.bin").st_mtime_ns
    assert build_extra_domain(ExtraDomainConfig(corpora=str(root), min_tokens=1000, workers=1)) == m
    assert os.stat(root / "data" / "headers_train.bin").st_mtime_ns == stamp

    # A machine with little text: what there is (marked), or a clear error below min_tokens.
    few = tmp_path / "few"
    few.mkdir()
    for i in range(12):
        (few / f"h{i}.h").write_text(f"#ifndef H{i}\n#define H{i}\n" + "".join(
            f"extern int function_{i}_{j}(const char *name, unsigned long size);\n" for j in range(20)) + "#endif\n")
    monkeypatch.setattr(documents, "header_roots", lambda: [str(few)])
    small = build_extra_domain(ExtraDomainConfig(corpora=str(tmp_path / "corpora"), tokens=50_000,
                                                 min_tokens=1000, workers=1))
    assert small["exhausted"] and 1000 <= small["selected_tokens"]["train"] < 50_000
    with pytest.raises(ValueError, match="found only .* train .*needs at least 1000000 train tokens"):
        build_extra_domain(ExtraDomainConfig(corpora=str(tmp_path / "corpora"), tokens=2_000_000,
                                             min_tokens=1_000_000))
    with pytest.raises(ValueError, match="not a built corpora directory"):
        build_extra_domain(ExtraDomainConfig(corpora=str(tmp_path / "few")))


# ---------------------------------------------------------------------------------------------
# The grow stage's runs and report (no training)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def pipeline(tmp_path):
    return load_pipeline(str(EXPERIMENT), output=str(tmp_path / "run"), data_dir=str(tmp_path / "data"),
                         stages=["grow"], echo=lambda s: None)


def test_grow_plans(pipeline, tmp_path):
    grow = Grow(pipeline)
    plans = grow.plans()
    data = tmp_path / "data" / "data"
    assert grow.steps == 50  # a third of the experiment's 150 mix steps
    # The new branch trains exactly like the math branch, on the new data, from the seed.
    math = pipeline.plans["math"].base_argv()
    branch = plans["branch"].base_argv()
    assert plans["branch"].init_checkpoint == str(pipeline.seed_checkpoint)
    differ = {a for a, b in zip(branch, math) if a != b}
    assert len(branch) == len(math) and differ == {str(data / "headers_train"), str(plans["branch"].save_dir)}
    # (c) and the rebuild: 5 experts, N steps on every domain, the new one at the mean domain weight.
    for key in ("mix", "rebuild"):
        cfg = plans[key].config
        assert cfg.model.num_experts == 5 and cfg.train.train_iters == 50
        weights: dict[str, float] = {}
        for e in plans[key].blend:  # the domain's share plus its part of the seed's share
            weights[Path(e.prefix).name] = weights.get(Path(e.prefix).name, 0.0) + e.weight
        assert weights == pytest.approx({"math_train": 0.27 + 0.19 / 3, "code_train": 0.27 + 0.19 / 3,
                                         "wiki_train": 0.27 + 0.19 / 3, "headers_train": 0.27})
    assert plans["mix"].init_checkpoint == str(grow.added_dir)
    # (c) continues the trained model at the LR its mix phase ended at; (c') re-warms to the peak.
    assert (plans["mix"].config.train.lr, plans["mix"].config.train.min_lr) == (1e-4, 1e-5)
    assert (plans["mix_peak"].config.train.lr, plans["mix_peak"].config.train.min_lr) == (1e-3, 1e-4)
    assert plans["rebuild"].init_checkpoint == str(grow.out / "rebuild_merged")
    # (d): only the new expert and its router rows train, on the new domain alone; (d0) without
    # the router rows; (d*) with them, on every domain's data.
    for key, router, blend in (("expert", True, ["headers_train"]), ("expert_only", False, ["headers_train"]),
                               ("expert_all", True, [Path(e.prefix).name for e in plans["mix"].blend])):
        argv = plans[key].base_argv()
        assert argv[argv.index("--train-experts") + 1] == "headers" and ("--train-router" in argv) == router
        assert [Path(e.prefix).name for e in plans[key].blend] == blend
        assert plans[key].config.train.lr == 1e-3 and plans[key].init_checkpoint == str(grow.added_dir)
    # BTX without wiki: 3 experts, as long as the experiment's mix, no wiki data in any share.
    without = plans["without"]
    assert without.config.model.num_experts == 3 and without.config.train.train_iters == 150
    assert "wiki_train" not in {Path(e.prefix).name for e in without.blend} and len(without.blend) == 4
    with pytest.raises(PipelineError, match="already has a domain named 'math'"):
        Grow(pipeline, GrowOptions(domain="math"))
    with pytest.raises(PipelineError, match="not a built-in extra domain"):
        Grow(pipeline, GrowOptions(domain="law"))
    with pytest.raises(PipelineError, match="remove_domain 'law'"):
        Grow(pipeline, GrowOptions(remove_domain="law"))


def test_grow_needs_a_finished_run(pipeline):
    with pytest.raises(PipelineError, match="grow needs the finished BTX run.*run tools/run_experiment.py"):
        pipeline.run()
    assert not (pipeline.out / "grow").exists()


def test_report_tables_on_given_numbers(tmp_path):
    from btx_megatron.experiment.grow_report import write_grow_report

    old = ["code", "math", "wiki"]
    base = {"code": 10.0, "math": 2.0, "wiki": 20.0, "headers": 40.0}
    ppl = {"btx": base,
           "added": {**base, "wiki": 20.6, "headers": 30.0},        # wiki +3%: over 2%
           "mix": {**base, "code": 10.1, "headers": 8.0},           # +1%
           "expert": {**base, "headers": 9.0},
           "rebuild": {**base, "math": 2.1, "headers": 8.5},
           "branch": {"code": 30.0, "math": 9.0, "wiki": 50.0, "headers": 7.0},
           "expert_minus": base, "mix_minus": {**base, "code": 10.0, "headers": 35.0},
           "btx_minus": {**base, "math": 2.03, "wiki": 24.0, "headers": 44.0}, "without": {**base, "wiki": 23.0}}
    labels = {k: f"label {k}" for k in ppl}
    short = {k: f"<{k}>" for k in ppl}
    added = {"btx": 0.0, "added": 1e12, "mix": 2e12, "expert": 1.8e12, "rebuild": 2e12, "branch": 1e12}
    grow_rows = [{"key": k, "label": labels[k], "ppl": ppl[k], "added_flops": added[k],
                  "old_change": {o: ppl[k][o] / base[o] - 1 for o in old}} for k in added]
    doms = [*old, "headers"]
    remove_rows = [removal_row("label expert_minus", "expert_minus", ppl, "headers", ref="btx", before="expert",
                               domains=doms, identical=True),
                   removal_row("label mix_minus", "mix_minus", ppl, "headers", ref="btx", before="mix", domains=doms),
                   removal_row("label btx_minus", "btx_minus", ppl, "wiki", ref="without", before="btx", domains=old)]
    assert remove_rows[2]["removed_gap"] == pytest.approx(24 / 23 - 1)
    # (a) never had the new domain: headers' +10% is shown apart, not as a remaining domain's change.
    assert remove_rows[2]["remaining_change"] == pytest.approx({"code": 0.0, "math": 0.015})
    assert remove_rows[2]["other_change"] == pytest.approx({"headers": 0.1})
    assert remove_rows[0]["other_change"] == {}
    s = {"domain": "headers", "old_domains": old, "remove_domain": "wiki", "steps": 50, "router_init": "centroid",
         "labels": labels, "short": short, "ppl": ppl, "grow": grow_rows, "remove": remove_rows,
         "flops": {}, "tolerances": {"old_domains_after_add": 0.02, "remaining_after_remove": 0.01}}
    text = format_grow_markdown(s)
    lines = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| label")}
    assert "max +3.00% (wiki) (over 2%)" in lines["label added"] and "30.00" in lines["label added"]
    assert "max +1.00% (code) |" in lines["label mix"] and "2.00T" in lines["label mix"]
    assert "headers: +0.00% vs <btx> (bit-identical to it)" in lines["label expert_minus"]
    assert "headers: -12.50% vs <btx> | max -0.99% (code) vs <mix> |" in lines["label mix_minus"]
    assert "wiki: +4.35% vs <without>" in lines["label btx_minus"]
    assert "max +1.50% (math) vs <btx> (over 1%); headers, not a domain of it: +10.00% |" in lines["label btx_minus"]
    assert "| label without | 10.00 | 2.00 | 23.00 | 40.00 | reference | - |" in text
    write_grow_report(tmp_path / "report", s)
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"grow.md", "grow.json", "grow.png", "remove.png"}


# ---------------------------------------------------------------------------------------------
# End to end (slow): the test-scale pipeline, then --stages grow
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grow_stage_end_to_end(tmp_path):
    scale = ROOT / "tests" / "e2e" / "test_scale.yaml"
    env = {k: v for k, v in os.environ.items() if k != "BTX_RUN_DIR"}
    base = [sys.executable, str(ROOT / "tools" / "run_experiment.py"), str(EXPERIMENT), "--overrides", str(scale),
            "--output", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]
    # The grow stage needs the finished seed, branches and mix phase only.
    for extra in (["--stages", "corpora", "seed", "branches", "merge", "mix"], ["--stages", "grow"]):
        done = subprocess.run(base + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "grow" / "report" / "grow.json").read_text())
    assert report["steps"] == 2
    assert [r["key"] for r in report["grow"]] == ["btx", "added", "mix", "mix_peak", "expert_only", "expert",
                                                  "expert_all", "rebuild", "branch"]
    ppl = report["ppl"]
    # (d) trains only the new expert: its removal gives the BTX model back exactly.
    first = report["remove"][0]
    assert first["bit_identical_to_reference"] and ppl["expert_minus"] == ppl["btx"]
    # Training the new expert on its domain lowers that domain's perplexity below the BTX model's.
    assert ppl["expert"]["headers"] < ppl["btx"]["headers"]
    assert (tmp_path / "run" / "grow" / "report" / "grow.png").is_file()
    # A second --stages grow reuses every sub-stage.
    again = subprocess.run(base + ["--stages", "grow"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and ": running (" not in again.stdout, again.stdout[-3000:]
