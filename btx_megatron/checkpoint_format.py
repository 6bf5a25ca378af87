"""On-disk layout of btx-megatron checkpoints (shared by the trainer and the offline tools).

```
ROOT/
  latest_checkpointed_iteration.txt     written last, atomically: names the newest complete save
  iter_0000100/                          Megatron-Core dist_checkpointing (torch_dist) directory
    metadata.json  .metadata  __R_N.distcp  common.pt
    btx_checkpoint.json                  manifest: architecture, layout, iteration, provenance
```

A save is written into ``ROOT/.staging-iter_XXXXXXX-<nonce>/`` and renamed into place only when
every rank has finished; the tracker is replaced after the rename. A process killed mid-save
leaves a staging directory (ignored and cleaned later) and the previous tracker.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

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


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_staging_dir(root: str | os.PathLike, iteration: int, nonce: str) -> Path:
    """Staging directory for a save; ``nonce`` must be identical on every rank."""
    return Path(root) / f".staging-iter_{iteration:07d}-{nonce}"


def publish(staging: Path, root: str | os.PathLike, iteration: int) -> Path:
    """Move a complete staging directory into place and point the tracker at it (one process)."""
    final = iteration_dir(root, iteration)
    if final.exists():
        trash = Path(root) / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(Path(root))
    write_text_atomic(Path(root) / TRACKER, f"{iteration}\n")
    return final


def clean_stale_staging(root: str | os.PathLike) -> list[Path]:
    """Remove staging/trash directories left by killed saves (call from one process)."""
    removed = []
    for p in Path(root).glob(".staging-iter_*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in Path(root).glob(".trash-*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(staging: Path, output: str | os.PathLike, overwrite: bool) -> Path:
    """Move a finished tool output (a whole checkpoint ROOT) into place.

    The previous ``output`` is replaced only now, at the end, and only with ``overwrite``.
    """
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise CheckpointError(f"{output} exists; pass --overwrite to replace it.")
        trash = output.with_name(f".trash-{output.name}-{uuid.uuid4().hex[:8]}")
        os.replace(output, trash)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, output)
    return output
