"""--local branches on real tiny data: seed start, specialisation, isolation, kill/resume exactness.

One module-scoped reference experiment (seed + three uninterrupted branches) serves every test;
a second experiment from the same seed is killed and resumed and must end bit-identical to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch.branch_testlib import (

    DOMAINS, ROOT, launch, launch_async, load_weights, model_tensors, read_tracker, tiny_experiment,
    train_records, wait_for, write_yaml,
)

# Local branch launches end to end (3-4 min); make run's pipeline (tests/e2e) launches branches
# in the default tier.
pytestmark = pytest.mark.slow

BRANCH_ITERS = 40


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> Path:
    """Tiny indexed corpora (math, code, wiki) + tokenizer, built once per test session."""
    shared = os.environ.get("BTX_TEST_CORPORA")
    if shared and (Path(shared) / "manifest.json").is_file():
        return Path(shared)
    out = tmp_path_factory.mktemp("corpora")
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_corpora.py"), "--output", str(out),
                    "--tokens-per-domain", "20000", "--vocab-size", "512"], check=True, capture_output=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    """Seed pretrained with --only seed, then the three branches run concurrently, uninterrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    exp_file = write_yaml(tmp / "exp.yaml", tiny_experiment(corpora, tmp / "out", branch_iters=BRANCH_ITERS))
    launch(exp_file, "--local", "--only", "seed")
    out = launch(exp_file, "--local", "--max-concurrent", "3")
    return {"exp": exp_file, "out": tmp / "out", "tmp": tmp, "corpora": corpora, "stdout": out.stdout}


def _save(out: Path, name: str) -> Path:
    return out / ("seed" if name == "seed" else f"branches/{name}") / "checkpoints"


def _final(out: Path, name: str) -> Path:
    save = _save(out, name)
    return save / f"iter_{read_tracker(save):07d}"


def test_branches_start_from_the_seed_and_specialise(reference, tmp_path):
    out = reference["out"]
    seed_save = _save(out, "seed")
    seed_first_lr = train_records(seed_save)[0]["lr"]
    summaries = {}
    for d in DOMAINS:
        run = out / "branches" / d
        log = (run / "logs" / "train.log").read_text()
        # First start: the seed's weights at iteration 0 with a fresh optimizer and schedule.
        assert f"--load {seed_save} --finetune" in log
        assert f"loaded {seed_save} -> iteration 0, consumed samples 0" in log
        records = train_records(run / "checkpoints")
        assert records[0]["iteration"] == 1 and records[-1]["iteration"] == BRANCH_ITERS
        # A resumed seed schedule would be decayed to min_lr; a fresh one repeats the seed's warmup step.
        assert records[0]["lr"] == seed_first_lr
        summaries[d] = json.loads((run / "checkpoints" / "eval_summary.json").read_text())
        assert summaries[d]["exit_reason"] == "finished" and summaries[d]["iteration"] == BRANCH_ITERS
        resolved = json.loads((run / "resolved_config.json").read_text())
        assert resolved["first_start"] == ["--load", str(seed_save), "--finetune"]
        assert (run / "command.sh").read_text().count("btx_megatron.pretrain") == 1
    seed_eval = json.loads((seed_save / "eval_summary.json").read_text())["eval"]
    table = {d: {e: summaries[d]["eval"][e]["loss"] for e in DOMAINS} for d in DOMAINS}
    print("eval loss (rows: branch, columns: eval domain):", json.dumps(table, indent=1))
    for e in DOMAINS:
        own = table[e][e]
        assert own < seed_eval[e]["loss"], (e, table, seed_eval)
        for d in DOMAINS:
            if d != e:
                assert own < table[d][e], f"branch {e} is not the best on its own domain: {table}"

    # Step 0 of a branch is exactly the seed: the resolved first-start flags with 0 iterations.
    resolved = json.loads((out / "branches" / "math" / "resolved_config.json").read_text())
    flags = list(resolved["flags"])
    flags[flags.index("--train-iters") + 1] = "0"
    flags[flags.index("--save") + 1] = str(tmp_path / "step0")
    subprocess.run([sys.executable, "-m", "btx_megatron.pretrain", *flags, *resolved["first_start"]],
                   check=True, capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    step0 = model_tensors(load_weights(tmp_path / "step0" / "iter_0000000", tmp_path))
    seed = model_tensors(load_weights(_final(out, "seed"), tmp_path))
    assert step0.keys() == seed.keys() and len(seed) >= 9
    for k in seed:
        assert torch.equal(step0[k], seed[k]), k

    # The three branches end different.
    finals = {d: model_tensors(load_weights(_final(out, d), tmp_path)) for d in DOMAINS}
    for a, b in (("math", "code"), ("math", "wiki"), ("code", "wiki")):
        assert not torch.equal(finals[a]["decoder.layers.mlp.linear_fc1.weight"],
                               finals[b]["decoder.layers.mlp.linear_fc1.weight"]), (a, b)


def test_no_process_group_spans_two_branches(reference):
    out = reference["out"]
    ports, worlds = {}, {}
    for d in DOMAINS:
        run = out / "branches" / d
        launched = json.loads((run / "launch.json").read_text())
        recorded = json.loads((run / "checkpoints" / "run_config.json").read_text())
        ports[d] = launched["master_port"]
        worlds[d] = recorded["world_size"]
        # The trainer's own world is exactly the branch's processes.
        assert recorded["world_size"] == launched["world_size"]
        assert launched["env"]["MASTER_PORT"] == str(launched["master_port"])
        log = (run / "logs" / "train.log").read_text()
        assert f"world {launched['world_size']}," in log
        if launched["world_size"] > 1:
            assert f"--master-port {launched['master_port']}" in log
    assert worlds == {"math": 1, "code": 1, "wiki": 2}
    assert len(set(ports.values())) == 3, ports
    # They did run concurrently (three at a time), each its own process group.
    assert "3 run(s) concurrently (3 at a time)" in reference["stdout"]


def _pid(run: Path) -> int:
    return int(json.loads((run / "launch.json").read_text())["pid"])


def test_sigkill_then_sigterm_then_resume_is_bit_exact(reference, tmp_path):
    """A second experiment from the same seed: SIGKILL math mid-run (code keeps going and ends
    equal to the reference), relaunch math (resumes its last checkpoint), SIGTERM it (saves,
    exits 0), relaunch again: the final weights and optimizer equal the uninterrupted run."""
    ref_out = reference["out"]
    out = tmp_path / "out"
    exp = tiny_experiment(reference["corpora"], out, seed_checkpoint=str(_save(ref_out, "seed")),
                          branch_iters=BRANCH_ITERS)
    exp_file = write_yaml(tmp_path / "exp.yaml", exp)
    math_run, math_save = out / "branches" / "math", _save(out, "math")

    proc = launch_async(exp_file, "--local", "--only", "math", "--only", "code", "--max-concurrent", "2")
    wait_for(lambda: (read_tracker(math_save) or 0) >= 5, what="math's first checkpoint")
    os.killpg(_pid(math_run), signal.SIGKILL)
    killed_at = read_tracker(math_save)
    assert killed_at < BRANCH_ITERS
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, stdout  # one run failed ...
    assert "math: exited -9" in stdout and "code: exited 0 (done" in stdout  # ... the other finished
    status = launch(exp_file, "status").stdout
    assert "math       failed" in status and "code       done" in status

    # Relaunch math: resumes from its own checkpoint; SIGTERM it once it has trained past it.
    proc = launch_async(exp_file, "--local", "--only", "math")
    resumed_from = read_tracker(math_save)
    wait_for(lambda: math_run.joinpath("launch.json").is_file() and
             json.loads(math_run.joinpath("launch.json").read_text())["attempt"] == 2, what="attempt 2")
    wait_for(lambda: _attempt_started_training(math_run, 2), what="attempt 2 training")
    os.killpg(_pid(math_run), signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout
    assert json.loads((math_run / "exit.json").read_text())["returncode"] == 0
    summary = json.loads((math_save / "eval_summary.json").read_text())
    assert summary["exit_reason"] == "signal"
    stopped_at = read_tracker(math_save)
    assert resumed_from < stopped_at < BRANCH_ITERS
    assert "math       stopped" in launch(exp_file, "status").stdout

    launch(exp_file, "--local", "--only", "math")
    log = (math_run / "logs" / "train.log").read_text()
    attempts = log.split("===== attempt ")[1:]
    assert len(attempts) == 3
    assert "first start" in attempts[0] and f"--load {_save(ref_out, 'seed')} --finetune" in attempts[0]
    for attempt, it in ((attempts[1], resumed_from), (attempts[2], stopped_at)):
        assert "resume:" in attempt and f"--load {math_save}" in attempt and "--finetune" not in attempt.split("\n")[0]
        assert f"-> iteration {it}," in attempt
    assert read_tracker(math_save) == BRANCH_ITERS

    for d in ("math", "code"):
        got = load_weights(_final(out, d), tmp_path)
        want = load_weights(_final(ref_out, d), tmp_path)
        assert got.keys() == want.keys()
        for k in want:  # model weights and Adam moments, bit for bit
            assert torch.equal(got[k], want[k]), (d, k)


def _attempt_started_training(run: Path, attempt: int) -> bool:
    log = (run / "logs" / "train.log").read_text()
    parts = log.split("===== attempt ")
    return len(parts) > attempt and "[pretrain] iter" in parts[attempt]
