"""On-disk layout of btx-megatron checkpoints (shared by the trainer and the offline tools).

```
ROOT/
  latest_checkpointed_iteration.txt     written last, atomically: names the newest complete save
  iter_0000100/                          Megatron-Core dist_checkpointing (torch_dist) directory
    metadata.json  .metadata  __R_N.distcp  common.pt
    btx_checkpoint.json                  manifest (written last): architecture, layout, provenance
```

A save is written into ``ROOT/.staging-iter_XXXXXXX-<nonce>/`` and renamed into place only when
every rank has finished; the tracker is replaced after the rename. A process killed mid-save
leaves a staging directory without a manifest (removed on the next start) and the previous
tracker. Re-saving an iteration that exists moves the old copy aside first; a kill between the
two renames leaves the tracked iteration only as a complete side copy, which
:func:`clean_stale_staging` puts back before it removes anything.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .io import fault_point, fsync_dir, write_text_atomic  # noqa: F401 - re-exported

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "btx_checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A path given as a checkpoint is not one (or not the kind expected)."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str | os.PathLike) -> int | None:
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} is corrupt (expected an iteration number, found {text!r}).")
    return int(text)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "metadata.json").is_file() and (p / MANIFEST).is_file()


def resolve(path: str | os.PathLike, flag: str = "--load") -> tuple[Path, int]:
    """``ROOT`` (with a tracker) or ``ROOT/iter_X`` -> (iteration directory, iteration).

    Raises :class:`CheckpointError` naming ``flag`` when ``path`` is not a checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{flag} {p} does not exist.")
    if not p.is_dir():
        raise CheckpointError(f"{flag} {p} is a file, not a checkpoint directory.")
    if is_checkpoint_dir(p):
        return p, int(read_manifest(p).get("iteration", 0))
    iteration = read_tracker(p)
    if iteration is None:
        raise CheckpointError(
            f"{flag} {p} is not a btx-megatron checkpoint: it has neither {TRACKER} nor "
            f"{MANIFEST}. Point it at a directory written with --save (or by "
            "tools/merge_branches.py / tools/convert_hf.py)."
        )
    d = iteration_dir(p, iteration)
    if not is_checkpoint_dir(d):
        raise CheckpointError(
            f"{flag} {p}: {TRACKER} names iteration {iteration} but {d} is missing or incomplete."
        )
    return d, iteration


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {MANIFEST}; it is not a btx-megatron checkpoint.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc


def new_staging_dir(root: str | os.PathLike, iteration: int, nonce: str) -> Path:
    """Staging directory for a save; ``nonce`` must be identical on every rank."""
    return Path(root) / f".staging-iter_{iteration:07d}-{nonce}"


def publish(staging: Path, root: str | os.PathLike, iteration: int) -> Path:
    """Move a complete staging directory into place and point the tracker at it (one process).

    The tracker never names a directory that is missing for good: while an existing copy of the
    same iteration is replaced, a complete copy always exists (``iter_N``, the staging directory
    or the ``.trash-`` side copy) and :func:`clean_stale_staging` restores it after a kill."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    if final.exists():
        trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        fault_point("publish-between-renames", iteration)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(root)
    fault_point("publish-before-tracker", iteration)
    write_text_atomic(root / TRACKER, f"{iteration}\n")
    return final


def _iteration_of(side_copy: Path) -> int | None:
    """``.staging-iter_0000040-abc`` / ``.trash-iter_0000040-abc`` -> 40."""
    part = side_copy.name.split("iter_", 1)[-1].split("-", 1)[0]
    return int(part) if part.isdigit() else None


def restore_tracked(root: str | os.PathLike) -> Path | None:
    """Put back the tracked iteration when a kill between the two renames of :func:`publish`
    left it only as a complete side copy (``.staging-iter_N-*`` with its manifest, or the
    moved-aside ``.trash-iter_N-*``). Returns the restored directory, else None.

    Safe to call from every rank at once: only renames are used, a complete ``iter_N`` is never
    touched, and a rename that loses the race fails harmlessly."""
    root = Path(root)
    try:
        tracked = read_tracker(root)
    except CheckpointError:
        return None
    if tracked is None:
        return None
    final = iteration_dir(root, tracked)
    if is_checkpoint_dir(final):
        return None
    side = [p for pattern in (".staging-iter_*", ".trash-iter_*") for p in sorted(root.glob(pattern))
            if _iteration_of(p) == tracked and is_checkpoint_dir(p)]
    for candidate in side:
        try:
            if final.exists() and not is_checkpoint_dir(final):
                os.replace(final, root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(candidate, final)  # fails (ENOTEMPTY) if another process restored it first
        except OSError:
            pass
        if is_checkpoint_dir(final):
            fsync_dir(root)
            return final
    return None


def clean_stale_staging(root: str | os.PathLike) -> list[Path]:
    """Remove what killed saves left behind (call from one process before a new save).

    First, if the tracked iteration's directory is missing, a complete side copy of it is put
    back (:func:`restore_tracked`); only then is the remaining debris removed: staging and
    trash directories and temporary files (``.*.tmp-*``: the tracker's, metrics', ...)."""
    root = Path(root)
    removed: list[Path] = []
    restore_tracked(root)
    for pattern in (".staging-iter_*", ".trash-*", ".*.tmp-*"):
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
