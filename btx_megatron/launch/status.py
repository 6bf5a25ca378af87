"""Where each run of an experiment stands: one line per run (``tools/launch_branches.py status``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as fmt
from .plan import RunPlan


@dataclass
class RunStatus:
    name: str
    state: str                  # pending | running | submitted | done | stopped | failed
    iteration: int
    target: int
    tokens: int | None
    loss: float | None
    checkpoint: str | None
    detail: str = ""

    def line(self) -> str:
        tokens = f"{self.tokens / 1e6:.2f}M" if self.tokens is not None else "-"
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        ckpt = self.checkpoint or "-"
        text = (f"{self.name:<10} {self.state:<9} iter {self.iteration:>7}/{self.target:<7} tokens {tokens:>9} "
                f"loss {loss:>8}  ckpt {ckpt}")
        return text + (f"  ({self.detail})" if self.detail else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _last_train_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    last = None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("type") == "train":
                last = rec
    return last


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _slurm_state(job_id: str) -> str | None:
    if not shutil.which("squeue"):
        return None
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip().lower() or None


def status_of(run: RunPlan) -> RunStatus:
    tracker = None
    try:
        tracker = fmt.read_tracker(run.save_dir)
    except fmt.CheckpointError:
        pass
    rec = _last_train_record(run.save_dir / "metrics.jsonl")
    iteration = max(tracker or 0, int(rec["iteration"]) if rec else 0)
    launch = _read_json(run.run_dir / "launch.json")
    exit_info = _read_json(run.run_dir / "exit.json")
    slurm = _read_json(run.run_dir / "slurm.json")
    detail = ""
    if tracker is not None and tracker >= run.target_iters:
        state = "done"
    elif launch and not exit_info and _pid_alive(int(launch["pid"])) and launch.get("host") == socket.gethostname():
        state, detail = "running", f"pid {launch['pid']}"
    elif exit_info and exit_info.get("returncode") == 0:
        state, detail = "stopped", "saved and exited on a signal; relaunch to resume"
    elif exit_info:
        state, detail = "failed", f"exit code {exit_info.get('returncode')}; see {run.run_dir / 'logs' / 'train.log'}"
    elif launch and launch.get("host") == socket.gethostname() and not slurm:
        state, detail = "failed", "process gone without an exit record (killed)"
    elif slurm:
        sq = _slurm_state(str(slurm.get("job_id")))
        state = "running" if sq == "running" else "submitted" if sq else "submitted"
        detail = f"slurm job {slurm.get('job_id')}" + (f" {sq}" if sq else "")
    else:
        state = "pending"
    checkpoint = str(fmt.iteration_dir(run.save_dir, tracker)) if tracker is not None else None
    return RunStatus(run.name, state, iteration, run.target_iters,
                     int(rec["tokens"]) if rec and "tokens" in rec else None,
                     float(rec["loss"]) if rec and "loss" in rec else None, checkpoint, detail)


