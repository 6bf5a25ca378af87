"""Fault injection: SIGKILLs of training at every stage of a run and of the offline tools.

Every interrupted run is restarted with the same start-or-resume command and must end
bit-identical (weights, optimizer state, RNG, scheduler, and the logged losses) to an
uninterrupted run; no kill may lose the latest checkpoint (the tracker never goes back and
always names a complete checkpoint, or one the next start restores). Killed tools leave no
partial output, and their next run leaves no debris.

Kills are real SIGKILLs: from the test (at a log line, or while a fault point pauses the
process) or by the process itself at a fault point (``BTX_FAULT_POINT``, see
``btx_megatron.checkpoint.io.fault_point``). The default tier runs one deterministic chain
per layout (1 process; DP2 with the distributed optimizer; EP2 MoE; async saves). The random
campaign is ``@pytest.mark.slow`` (``make test-slow``)::

    BTX_FAULT_SEED=1 BTX_FAULT_KILLS=40 python -m pytest -m slow -s tests/training/test_fault_injection.py
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.training import faultlib
from tests.training.faultlib import (TINY_DENSE, TINY_MOE, assert_same_training, complete, debris, iter_dir, tracker, train_argv)

TRACKER_WRITE = "write-latest_checkpointed_iteration.txt"
DP2 = TINY_DENSE + ["--use-distributed-optimizer"]
EP2 = TINY_MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]


# ------------------------------------------------------------------------------ bookkeeping
@dataclass
class Figures:
    kills: int = 0
    lost: list[str] = field(default_factory=list)
    sigterms: list[float] = field(default_factory=list)      # seconds from SIGTERM to a saved exit
    async_sigterms: list[float] = field(default_factory=list)
    sigterms_sent: int = 0
    bit_exact: int = 0
    episodes: int = 0
    notes: list[str] = field(default_factory=list)

    def report(self, title: str) -> str:
        longest = f"{max(self.sigterms):.1f}s" if self.sigterms else "n/a"
        longest_async = f"{max(self.async_sigterms):.1f}s" if self.async_sigterms else "n/a"
        return (f"\n[{title}] kills performed {self.kills}, checkpoints lost {len(self.lost)}, runs that resumed "
                f"bit-exact {self.bit_exact}/{self.episodes}, SIGTERMs sent {self.sigterms_sent}, saved exits "
                f"{len(self.sigterms)} sync + {len(self.async_sigterms)} async: longest SIGTERM-to-saved-exit "
                f"{longest} sync, {longest_async} async"
                + "".join(f"\n  lost: {x}" for x in self.lost) + "".join(f"\n  note: {x}" for x in self.notes))


def recoverable(root: Path) -> bool:
    """The tracked checkpoint is complete, or a complete side copy the next start restores."""
    t = tracker(root)
    if t is None:
        return True
    if complete(iter_dir(root, t)):
        return True
    return any(complete(p) for p in root.glob(f".*-iter_{t:07d}-*") if p.name.startswith((".staging-", ".trash-")))


def check_after_interruption(root: Path, before: int | None, what: str, figures: Figures) -> int | None:
    after = tracker(root)
    if not recoverable(root) or (before is not None and (after is None or after < before)):
        figures.lost.append(f"{what}: tracker {before} -> {after}, recoverable {recoverable(root)}")
    return after


@dataclass
class Interruption:
    kind: str            # "kill-at-line", "fault", "pause-kill", "sigterm-at-line", "kill-after", "sigterm-after"
    arg: str | float

    def __str__(self) -> str:
        return f"{self.kind}({self.arg})"


def interrupt(step: Interruption, argv: list[str], log: Path, world: int, figures: Figures, is_async: bool,
              started: list) -> None:
    """One start of the run, ended by ``step``; the run may also finish first (then nothing happens)."""
    env = {}
    if step.kind == "fault":
        env = {"BTX_FAULT_POINT": step.arg}
    elif step.kind == "pause-kill":
        env = {"BTX_FAULT_POINT": step.arg, "BTX_FAULT_ACTION": "pause:60"}
    run = faultlib.start(argv, log, world=world, env=env)
    started.append(run)
    if step.kind in ("kill-at-line", "sigterm-at-line"):
        found = run.wait_for(step.arg)
    elif step.kind == "pause-kill":
        found = run.wait_for(r"\[fault-point\] " + re.escape(str(step.arg)))
    elif step.kind == "kill-after":  # anywhere: start-up, steps, saves
        time.sleep(float(step.arg))
        found = run.alive()
    elif step.kind == "sigterm-after":  # while it trains: a scheduler's warning comes at any moment
        found = run.wait_for(r"\] iter 1/") and run.alive()
        time.sleep(float(step.arg))
        found = found and run.alive()
    else:  # the process kills itself at the fault point
        codes = run.wait(grace=5)
        if any(c == -signal.SIGKILL for c in codes):
            figures.kills += 1
        return
    if not found or not run.alive():
        run.wait(grace=5)
        return
    if step.kind.startswith("sigterm"):
        sent = time.time()
        run.send(signal.SIGTERM)
        codes = run.wait(grace=5)
        figures.sigterms_sent += 1
        if codes == [0] * world and "exit signal received" in run.text():
            (figures.async_sigterms if is_async else figures.sigterms).append(time.time() - sent)
        else:
            figures.notes.append(f"SIGTERM without a saved exit: exit codes {codes}")
        return
    run.kill()
    figures.kills += 1


def episode(root: Path, model: list[str], world: int, reference: Path, steps: list[Interruption],
            figures: Figures, extra: list[str] | None = None, started: list | None = None) -> None:
    """Interrupt a run with each of ``steps`` in turn, then let it finish; it must equal ``reference``."""
    argv = train_argv(root, model=model, extra=extra)
    is_async = "--async-save" in argv
    started = started if started is not None else []
    before = None
    for i, step in enumerate(steps):
        interrupt(step, argv, root.parent / f"{root.name}.{i}.log", world, figures, is_async, started)
        before = check_after_interruption(root, before, f"{root.name} {step}", figures)
    expected = before
    final = faultlib.run(argv, root.parent / f"{root.name}.final.log", world=world)
    figures.episodes += 1
    assert final.codes == [0] * world, final.text()[-4000:]
    if expected is not None:
        loaded = re.search(r"loaded \S+ -> iteration (\d+)", final.text())
        if loaded is None or int(loaded.group(1)) != expected:
            figures.lost.append(f"{root.name}: the restart did not resume from iteration {expected}")
    assert debris(root) == [], debris(root)
    assert_same_training(reference, root, iterations=6)
    figures.bit_exact += 1


# ------------------------------------------------------------------------------ references
@pytest.fixture(scope="module")
def dp2_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref-dp2") / "run"
    run = faultlib.run(train_argv(root, model=DP2), root.parent / "run.log", world=2)
    assert run.codes == [0, 0], run.text()[-3000:]
    return root


@pytest.fixture(scope="module")
def ep2_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref-ep2") / "run"
    run = faultlib.run(train_argv(root, model=EP2), root.parent / "run.log", world=2)
    assert run.codes == [0, 0], run.text()[-3000:]
    return root


# ------------------------------------------------------------------------------ CI subset
EVERY_STAGE = [
    Interruption("kill-at-line", r"\[start\]"),                 # start-up
    Interruption("kill-at-line", r"iter 3/6"),                  # between steps (2 saved)
    Interruption("pause-kill", "save-written@4"),              # during a save: files written, not published
    Interruption("fault", "publish-before-tracker@4"),          # published, tracker not yet replaced
    Interruption("fault", "publish-between-renames@4"),         # re-publishing 4: old copy moved aside
    Interruption("fault", TRACKER_WRITE),                       # during the tracker write
]


def test_kills_at_every_stage_of_a_run_end_bit_exact(dense_reference, tmp_path, runs):
    figures = Figures()
    episode(tmp_path / "run", TINY_DENSE, 1, dense_reference[0], EVERY_STAGE, figures, started=runs)
    print(figures.report("1 process"))
    assert figures.kills == len(EVERY_STAGE) and not figures.lost


@pytest.mark.slow  # the 1-process chain runs in the default tier
def test_kills_of_dp2_distributed_optimizer_end_bit_exact(dp2_reference, tmp_path, runs):
    figures = Figures()
    steps = [
        Interruption("pause-kill", "save-written@4"),           # every rank paused in the save, all killed
        Interruption("fault", "publish-before-tracker@4"),      # rank 0 dies; rank 1 is killed like torchrun would
        Interruption("fault", "publish-between-renames@4"),
    ]
    episode(tmp_path / "run", DP2, 2, dp2_reference, steps, figures, started=runs)
    print(figures.report("DP2 distributed optimizer"))
    assert figures.kills == len(steps) and not figures.lost


@pytest.mark.slow  # the 1-process chain runs in the default tier
def test_kills_of_ep2_moe_end_bit_exact(ep2_reference, tmp_path, runs):
    figures = Figures()
    steps = [
        Interruption("kill-at-line", r"iter 3/6"),              # between steps, both ranks
        Interruption("fault", TRACKER_WRITE),
    ]
    episode(tmp_path / "run", EP2, 2, ep2_reference, steps, figures, started=runs)
    print(figures.report("EP2 MoE"))
    assert figures.kills == len(steps) and not figures.lost


def _writer_processes(log: Path) -> list[int]:
    """Live processes whose stdout is ``log``: the trainer and anything it forked or spawned."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "fd" / "1") == str(log):
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_async_save_killed_while_writing_never_becomes_latest(dense_reference, tmp_path, runs):
    root = tmp_path / "run"
    argv = train_argv(root, extra=["--async-save"])
    # The background writer of iteration 4 pauses while training goes on; the trainer is SIGKILLed.
    log = tmp_path / "killed.log"
    run = faultlib.start(argv, log, env={"BTX_FAULT_POINT": "async-write@4", "BTX_FAULT_ACTION": "pause:60"})
    runs.append(run)
    assert run.wait_for(r"\[fault-point\] async-write@4"), run.text()[-3000:]
    run.kill()
    deadline = time.time() + 30
    while _writer_processes(log) and time.time() < deadline:  # PDEATHSIG reaches the writer
        time.sleep(0.1)
    assert _writer_processes(log) == [], "the background writer outlived the trainer"
    assert tracker(root) == 2 and not iter_dir(root, 4).exists() and complete(iter_dir(root, 2))
    assert any(name.startswith(".staging-iter_0000004-") for name in debris(root))
    done = faultlib.run(argv, tmp_path / "resumed.log")
    assert done.rc == 0, done.text()[-3000:]
    assert re.search(r"loaded \S+ -> iteration 2", done.text())
    assert debris(root) == []
    assert_same_training(dense_reference[0], root, iterations=6)


# ------------------------------------------------------------------------------ the tools
def _wait_path(pattern: str, parent: Path, run: faultlib.Run, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and run.alive():
        if list(parent.glob(pattern)):
            return True
        time.sleep(0.01)
    return False


def _kill_tool(entry: str, argv: list[str], output: Path, log: Path, runs: list, how: str) -> list[str] | None:
    """One killed run of a tool; returns the names it left next to ``output`` (None: the tool
    finished before the external kill could land, which a fast machine may do)."""
    env = {"BTX_FAULT_POINT": how} if how != "while-writing" else {}
    run = faultlib.start(argv, log, entry=entry, env=env)
    runs.append(run)
    if how == "while-writing":
        if not _wait_path(f".staging-{output.name}-*", output.parent, run):
            assert run.wait() == [0], run.text()[-3000:]
            shutil.rmtree(output)
            return None
        run.kill()
    else:
        run.wait()
    assert run.rc == -signal.SIGKILL, run.text()[-3000:]
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("tool", ["merge", "hf_export", "hf_import"])
def test_killed_tools_leave_no_partial_output_and_no_debris_after_the_next_run(dense_reference, tmp_path, runs,
                                                                             tool):
    ref, _ = dense_reference
    out = tmp_path / "out"
    if tool == "merge":
        entry, argv = "tools/merge_branches.py", ["--branch", f"a={ref}", "--branch", f"b={iter_dir(ref, 4)}",
                                                  "--output", str(out)]
    elif tool == "hf_export":
        entry, argv = "tools/convert_hf.py", ["export", "--load", str(ref), "--output", str(out), "--no-progress"]
    else:
        hf = tmp_path / "hf"
        exported = faultlib.run(["export", "--load", str(ref), "--output", str(hf), "--no-progress"],
                                tmp_path / "export.log", entry="tools/convert_hf.py")
        assert exported.rc == 0, exported.text()[-3000:]
        entry, argv = "tools/convert_hf.py", ["import", "--hf-dir", str(hf), "--output", str(out), "--no-progress"]
    log = tmp_path / "tool.log"
    # An external SIGKILL while it writes (best effort: the tiny model writes in milliseconds);
    # a SIGKILL while it writes the checkpoint manifest (tools that write a checkpoint); one
    # just before it moves the finished output into place.
    kills = ["while-writing"] + (["write-btx_checkpoint.json"] if tool != "hf_export" else []) + ["publish-output"]
    for how in kills:
        left = _kill_tool(entry, argv, out, log, runs, how)
        assert not out.exists(), f"{tool} killed {how} left a partial {out}"
        assert left is None or left, f"{tool} killed {how} left nothing: was it killed before it wrote anything?"
    done = faultlib.run(argv, log, entry=entry)
    assert done.rc == 0, done.text()[-3000:]
    first = _listing(out)
    assert first and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # Replacing it: a kill between the two renames leaves the new copy and the old one aside;
    # the next run removes both and writes a complete output.
    _kill_tool(entry, argv + ["--overwrite"], out, log, runs, "publish-output-between-renames")
    done = faultlib.run(argv + ["--overwrite"], log, entry=entry)
    assert done.rc == 0, done.text()[-3000:]
    assert _listing(out) == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _listing(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file()
                  and p.name != "btx_output.json")


# ------------------------------------------------------------------------------ the campaign
FAULT_POINTS = ["save-start", "save-written", "publish-between-renames", "publish-before-tracker", TRACKER_WRITE]


def _random_steps(rng: random.Random, duration: float, is_async: bool) -> list[Interruption]:
    steps = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["kill-after", "kill-after", "fault", "pause-kill", "sigterm-after"])
        if kind == "kill-after":
            steps.append(Interruption(kind, round(rng.uniform(0.0, duration), 2)))
            continue
        if kind == "sigterm-after":  # seconds after the first step
            steps.append(Interruption(kind, round(rng.uniform(0.0, duration / 3), 2)))
            continue
        points = FAULT_POINTS + (["async-write"] if is_async else [])
        point = rng.choice(points)
        if point != TRACKER_WRITE:
            point += f"@{rng.choice([2, 4, 6])}"
        if kind == "pause-kill" and point.startswith(("publish-", "write-", "async-write")):
            kind = "fault"  # rank 0 only or in a forked writer: kill there, not from outside
        steps.append(Interruption(kind, point))
    return steps


@pytest.mark.slow
def test_random_kill_campaign(dense_reference, dp2_reference, ep2_reference, tmp_path, runs):
    seed = int(os.environ.get("BTX_FAULT_SEED", "1234"))
    budget = int(os.environ.get("BTX_FAULT_KILLS", "30"))
    rng = random.Random(seed)
    layouts = [("dense", TINY_DENSE, 1, dense_reference[0], []),
               ("dense-async", TINY_DENSE, 1, dense_reference[0], ["--async-save"]),
               ("dp2", DP2, 2, dp2_reference, []),
               ("ep2", EP2, 2, ep2_reference, []),
               ("dp2-async", DP2, 2, dp2_reference, ["--async-save"])]
    durations: dict[str, float] = {}
    figures = Figures()
    started = time.time()
    index = 0
    while figures.kills < budget:
        name, model, world, reference, extra = layouts[index % len(layouts)]
        if name not in durations:  # an uninterrupted run of this layout sets the kill window
            t0 = time.time()
            probe = faultlib.run(train_argv(tmp_path / f"probe-{name}", model=model, extra=extra),
                                 tmp_path / f"probe-{name}.log", world=world)
            assert probe.codes == [0] * world, probe.text()[-3000:]
            assert_same_training(reference, tmp_path / f"probe-{name}", iterations=6)
            durations[name] = time.time() - t0
        steps = _random_steps(rng, durations[name] * 1.1, "--async-save" in extra)
        print(f"episode {index}: {name}: {', '.join(map(str, steps))}", flush=True)
        episode(tmp_path / f"e{index}-{name}", model, world, reference, steps, figures, extra=extra, started=runs)
        index += 1
    print(figures.report(f"campaign seed {seed}, {time.time() - started:.0f}s"))
    assert not figures.lost
