"""The trainer's checkpoint component: where a run starts from, when it saves, and saving safely.

Start or resume, as in Megatron-LM: pass ``--load X --save X`` on every (re)start. When ``X``
holds no checkpoint yet the run starts from scratch (and says so); otherwise it resumes from
the latest one (model, optimizer, scheduler, RNG, data position). A ``--load`` that names
another checkpoint (the seed of a branch, with ``--finetune``) is used only until ``--save``
holds checkpoints of this run: a requeued job resumes its own progress.

A save that fails (disk full, permissions) is reported as one message naming the path and the
bytes it needs; its staging directory is removed at once and the previous checkpoint stays the
latest. The same iteration is never saved twice in a row.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from .. import checkpoint as fmt
from ..config import config_to_argv
from ..checkpoint.verify import verify_files
from ..runtime.distributed import device
from . import checkpointing
from .components import TrainingStopped


def _describe(exc: BaseException) -> str:
    """One line for a failed write. Megatron-Core reports a writer's failure as a
    ``CheckpointException`` (rank -> wrapped exception) around a RuntimeError that names only
    the class of the writer's error (``<class 'OSError'>``); the OSError itself, when it is in
    the chain, says the most."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = next(iter(failures.items()))
        return f"rank {rank}: {_describe(wrapped[0] if isinstance(wrapped, tuple) else wrapped)}"
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    chosen = seen if seen is not None else exc
    text = str(chosen).strip()
    hidden = re.search(r"error: <class '(\w+)'>", text)
    if hidden:
        return f"{hidden.group(1)} in the checkpoint writer"
    return f"{type(chosen).__name__}: {text.splitlines()[0] if text else ''}"


# torch's CheckpointException derives from BaseException, not Exception.
SAVE_ERRORS = (Exception, CheckpointException)


def plan_start(cfg) -> str:
    """Decide where the run starts, before anything is built; sets ``cfg.checkpoint.load`` /
    ``finetune`` accordingly, checks the checkpoint's files, and returns a one-line description.
    Raises ValueError naming the flag and the fix for a ``--load``/``--save`` pair that cannot
    work."""
    ck = cfg.checkpoint
    save = Path(ck.save) if ck.save else None
    if save is not None and save.exists() and not save.is_dir():
        raise ValueError(f"--save {save} is a file; give a directory for the checkpoints.")
    blocking = next((p for p in (save.parents if save is not None else ()) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--save {save} cannot be created: {blocking} is a file; give a directory path.")
    if save is not None and save.is_dir():
        # A kill between the two renames of a re-save leaves the tracked iteration as a complete
        # side copy: put it back before anything resolves the tracker (every rank may do this).
        fmt.restore_tracked(save)
    own = save is not None and save.is_dir() and fmt.read_tracker(save) is not None
    same = bool(ck.load) and save is not None and Path(ck.load).resolve() == save.resolve()
    if own and not ck.load and not ck.overwrite_save:
        raise ValueError(
            f"--save {save} already holds checkpoints of a run, and --load is not given. Resume it with "
            f"--load {save} --save {save} (start-or-resume), pick a new --save directory, or pass "
            "--overwrite-save to start over in it.")
    if own and ck.load and not ck.overwrite_save:
        # Not same: a SLURM requeue of a branch, whose own progress wins over the seed.
        description = (f"resuming from --load {save}" if same else f"resuming from own checkpoints in --save "
                       f"{save} (a restart resumes the run, not --load {ck.load})")
        ck.load, ck.finetune = str(save), False
    elif same:
        if ck.finetune:
            raise ValueError(f"--finetune --load {ck.load}: there is no checkpoint in {ck.load} to fine-tune from; "
                             "point --load at the model to start from (e.g. the seed).")
        ck.load = None
        return f"no checkpoint in --load {save} yet: starting from scratch (start-or-resume)"
    elif ck.load:
        description = f"{'fine-tuning from' if ck.finetune else 'resuming from'} --load {ck.load}"
    else:
        return "starting from scratch"
    ckpt_dir, _ = fmt.resolve(ck.load, "--load")
    verify_files(ckpt_dir, f"--load {ck.load}")
    return description


class Checkpointer:
    """Loads the start checkpoint, saves on schedule and at the end, records the run."""

    def __init__(self, cfg, setup, *, argv: list[str] | None, stage: str, manifest_extra: dict | None):
        self.cfg, self.setup = cfg, setup
        self.argv, self.stage, self.manifest_extra = argv, stage, manifest_extra
        self.rank = torch.distributed.get_rank()
        self.root = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
        self.last_saved: int | None = None
        self.async_queue = None
        self.in_flight: tuple[int, Path] | None = None   # an async save not yet published
        if cfg.checkpoint.async_save and self.root is not None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    # ---------------------------------------------------------------- start
    def load(self) -> tuple[int, int]:
        """(iteration, consumed samples) after loading ``--load`` (0, 0 without one)."""
        ck = self.cfg.checkpoint
        if not ck.load:
            return 0, 0
        iteration, consumed = checkpointing.load_checkpoint(self.cfg, self.setup.model, self.setup.optimizer,
                                                            self.setup.scheduler)
        if not ck.finetune and self.root is not None and fmt.read_tracker(self.root) == iteration:
            self.last_saved = iteration
        return iteration, consumed

    def record_run(self) -> None:
        """Once the run is accepted (config valid, checkpoint loaded): clean what killed saves
        left in ``--save`` and write ``run_config.json``. A refused run writes nothing."""
        if self.root is None or self.rank != 0:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fmt.clean_stale_staging(self.root)
        fmt.write_json_atomic(self.root / "run_config.json", {
            "argv": self.argv, "stage": self.stage, "config": self.cfg.to_dict(), "flags": config_to_argv(self.cfg),
            "git_revision": fmt.git_revision(), "world_size": torch.distributed.get_world_size(),
            "master_port": os.environ.get("MASTER_PORT"), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    # ---------------------------------------------------------------- saving
    def due(self, iteration: int) -> bool:
        ck = self.cfg.checkpoint
        return bool(ck.save and ck.save_interval and iteration % ck.save_interval == 0)

    def save(self, iteration: int, consumed_samples: int, *, background: bool = True) -> Path | None:
        """Save ``iteration`` (unless it is the latest already); returns the path of a save
        completed now. With ``--async-save`` (and ``background``) the files are written by a
        background process and the save is published by :meth:`poll` or :meth:`finish`.

        A save in flight is always published first. Raises :class:`TrainingStopped` with the
        cause when a save fails on any rank; the previous checkpoint stays latest."""
        self.finish()
        if self.root is None or self.last_saved == iteration:
            return None
        s = self.setup
        queue = self.async_queue if background else None
        error = ""
        try:
            path = checkpointing.save_checkpoint(self.cfg, iteration, s.model, s.optimizer, s.scheduler,
                                                 consumed_samples, extra_manifest=self.manifest_extra,
                                                 async_queue=queue)
        except SAVE_ERRORS as exc:  # noqa: BLE001 - any failure of the write is reported the same way
            path, error = None, _describe(exc)
        self._stop_if_failed(iteration, error)
        self.last_saved = iteration
        if queue is not None:
            self.in_flight = (iteration, path)
            if self.rank == 0:
                print(f"saving checkpoint {path} in the background", flush=True)
            return None
        return path

    def poll(self) -> None:
        """Publish the async save in flight if every rank's writer has finished (a collective:
        every rank calls it at the same point, once per iteration)."""
        if self.in_flight is not None:
            self._finalize(blocking=False)

    def finish(self) -> None:
        """Wait for the async save in flight and publish it (before the next save, at the end,
        on a signal, before a stop)."""
        if self.in_flight is not None:
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        iteration, path = self.in_flight
        error, done = "", []
        try:
            done = self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except SAVE_ERRORS as exc:  # noqa: BLE001 - a failed background write, reported like any failed save
            error = _describe(exc)
        if error:
            self.in_flight = None
        self._stop_if_failed(iteration, error)
        if done:
            self.in_flight = None
            if self.rank == 0:
                print(f"saved checkpoint {path}", flush=True)

    def _stop_if_failed(self, iteration: int, error: str) -> None:
        failed = torch.tensor([1 if error else 0], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item():
            raise TrainingStopped(self._save_failure(iteration, error))

    def _save_failure(self, iteration: int, error: str) -> str:
        removed = fmt.clean_stale_staging(self.root) if self.rank == 0 else []
        latest = fmt.read_tracker(self.root) if self.root.exists() else None
        keep = (f"the latest checkpoint ({'iteration ' + str(latest) if latest is not None else 'none'}) is intact"
                + (" and the partial save was removed" if removed else ""))
        needed = self._checkpoint_bytes()
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        if free < 2 * needed or "No space" in error or "unexpected pos" in error:
            return (f"saving iteration {iteration} to --save {self.root} failed ({error or 'on another rank'}): the "
                    f"file system has {free / 2**20:,.1f} MiB free and this checkpoint needs about "
                    f"{needed / 2**20:,.1f} MiB. Free space or point --save elsewhere, then restart with the same "
                    f"command; {keep}.")
        return (f"saving iteration {iteration} to --save {self.root} failed ({error or 'on another rank'}); {keep}. "
                "Fix the cause, then restart with the same command to resume.")

    def _checkpoint_bytes(self) -> int:
        """Bytes of the latest complete checkpoint (else the model + Adam state estimate)."""
        latest = fmt.read_tracker(self.root) if self.root.exists() else None
        if latest is not None:
            d = fmt.iteration_dir(self.root, latest)
            return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        params = sum(p.numel() * p.element_size() for c in self.setup.model for p in c.parameters())
        return params * 3 * torch.distributed.get_world_size()

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.root is not None and self.rank == 0:
            fmt.write_json_atomic(self.root / "eval_summary.json", summary)
