"""Fault tolerance of training runs, each run a real process.

Every run uses the start-or-resume command (``--load X --save X``) with the tiny mock-data
model (TINY_DENSE), 6 iterations and a save every 2, and every interrupted run must end
bit-identical to the uninterrupted reference (``dense_reference``): weights, optimizer state,
RNG and scheduler, and one metrics record per iteration with the same loss.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training import faultlib
from tests.training.faultlib import (TINY_DENSE, assert_same_training, complete, debris, differences, iter_dir, iterations_on_disk,
                      metrics, saved_lines, tracker, train_argv)

ROOT = faultlib.ROOT


# ------------------------------------------------------------------ 2. start-or-resume
def test_start_or_resume(dense_reference, tmp_path):
    _, text = dense_reference
    # The reference run was started with --load X --save X and X did not exist.
    assert "[start] no checkpoint in --load" in text and "starting from scratch (start-or-resume)" in text
    # --finetune needs a checkpoint to start from: refused in one line, nothing written.
    empty = tmp_path / "empty"
    r = faultlib.run(train_argv(empty, extra=["--finetune"]), tmp_path / "finetune.log")
    assert r.rc == 2 and "Traceback" not in r.text(), r.text()[-2000:]
    assert re.search(r"--finetune --load \S+: there is no checkpoint", r.text())
    assert not empty.exists()


# ------------------------------------------------------------------ 1, 5. restart after a lost window
def test_restart_restores_a_side_copy_and_never_resaves_the_same_iteration(dense_reference, tmp_path):
    ref, _ = dense_reference
    root = tmp_path / "run"
    shutil.copytree(ref, root)
    # A kill between the renames of a re-save of iteration 6 ...
    subprocess.run("mv iter_0000006 .trash-iter_0000006-x && cp -a .trash-iter_0000006-x .staging-iter_0000006-y",
                   shell=True, check=True, cwd=root)
    # ... plus what other kills leave: a cut staging directory and temporary files.
    (root / ".staging-iter_0000008-cut").mkdir()
    (root / ".latest_checkpointed_iteration.txt.tmp-deadbeef").write_text("8")
    (root / ".metrics.jsonl.tmp-0badcafe").write_text("{")
    # The restart resumes at iteration 6 (nothing left to train). The trainer must not save 6
    # again: if it did, the armed hook would SIGKILL it between the renames.
    r = faultlib.run(train_argv(root), tmp_path / "restart.log",
                     env={"BTX_FAULT_POINT": "publish-between-renames"})
    assert r.rc == 0, r.text()[-3000:]
    assert "resuming from --load" in r.text() and re.search(r"loaded \S+ -> iteration 6", r.text())
    assert saved_lines(r.text()) == []
    assert tracker(root) == 6 and complete(iter_dir(root, 6)) and debris(root) == []
    assert not differences(faultlib.checkpoint_state(iter_dir(ref, 6)), faultlib.checkpoint_state(iter_dir(root, 6)))


# ------------------------------------------------------------------ 1, 7. signals at a save iteration
# Slow tier: the default tier's SLURM branch flow (tests/slurm) already runs signal -> save -> exit 0 ->
# resume bit-exact through the job script; this one adds the signal landing on a save-interval iteration.
@pytest.mark.slow
def test_signal_at_a_save_interval_iteration_saves_once_and_resumes_bit_exact(dense_reference, tmp_path, runs):
    ref, _ = dense_reference
    root = tmp_path / "run"
    argv = train_argv(root)
    for sig, at in ((signal.SIGTERM, 2), (signal.SIGUSR1, 4)):
        # The signal arrives while iteration `at` is being saved on schedule (the hook pauses
        # the save and says so); the run must finish that save, not save `at` a second time,
        # and exit 0.
        run = faultlib.start(argv, tmp_path / f"{sig.name}.log",
                             env={"BTX_FAULT_POINT": f"save-start@{at}", "BTX_FAULT_ACTION": "pause:2"})
        runs.append(run)
        assert run.wait_for(rf"\[fault-point\] save-start@{at}"), run.text()[-3000:]
        sent = time.time()
        run.send(sig)
        assert run.wait() == [0], run.text()[-3000:]
        print(f"{sig.name} at iteration {at}: saved and exited {time.time() - sent:.1f}s after the signal")
        assert f"exit signal received at iteration {at}" in run.text()
        assert saved_lines(run.text()) == [f"saved checkpoint {iter_dir(root, at)}"]
        assert tracker(root) == at and iterations_on_disk(root) == list(range(2, at + 1, 2))
        assert debris(root) == []
    done = faultlib.run(argv, tmp_path / "finish.log")
    assert done.rc == 0, done.text()[-3000:]
    assert_same_training(ref, root, iterations=6)


# ------------------------------------------------------------------ 6. metrics after SIGKILL + resume
@pytest.mark.slow  # every fault-injection chain checks one record per iteration in the default tier
def test_metrics_hold_one_record_per_iteration_after_a_sigkill(dense_reference, tmp_path):
    ref, _ = dense_reference
    root = tmp_path / "run"
    argv = train_argv(root)
    # SIGKILL when the final save of iteration 6 starts: metrics.jsonl has records 1-6, the
    # latest checkpoint is 4, so iterations 5 and 6 are trained (and logged) again.
    killed = faultlib.run(argv, tmp_path / "killed.log", env={"BTX_FAULT_POINT": "save-start@6"})
    assert killed.rc == -signal.SIGKILL, killed.text()[-3000:]
    assert [r["iteration"] for r in metrics(root)] == [1, 2, 3, 4, 5, 6] and tracker(root) == 4
    resumed = faultlib.run(argv, tmp_path / "resumed.log")
    assert resumed.rc == 0, resumed.text()[-3000:]
    assert re.search(r"metrics: dropped \d+ record\(s\) after iteration 4", resumed.text())
    assert [r["iteration"] for r in metrics(root, "eval")] == [6]
    assert_same_training(ref, root, iterations=6)


# ------------------------------------------------------------------ 3. divergence
DIVERGENCE = {
    # Adam's first real step at LR 1e6 blows the weights up: the next loss or gradient is not finite.
    "non_finite": (["--lr", "1e6"], "--check-for-nan-in-loss-and-grad", r"not finite|nan|inf"),
    "loss_spike": (["--lr", "0.3", "--spiky-loss-factor", "1.3", "--spiky-loss-window", "2"], "--spiky-loss-factor",
                   r"loss spike"),
}


@pytest.mark.parametrize("case", list(DIVERGENCE), ids=list(DIVERGENCE))
def test_divergence_stops_with_a_clear_message_and_saves_nothing_after_it(tmp_path, case):
    extra, flag, what = DIVERGENCE[case]
    root = tmp_path / "run"
    r = faultlib.run(train_argv(root, iters=8, interval=1, extra=extra), tmp_path / "run.log")
    text = r.text()
    assert r.rc == 1, text[-3000:]
    stop = [line for line in text.splitlines() if line.startswith("stopped:")]
    assert len(stop) == 1 and "Traceback" not in text, text[-3000:]
    bad = int(re.search(r"training stopped at iteration (\d+)", stop[0]).group(1))
    assert re.search(what, stop[0], re.I) and flag in stop[0], stop[0]
    # Every iteration before it was saved (--save-interval 1); nothing at or after it.
    assert bad >= 2 and tracker(root) == bad - 1 and iterations_on_disk(root) == list(range(1, bad))
    assert f"last good checkpoint is iteration {bad - 1}" in stop[0] and debris(root) == []
    assert max(rec["iteration"] for rec in metrics(root)) < bad


# ------------------------------------------------------------------ 4. disk full
def _mount_tmpfs(path: Path, size_bytes: int) -> None:
    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({proc.stderr.strip() or proc.returncode}); "
                    "needs root or CAP_SYS_ADMIN")


def test_disk_full_save_fails_cleanly_and_the_run_restarts_elsewhere(dense_reference, tmp_path):
    ref, _ = dense_reference
    ckpt_bytes = sum(f.stat().st_size for f in iter_dir(ref, 2).iterdir())
    small = tmp_path / "small"
    # Room for the first checkpoint (and the run's small files), not for the second.
    _mount_tmpfs(small, (int(ckpt_bytes * 1.5) // 4096 + 16) * 4096)
    try:
        root = small / "run"
        r = faultlib.run(train_argv(root), tmp_path / "full.log")
        text = r.text()
        assert r.rc == 1 and "Traceback" not in text, text[-3000:]
        stop = [line for line in text.splitlines() if line.startswith("stopped:")]
        assert len(stop) == 1, text[-3000:]
        assert f"saving iteration 4 to --save {root} failed" in stop[0]
        assert re.search(r"[\d.,]+ MiB free\b.* needs about [\d.,]+ MiB", stop[0]), stop[0]
        assert "latest checkpoint (iteration 2) is intact" in stop[0]
        assert tracker(root) == 2 and iterations_on_disk(root) == [2] and complete(iter_dir(root, 2))
        assert debris(root) == [], debris(root)
        # The fix the message names: point --save elsewhere and restart.
        other = tmp_path / "elsewhere"
        argv = TINY_DENSE + ["--train-iters", "6", "--save-interval", "2", "--log-interval", "1",
                             "--load", str(root), "--save", str(other)]
        again = faultlib.run(argv, tmp_path / "elsewhere.log")
        assert again.rc == 0, again.text()[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert tracker(other) == 6
    assert not differences(faultlib.checkpoint_state(iter_dir(ref, 6)), faultlib.checkpoint_state(iter_dir(other, 6)))
    keys = ("iteration", "loss", "lr", "grad_norm")
    assert [[m[k] for k in keys] for m in metrics(other)] == [[m[k] for k in keys] for m in metrics(ref)[2:]]


# ------------------------------------------------------------------ 7. parents and children
PARENT = """
import sys
from pathlib import Path
from btx_megatron.runtime.processes import run_logged
run_logged(sys.argv[2:], Path(sys.argv[1]), "train")
"""


def _training_processes(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and "btx_megatron.pretrain" in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _wait_gone(marker: str, timeout: float) -> float:
    start = time.time()
    while _training_processes(marker):
        if time.time() - start > timeout:
            raise AssertionError(f"training processes still running: {_training_processes(marker)}")
        time.sleep(0.1)
    return time.time() - start


def _wait_log(path: Path, pattern: str, timeout: float = 600) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if match:
            return match
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {path}:\n{path.read_text(errors='replace')[-3000:] if path.exists() else ''}")


@pytest.mark.slow  # a pipeline, a launcher and a trainer
def test_a_signal_to_the_parent_reaches_the_child_and_a_killed_parent_leaves_no_trainer(tmp_path):
    root = tmp_path / "run"
    log = tmp_path / "train.log"
    argv = TINY_DENSE + ["--train-iters", "1000", "--log-interval", "1", "--save", str(root), "--load", str(root)]
    command = [sys.executable, "-c", PARENT, str(log), sys.executable, "-m", "btx_megatron.pretrain", *argv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    parents = []
    try:
        # SIGTERM to the parent (e.g. the pipeline under SLURM) is forwarded: the child saves and exits 0.
        parent = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        parents.append(parent)
        _wait_log(log, r"iter 2/1000")
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=300)
        first = int(_wait_log(log, r"exit signal received at iteration (\d+)").group(1))
        assert _wait_gone(str(root), 60) >= 0 and tracker(root) == first >= 2
        assert "stopped by SIGTERM" in parent.stderr.read()
        # SIGKILL of the parent: PDEATHSIG gives the child SIGTERM; it saves and exits.
        parent = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        parents.append(parent)
        _wait_log(log, rf"iter {first + 2}/1000")
        parent.kill()
        parent.wait()
        gone = _wait_gone(str(root), 120)
        second = int(re.findall(r"exit signal received at iteration (\d+)", log.read_text())[-1])
        print(f"trainer saved and exited {gone:.1f}s after its parent was SIGKILLed")
        assert second >= first + 2 and tracker(root) == second and complete(iter_dir(root, second))
        assert debris(root) == []
    finally:
        for p in parents:
            if p.poll() is None:
                p.kill()
        for pid in _training_processes(str(root)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_workers_of_a_killed_torchrun_save_and_exit(tmp_path):
    # The trainer asks for PDEATHSIG itself (exit_with_parent): when torchrun is SIGKILLed, each
    # worker gets SIGTERM, and together they save and exit instead of training on as orphans.
    root = tmp_path / "run"
    log = tmp_path / "train.log"
    argv = TINY_DENSE + ["--use-distributed-optimizer", "--train-iters", "1000", "--log-interval", "1",
                         "--save", str(root), "--load", str(root)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(faultlib.free_port()), "-m", "btx_megatron.pretrain", *argv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        agent = subprocess.Popen(torchrun, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_log(log, r"iter 3/1000")
        agent.kill()
        agent.wait()
        gone = _wait_gone(str(root), 180)
        stopped = int(_wait_log(log, r"exit signal received at iteration (\d+)", 10).group(1))
        print(f"torchrun workers saved and exited {gone:.1f}s after torchrun was SIGKILLed")
        assert stopped >= 3 and tracker(root) == stopped and complete(iter_dir(root, stopped))
        assert debris(root) == []
    finally:
        if agent.poll() is None:
            agent.kill()
        for pid in _training_processes(str(root)):
            os.kill(pid, signal.SIGKILL)
