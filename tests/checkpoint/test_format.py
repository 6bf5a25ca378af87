"""The checkpoint format under kills: publish, tracker and clean-up.

Checkpoints here are stand-ins (a manifest, metadata.json and a payload file): the format only
looks at those. Kills are real: a small process calls ``publish`` and the fault-injection hook
(``BTX_FAULT_POINT``) SIGKILLs it at the named point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from btx_megatron import checkpoint as fmt

ROOT = Path(__file__).resolve().parents[2]

PUBLISH = """
import sys
from pathlib import Path
from btx_megatron.checkpoint import format as fmt
fmt.publish(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
"""


def make_checkpoint(path: Path, iteration: int, payload: str, manifest: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (path / "__0_0.distcp").write_text(payload)
    if manifest:
        (path / fmt.MANIFEST).write_text(json.dumps({"iteration": iteration}))
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A --save directory holding iterations 20 and 40; the tracker names 40."""
    root = tmp_path / "run"
    make_checkpoint(fmt.iteration_dir(root, 20), 20, "weights-20")
    make_checkpoint(fmt.iteration_dir(root, 40), 40, "weights-40")
    (root / fmt.TRACKER).write_text("40\n")
    return root


def publish_killed_at(point: str, staging: Path, root: Path, iteration: int) -> int:
    """Run ``publish`` in its own process with the hook armed at ``point``; its return code."""
    env = {**os.environ, "BTX_FAULT_POINT": point}
    proc = subprocess.run([sys.executable, "-c", PUBLISH, str(staging), str(root), str(iteration)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode


def payload(ckpt: Path) -> str:
    return (ckpt / "__0_0.distcp").read_text()


def debris(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_kill_between_the_renames_of_a_resave_keeps_the_tracked_iteration(run_dir):
    # Re-publishing iteration 40 (the tracked one) moves the old copy aside, then renames the new
    # one into place. A SIGKILL in between leaves the tracker naming a missing directory.
    staging = make_checkpoint(fmt.new_staging_dir(run_dir, 40, "resave"), 40, "weights-40-again")
    assert publish_killed_at("publish-between-renames", staging, run_dir, 40) == -signal.SIGKILL
    assert fmt.read_tracker(run_dir) == 40 and not fmt.iteration_dir(run_dir, 40).exists()
    assert any(name.startswith(".trash-iter_0000040-") for name in debris(run_dir))
    with pytest.raises(fmt.CheckpointError, match="missing or incomplete"):
        fmt.resolve(run_dir)
    # The next start puts a complete copy back before it removes any debris.
    fmt.clean_stale_staging(run_dir)
    ckpt, iteration = fmt.resolve(run_dir)
    assert iteration == 40 and payload(ckpt) in ("weights-40", "weights-40-again")
    assert debris(run_dir) == [] and payload(fmt.iteration_dir(run_dir, 20)) == "weights-20"


def test_issue_reproduction_side_copies_of_the_tracked_iteration(run_dir):
    # A kill between the renames, by hand: mv iter_0000040 .trash-iter_0000040-x; cp -a .trash-iter_0000040-x .staging-iter_0000040-y
    subprocess.run("mv iter_0000040 .trash-iter_0000040-x && cp -a .trash-iter_0000040-x .staging-iter_0000040-y",
                   shell=True, check=True, cwd=run_dir)
    removed = fmt.clean_stale_staging(run_dir)
    ckpt, iteration = fmt.resolve(run_dir)
    assert (ckpt.name, iteration, payload(ckpt)) == ("iter_0000040", 40, "weights-40")
    assert debris(run_dir) == [] and len(removed) == 1  # the other copy is debris now


def test_kill_before_the_tracker_keeps_the_previous_latest(run_dir):
    staging = make_checkpoint(fmt.new_staging_dir(run_dir, 60, "n1"), 60, "weights-60")
    assert publish_killed_at("publish-before-tracker", staging, run_dir, 60) == -signal.SIGKILL
    # iter_0000060 is in place but the tracker still names 40: a restart resumes from 40 and
    # saves 60 again (replacing the untracked copy).
    assert fmt.resolve(run_dir) == (fmt.iteration_dir(run_dir, 40), 40)
    assert fmt.is_checkpoint_dir(fmt.iteration_dir(run_dir, 60))
    again = make_checkpoint(fmt.new_staging_dir(run_dir, 60, "n2"), 60, "weights-60-again")
    fmt.publish(again, run_dir, 60)
    assert fmt.resolve(run_dir) == (fmt.iteration_dir(run_dir, 60), 60)
    assert payload(fmt.iteration_dir(run_dir, 60)) == "weights-60-again" and debris(run_dir) == []


def test_kill_during_the_tracker_write_leaves_the_old_tracker_and_removable_debris(run_dir):
    staging = make_checkpoint(fmt.new_staging_dir(run_dir, 60, "n1"), 60, "weights-60")
    assert publish_killed_at(f"write-{fmt.TRACKER}", staging, run_dir, 60) == -signal.SIGKILL
    assert fmt.read_tracker(run_dir) == 40  # the rename of the new tracker never happened
    leftovers = debris(run_dir)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{fmt.TRACKER}.tmp-")
    (run_dir / ".metrics.jsonl.tmp-0123abcd").write_text("{")  # a killed atomic write elsewhere
    fmt.clean_stale_staging(run_dir)
    assert debris(run_dir) == [] and fmt.resolve(run_dir)[1] == 40


def test_only_a_complete_side_copy_is_restored(run_dir):
    # The moved-aside old copy is complete; the staging copy was cut short (no manifest yet).
    os.replace(fmt.iteration_dir(run_dir, 40), run_dir / ".trash-iter_0000040-old")
    make_checkpoint(fmt.new_staging_dir(run_dir, 40, "cut"), 40, "half", manifest=False)
    assert fmt.restore_tracked(run_dir) == fmt.iteration_dir(run_dir, 40)
    assert payload(fmt.iteration_dir(run_dir, 40)) == "weights-40"
    # With no complete copy at all nothing is invented: the tracker keeps naming a missing
    # iteration and loading says so.
    os.replace(fmt.iteration_dir(run_dir, 40), run_dir / ".staging-iter_0000040-nomanifest")
    (run_dir / ".staging-iter_0000040-nomanifest" / fmt.MANIFEST).unlink()
    assert fmt.restore_tracked(run_dir) is None
    fmt.clean_stale_staging(run_dir)
    with pytest.raises(fmt.CheckpointError, match="names iteration 40"):
        fmt.resolve(run_dir)


def test_every_rank_may_restore_at_once(tmp_path):
    # plan_start runs on every rank before the process group exists: concurrent restores must
    # end with one complete iter_0000040 and never delete the copy another rank just restored.
    # (A check-then-delete version of the restore fails about one attempt in 25 here.)
    for attempt in range(100):
        root = tmp_path / f"r{attempt}"
        make_checkpoint(root / ".trash-iter_0000040-a", 40, "weights-40")
        make_checkpoint(root / ".staging-iter_0000040-b", 40, "weights-40")
        (root / fmt.TRACKER).write_text("40\n")
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=lambda: (barrier.wait(), fmt.restore_tracked(root))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert fmt.is_checkpoint_dir(fmt.iteration_dir(root, 40)), attempt
        assert payload(fmt.iteration_dir(root, 40)) == "weights-40"


def test_a_tool_output_loses_only_its_own_debris(tmp_path):
    out = tmp_path / "merged"
    (tmp_path / ".staging-merged-0123456789").mkdir()           # a killed run of the tool
    (tmp_path / ".staging-merged-0123456789" / "__0_0.distcp").write_text("partial")
    (tmp_path / ".trash-merged-abcdef01").mkdir()                # killed while replacing
    (tmp_path / ".merged.tmp-1234abcd").write_text("{")         # killed atomic write
    (tmp_path / ".staging-other-0123456789").mkdir()            # another output's work
    (tmp_path / "merged2").mkdir()
    staging = fmt.staging_dir_for(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([staging.name, ".staging-other-0123456789", "merged2"])
    assert staging.name.startswith(".staging-merged-") and not any(staging.iterdir())
