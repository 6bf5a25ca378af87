"""One distributed, staged write of a tool's output checkpoint, shared by the merge and expert
edits: rank 0 makes a staging directory next to the output; every process writes its part into
it; rank 0 completes and publishes it only when every process succeeded. A failure on any
process is raised on every process (``ValueError`` for bad input or IO, ``RuntimeError`` for a
bug) and the staging directory is removed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as fmt
from ..runtime.distributed import all_gather_objects, broadcast_object


def write_staged(output: Path, rank: int, world: int, write: Callable[[Path], Any],
                 finish: Callable[[Path, Path, list[Any]], None]) -> Path:
    """``write(iter_dir)`` on every process returns its part (gathered to rank 0);
    ``finish(staging, iter_dir, parts)`` on rank 0 completes and publishes the staging directory."""
    made = None
    if rank == 0:
        try:
            made = ("ok", str(fmt.staging_dir_for(output)))
        except OSError as exc:
            made = ("error", f"cannot create a staging directory next to --output {output}: {exc}")
    made = broadcast_object(made, world)
    if made[0] == "error":
        raise ValueError(made[1])
    staging = Path(made[1])
    iter_dir = fmt.iteration_dir(staging, 0)
    published = False
    try:
        if rank == 0:
            iter_dir.mkdir()
        broadcast_object(None, world)  # the directory exists before anyone writes into it
        part, error = None, None
        try:
            part = write(iter_dir)
        except (OSError, ValueError) as exc:
            error = ("user", f"rank {rank}: {exc}" if world > 1 else str(exc))
        except Exception as exc:  # a bug: every process must still reach the exchange below
            if world == 1:
                raise
            error = ("bug", f"rank {rank}: {type(exc).__name__}: {exc}")
        outcomes = all_gather_objects((part, error), world)
        errors = [e for _, e in outcomes if e]
        status = ("ok", "")
        if errors:
            status = ("bug" if any(kind == "bug" for kind, _ in errors) else "user", "; ".join(m for _, m in errors))
        elif rank == 0:
            try:
                finish(staging, iter_dir, [p for p, _ in outcomes])
                published = True
            except (OSError, ValueError) as exc:
                status = ("user", f"could not publish {output}: {exc}")
        kind, message = broadcast_object(status, world)
        if kind != "ok":
            raise (RuntimeError if kind == "bug" else ValueError)(message)
        return output
    finally:
        if rank == 0 and not published:
            shutil.rmtree(staging, ignore_errors=True)


__all__ = ["write_staged"]
