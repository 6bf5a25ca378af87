"""``tools/merge_branches.py --workers N``: one process forks N workers after its imports
(btx_megatron.runtime.distributed.run_forked_group). The workers write exactly the tensors of a
one-process merge; a worker's failure is the tool's, with its message and no output; and no
worker outlives the tool.

The in-process calls fork the test process itself, as the tool forks itself, once it looks like
a tool that just started (:func:`merge_fixtures.as_fresh_tool_process`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.merge.merge_fixtures import LAUNCH_VARS, as_fresh_tool_process, iter_dir, merge, read_dcp
from tests.tools import TOOLS, load_tool


@pytest.fixture
def tool(monkeypatch):
    as_fresh_tool_process(monkeypatch)
    return load_tool("merge_branches")


def _argv(work, output, *extra) -> list[str]:
    return [a for n, p in work["branches"] for a in ("--branch", f"{n}={p}")] + ["--output", str(output), "--quiet",
                                                                                  *extra]


def _layout(root) -> dict:
    """Every entry of the DCP metadata: key -> global shape (None for a bytes entry)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(iter_dir(root))).read_metadata().state_dict_metadata
    return {k: tuple(getattr(v, "size", ()) or ()) or None for k, v in md.items()}


def test_workers_write_the_one_process_tensors(work, tmp_path, tool):
    out = tmp_path / "w2"
    assert tool.main(_argv(work, out, "--workers", "2")) == 0
    assert _layout(out) == _layout(work["merged"])
    one, two = read_dcp(iter_dir(work["merged"])), read_dcp(iter_dir(out))
    assert set(one) == set(two)
    for k in one:
        assert one[k].dtype == two[k].dtype and torch.equal(one[k], two[k]), k
    assert sorted(p.name for p in iter_dir(out).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((iter_dir(out) / "btx_checkpoint.json").read_text())["btx"]["merge_world_size"] == 2
    assert not list(tmp_path.glob(".staging-*"))
    assert not torch.distributed.is_initialized()  # the group lived in the workers only


@pytest.mark.parametrize("action,code,message", [
    ("raise", 2, "merge_branches: error: rank 1: injected fault at merge-data-rank1"),
    ("kill", 1, "merge_branches: error: worker 1 of 2 (pid "),
], ids=["error", "killed"])
def test_a_failing_worker_fails_the_tool(work, tmp_path, tool, monkeypatch, capfd, action, code, message):
    """Worker 1 fails after streaming its share: an error of its own (an OSError, as from a disk)
    reaches the tool as the merge's one-line error; a SIGKILLed worker is named with its signal.
    Nothing is published and the staging directory is gone."""
    monkeypatch.setenv("BTX_FAULT_POINT", "merge-data-rank1")
    monkeypatch.setenv("BTX_FAULT_ACTION", action)
    out = tmp_path / "failed"
    assert tool.main(_argv(work, out, "--workers", "2")) == code
    last = capfd.readouterr().err.strip().splitlines()[-1]  # the first failure's message, no traceback
    assert last.startswith(message) and (action != "kill" or last.endswith(") was killed by SIGKILL")), last
    assert not out.exists()
    assert not list(tmp_path.glob(".staging-*"))


def test_workers_refused_under_torchrun(work, tmp_path, tool, monkeypatch, capfd):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert tool.main(_argv(work, tmp_path / "x", "--workers", "2")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be combined with torchrun (WORLD_SIZE=2)" in err[0], err
    assert not (tmp_path / "x").exists()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signalled_tool_leaves_no_worker_and_no_output(work, tmp_path, sig):
    """The tool is signalled while worker 0 is mid-merge: SIGTERM is forwarded (the workers clean
    up, the tool says it was stopped), SIGKILL takes the workers with it (PDEATHSIG; the staging
    directory is left for the next run, which removes it). No worker survives, nothing is published."""
    out = tmp_path / "signalled"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS + ("PYTHONPATH",)}
    env.update(BTX_FAULT_POINT="merge-data-rank0", BTX_FAULT_ACTION="pause:60")
    proc = subprocess.Popen([sys.executable, str(TOOLS / "merge_branches.py"), *_argv(work, out, "--workers", "2")],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    workers = []
    try:
        for line in proc.stderr:  # worker 0 is paused mid-merge once it says so
            if line.startswith("[fault-point] merge-data-rank0"):
                break
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)  # EOF only once every worker has closed stderr too
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers)
        assert proc.returncode != 0
        assert not out.exists()
        if sig == signal.SIGTERM:
            assert "merge_branches: error: stopped by SIGTERM" in err, err
            assert not list(tmp_path.glob(".staging-*"))
        else:
            merge(out, work["branches"])  # the next run removes the debris
            assert not list(tmp_path.glob(".staging-*"))
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
