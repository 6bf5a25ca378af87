"""Atomic file writes and tool-output publishing.

Every file or directory this project writes for a user is written to a temporary sibling on the
same file system and renamed into place only when complete, so a kill never leaves a
half-written result where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

FAULT_POINT_ENV = "BTX_FAULT_POINT"
FAULT_ACTION_ENV = "BTX_FAULT_ACTION"


def fault_point(name: str, iteration: int | None = None) -> None:
    """Fault-injection hook of the test suite; a no-op unless ``BTX_FAULT_POINT`` names this
    point, as ``NAME`` (every time) or ``NAME@ITERATION``.

    ``BTX_FAULT_ACTION`` says what happens there: ``kill`` (default: SIGKILL this process),
    ``pause:SECONDS`` (print ``[fault-point] NAME`` to stderr and sleep, so that a test can
    kill or signal the process at exactly this moment), ``signal:SIGTERM`` (send this process
    the signal, as if the scheduler had, and go on), ``raise`` (an OSError, as from a failing
    disk)."""
    wanted = os.environ.get(FAULT_POINT_ENV)
    if not wanted or (wanted != name and (iteration is None or wanted != f"{name}@{iteration}")):
        return
    action = os.environ.get(FAULT_ACTION_ENV, "kill")
    print(f"[fault-point] {wanted} ({action}) pid {os.getpid()}", file=sys.stderr, flush=True)
    if action.startswith("pause:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action.startswith("signal:"):
        os.kill(os.getpid(), getattr(signal, action.split(":", 1)[1]))
    elif action == "raise":
        raise OSError(f"injected fault at {wanted}")
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: str | os.PathLike, content: str | bytes | Iterable[str]) -> None:
    """Write ``content`` (text, bytes, or text chunks streamed from an iterable) to a temporary
    sibling, fsync it, and rename it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    binary = isinstance(content, bytes)
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            for chunk in [content] if isinstance(content, (str, bytes)) else content:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write-{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_staging(output: str | os.PathLike) -> list[Path]:
    """Remove what killed runs of a tool left next to ``output``: its staging directories,
    moved-aside old outputs and temporary files (``.staging-NAME-*``, ``.trash-NAME-*``,
    ``.NAME.tmp-*``). Tools call it before they write ``output`` again."""
    output = Path(output)
    removed = []
    if not output.parent.is_dir():
        return removed
    for pattern in (f".staging-{output.name}-*", f".trash-{output.name}-*", f".{output.name}.tmp-*"):
        for p in output.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def staging_dir_for(output: str | os.PathLike) -> Path:
    """A new temporary sibling of ``output`` (same file system, so the final move is a rename);
    the debris of earlier killed runs for the same output is removed first."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    path = output.with_name(f".staging-{output.name}-{uuid.uuid4().hex[:10]}")
    path.mkdir()
    return path


OUTPUT_MARKER = "btx_output.json"


def check_output(output: str | os.PathLike, sources: list[str | os.PathLike], *, tool: str, flag: str = "--output",
                 overwrite: bool = False) -> None:
    """Refuse an output directory that would damage anything: ValueError naming the fix.

    An output may not be, contain, or sit inside a source. An existing output is replaced (with
    ``overwrite``) only when it is an earlier output of the same tool, recognised by the marker
    file :data:`OUTPUT_MARKER` that :func:`mark_output` writes into every output."""
    out = Path(output).resolve()
    for src in sources:
        s = Path(src).resolve()
        if out == s:
            raise ValueError(f"{flag} {output} is a source of this {tool}; write the result somewhere else.")
        if out in s.parents:
            raise ValueError(f"{flag} {output} contains the source {src}; replacing it would delete the source. "
                             "Write the result somewhere else.")
        if s in out.parents:
            raise ValueError(f"{flag} {output} lies inside the source {src}; write the result somewhere else.")
    if not out.exists():
        return
    if not overwrite:
        raise ValueError(f"{flag} {output} exists; pass --overwrite to replace it (replaced only at the end), "
                         "or choose a new directory.")
    if not out.is_dir():
        raise ValueError(f"{flag} {output} is a file, not an earlier output of {tool}; --overwrite replaces only "
                         "those. Remove it yourself or choose another directory.")
    if written_by(out) != tool:
        what = f"an output of {written_by(out)}" if written_by(out) else "not an output of this tool"
        raise ValueError(f"{flag} {output} exists and is {what}; --overwrite replaces only an earlier output of "
                         f"{tool}. Remove it yourself or choose another directory.")


def written_by(directory: Path) -> str | None:
    """The tool that wrote ``directory`` (its marker file; for checkpoints written before the
    marker existed, the ``tool`` of the manifest of ``iter_0000000``), else None."""
    try:
        return json.loads((directory / OUTPUT_MARKER).read_text()).get("tool")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        manifest_tool = json.loads((directory / "iter_0000000" / "btx_checkpoint.json").read_text()).get("tool", "")
    except (OSError, ValueError, AttributeError):
        return None
    return manifest_tool.rsplit(" ", 1)[-1] if manifest_tool.endswith(".py") else None


def mark_output(directory: str | os.PathLike, tool: str, **info: Any) -> None:
    """Record in ``directory`` (a staging directory about to be published) which tool wrote it,
    so that a later ``--overwrite`` of the same tool may replace it and nothing else."""
    write_json_atomic(Path(directory) / OUTPUT_MARKER, {"tool": tool, **info})


def publish_directory(staging: Path, output: str | os.PathLike, overwrite: bool) -> Path:
    """Move a finished tool output (a whole directory) into place.

    The previous ``output`` is replaced only now, at the end, and only with ``overwrite``.
    """
    from .format import CheckpointError  # format imports this module

    output = Path(output)
    fault_point("publish-output")
    if output.exists():
        if not overwrite:
            raise CheckpointError(f"{output} exists; pass --overwrite to replace it.")
        trash = output.with_name(f".trash-{output.name}-{uuid.uuid4().hex[:8]}")
        os.replace(output, trash)
        fault_point("publish-output-between-renames")
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, output)
    fsync_dir(output.parent)
    return output
