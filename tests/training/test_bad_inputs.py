"""Bad inputs to the training entrypoints and the launch/experiment/preprocessing tools.

Every case must end with exit code 2 (a user error), one ``error:`` line that names the input
(and says what to do), no traceback, and nothing on disk touched: the inputs are byte-identical
afterwards and a refused run creates no --save directory and rewrites no run_config.json.

The entrypoints run as real processes forked from faultlib's server (imports paid once); the
experiment tools run with BTX_RUN_DIR / BTX_DATA_DIR pointing into the test's directory, so a
case that wrongly starts work cannot write into the checkout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.training import faultlib
from tests.training.faultlib import TINY_DENSE, iter_dir

ROOT = faultlib.ROOT
BASE = TINY_DENSE + ["--train-iters", "2"]


def snapshot(*paths: Path) -> dict[str, tuple]:
    """Every file and directory under ``paths`` with its size and content hash (absent: None)."""
    import hashlib

    out: dict[str, tuple] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            out[str(path)] = ()
            continue
        for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
            out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else ("dir",)
    return out


def refused(argv: list[str], log: Path, *, watch: list[Path], names: list[str], entry: str = "btx_megatron.pretrain",
            env: dict | None = None) -> str:
    """Run a case that must be refused; returns its error line."""
    before = snapshot(*watch)
    r = faultlib.run(argv, log, entry=entry, env=env, timeout=300)
    text = r.text()
    errors = [line for line in text.splitlines() if "error:" in line]
    assert r.rc == 2, f"exit {r.rc}:\n{text[-3000:]}"
    assert "Traceback" not in text and len(errors) == 1, text[-3000:]
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    assert snapshot(*watch) == before, f"{watch} changed"
    return errors[0]


@pytest.fixture(scope="module")
def damaged(dense_reference, tmp_path_factory):
    """Copies of the reference run, each damaged in one way."""
    ref, _ = dense_reference
    base = tmp_path_factory.mktemp("damaged")
    out = {}
    for name in ("truncated", "bad_metadata", "missing_iteration", "other_arch"):
        out[name] = base / name
        shutil.copytree(ref, out[name])
    distcp = iter_dir(out["truncated"], 6) / "__0_0.distcp"
    os.truncate(distcp, distcp.stat().st_size // 2)
    (iter_dir(out["bad_metadata"], 6) / ".metadata").write_bytes(b"\x80\x04garbage")
    shutil.rmtree(iter_dir(out["missing_iteration"], 6))
    (base / "a_file").write_text("not a directory\n")
    (base / "broken.yaml").write_text("num-layers: 4\n  hidden-size: [64\n")
    out["file"], out["yaml"], out["base"] = base / "a_file", base / "broken.yaml", base
    return out


# ------------------------------------------------------------------------------ pretrain
PRETRAIN_CASES = {
    "truncated_checkpoint": ("truncated", [], ["--load", "__0_0.distcp is truncated"]),
    "unreadable_metadata": ("bad_metadata", [], ["--load", "cannot read the checkpoint metadata"]),
    "tracker_names_a_missing_iteration": ("missing_iteration", [], ["--load", "names iteration 6"]),
}


@pytest.mark.parametrize("case", list(PRETRAIN_CASES), ids=list(PRETRAIN_CASES))
def test_pretrain_refuses_a_damaged_checkpoint(damaged, tmp_path, case):
    which, extra, names = PRETRAIN_CASES[case]
    run = damaged[which]
    refused(BASE + extra + ["--load", str(run), "--save", str(run)], tmp_path / "log", watch=[run],
            names=names + [str(run)])


@pytest.mark.parametrize("flags, names", [
    (["--make-vocab-size-divisible-by", "0"], ["--make-vocab-size-divisible-by", "positive"]),
    (["--seq-length", "0"], ["--seq-length", "positive"]),
], ids=["vocab_divisible_by_0", "seq_length_0"])
@pytest.mark.parametrize("entry", ["btx_megatron.pretrain", "btx_megatron.pretrain_mix"], ids=["pretrain", "mix"])
def test_options_that_would_divide_by_zero(damaged, merged, tmp_path, flags, names, entry):
    save = tmp_path / "new"
    load = ["--load", str(merged)] if entry.endswith("mix") else []
    refused(BASE + flags + load + ["--save", str(save)], tmp_path / "log", watch=[save, merged], names=names,
            entry=entry)


@pytest.mark.parametrize("entry", ["btx_megatron.pretrain", "btx_megatron.pretrain_mix"], ids=["pretrain", "mix"])
def test_save_that_is_not_a_directory(damaged, merged, tmp_path, entry):
    load = ["--load", str(merged)] if entry.endswith("mix") else []
    a_file = damaged["file"]
    refused(BASE + load + ["--save", str(a_file)], tmp_path / "log", watch=[a_file, merged],
            names=[f"--save {a_file}", "is a file"], entry=entry)
    refused(BASE + load + ["--save", str(a_file / "run")], tmp_path / "log2", watch=[a_file, merged],
            names=[f"--save {a_file / 'run'}", "is a file"], entry=entry)


@pytest.mark.parametrize("entry", ["btx_megatron.pretrain", "btx_megatron.pretrain_mix"], ids=["pretrain", "mix"])
def test_broken_config_yaml_is_named(damaged, merged, tmp_path, entry):
    load = ["--load", str(merged)] if entry.endswith("mix") else []
    save = tmp_path / "new"
    refused(BASE + load + ["--config", str(damaged["yaml"]), "--save", str(save)], tmp_path / "log",
            watch=[save, damaged["yaml"]], names=[str(damaged["yaml"]), "not valid YAML", "line 2"], entry=entry)


def test_refused_resume_keeps_the_run_untouched(damaged, tmp_path):
    # --load X --save X of a run saved with --hidden-size 64, restarted with 32: refused before
    # anything is written; run_config.json still describes the run that is there.
    run = damaged["other_arch"]
    config_before = (run / "run_config.json").read_bytes()
    refused(BASE + ["--hidden-size", "32", "--load", str(run), "--save", str(run), "--train-iters", "8"],
            tmp_path / "log", watch=[run], names=[f"--load {run}", "hidden_size=64", "--hidden-size 64"])
    assert (run / "run_config.json").read_bytes() == config_before
    # Started into a new --save from it: the refused run leaves no --save directory behind.
    save = tmp_path / "new"
    refused(BASE + ["--hidden-size", "32", "--load", str(run), "--save", str(save)], tmp_path / "log2",
            watch=[run, save], names=["hidden_size=64"])
    assert not save.exists()


# ------------------------------------------------------------------------------ pretrain_mix
@pytest.fixture(scope="module")
def merged(dense_reference, tmp_path_factory):
    """An MoE checkpoint written by tools/merge_branches.py from two checkpoints of the reference."""
    ref, _ = dense_reference
    out = tmp_path_factory.mktemp("merged") / "moe"
    r = faultlib.run(["--branch", f"a={ref}", "--branch", f"b={iter_dir(ref, 4)}", "--output", str(out)],
                     out.parent / "merge.log", entry="tools/merge_branches.py")
    assert r.rc == 0, r.text()[-3000:]
    return out


def test_mix_refuses_damaged_or_dense_checkpoints(damaged, merged, dense_reference, tmp_path):
    ref, _ = dense_reference
    save = tmp_path / "new"
    refused(BASE + ["--load", str(ref), "--save", str(save)], tmp_path / "dense.log", watch=[ref, save],
            names=[f"--load {ref}", "dense checkpoint", "merge_branches.py"], entry="btx_megatron.pretrain_mix")
    truncated = tmp_path / "truncated"
    shutil.copytree(merged, truncated)
    for f in iter_dir(truncated, 0).glob("*.distcp"):
        os.truncate(f, 100)
    refused(BASE + ["--load", str(truncated), "--save", str(save)], tmp_path / "trunc.log", watch=[truncated, save],
            names=[f"--load {truncated}", "is truncated"], entry="btx_megatron.pretrain_mix")


def test_mix_resume_refused_for_an_architecture_mismatch_keeps_the_run(merged, tmp_path):
    mix = tmp_path / "mix"
    r = faultlib.run(BASE + ["--train-iters", "1", "--load", str(merged), "--save", str(mix)], tmp_path / "mix.log",
                     entry="btx_megatron.pretrain_mix")
    assert r.rc == 0, r.text()[-3000:]
    config_before = (mix / "run_config.json").read_bytes()
    refused(BASE + ["--hidden-size", "32", "--load", str(merged), "--save", str(mix)], tmp_path / "log",
            watch=[mix, merged], names=["hidden_size=64"], entry="btx_megatron.pretrain_mix")
    assert (mix / "run_config.json").read_bytes() == config_before


# ------------------------------------------------------------------------------ experiment tools
@pytest.fixture
def sandbox(tmp_path):
    """Environment and a copy of the built-in experiment whose runs and data live in tmp_path."""
    env = {"BTX_RUN_DIR": str(tmp_path / "runs"), "BTX_DATA_DIR": str(tmp_path / "data")}
    return env, (ROOT / "examples" / "tiny" / "experiment.yaml").read_text()


def _experiment(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("tool", ["tools/launch_branches.py", "tools/run_experiment.py"])
def test_experiment_tools_refuse_bad_experiment_files(sandbox, tmp_path, tool):
    env, text = sandbox
    extra = ["--local"] if "launch" in tool else []
    watch = [tmp_path / "runs", tmp_path / "data"]
    broken = _experiment(tmp_path, "name: x\nmodel:\n  num_layers: [4\n", "broken.yaml")
    refused([str(broken), *extra], tmp_path / "broken.log", entry=tool, env=env, watch=watch + [broken],
            names=[str(broken), "not valid YAML", "line"])
    zero_seq = _experiment(tmp_path, text.replace("seq_length: 128", "seq_length: 0"), "zero_seq.yaml")
    refused([str(zero_seq), *extra], tmp_path / "zero_seq.log", entry=tool, env=env, watch=watch,
            names=["seq-length", "positive"])
    missing = tmp_path / "missing.yaml"
    refused([str(missing), *extra], tmp_path / "missing.log", entry=tool, env=env, watch=watch,
            names=[str(missing), "does not exist"])


def test_run_experiment_refuses_bad_overrides_and_outputs(sandbox, tmp_path):
    env, _ = sandbox
    exp = str(ROOT / "examples" / "tiny" / "experiment.yaml")
    watch = [tmp_path / "runs", tmp_path / "data"]
    tool = "tools/run_experiment.py"
    refused([exp, "--set", "model.make_vocab_size_divisible_by=0"], tmp_path / "vocab.log", entry=tool, env=env,
            watch=watch, names=["--make-vocab-size-divisible-by", "positive"])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused([exp, "--output", str(a_file)], tmp_path / "out.log", entry=tool, env=env, watch=watch + [a_file],
            names=[str(a_file), "is a file"])


def test_launch_refuses_before_starting_anything(sandbox, tmp_path):
    env, _ = sandbox
    # The corpora do not exist (BTX_DATA_DIR is empty): nothing may start, no run directory appears.
    refused([str(ROOT / "examples" / "tiny" / "experiment.yaml"), "--local", "--only", "seed"], tmp_path / "log",
            entry="tools/launch_branches.py", env=env, watch=[tmp_path / "runs"], names=["nothing was started"])


# ------------------------------------------------------------------------------ preprocess_data
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.data.btx_data_testlib import train_tiny_tokenizer

    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_preprocess_refuses_bad_inputs(tokenizer, tmp_path):
    tool = "tools/preprocess_data.py"
    good = tmp_path / "in.jsonl"
    good.write_text('{"text": "hello world"}\n')
    out = tmp_path / "out" / "x"
    args = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer]
    watch = [tmp_path / "out", good]
    refused(["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(out), *args], tmp_path / "1.log",
            entry=tool, watch=watch, names=["--input", "none.jsonl"])
    refused(["--input", str(good), "--output-prefix", str(out), "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", str(tmp_path / "none.model")], tmp_path / "2.log", entry=tool, watch=watch,
            names=["--tokenizer-model", "none.model"])
    refused(["--input", str(good), "--output-prefix", str(out), "--workers", "0", *args], tmp_path / "3.log",
            entry=tool, watch=watch, names=["--workers"])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(["--input", str(good), "--output-prefix", str(a_file / "x"), *args], tmp_path / "4.log", entry=tool,
            watch=watch + [a_file], names=["--output-prefix", str(a_file)])
