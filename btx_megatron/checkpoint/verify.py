"""Checks and fingerprints of Megatron-Core ``torch_dist`` checkpoint directories.

:func:`verify_files` is what every reader runs before it loads: the DCP metadata must parse and
every ``.distcp`` file it references must exist and be long enough, so a truncated or partly
copied checkpoint gives one clear message instead of a reader traceback.

:func:`fingerprint` (``content_hash``): sha256 over the DCP ``.metadata`` file, ``metadata.json``,
the name and size of every ``.distcp`` file and three 1 MiB samples (head, middle, tail) of
each, so it is cheap for a 100 GB checkpoint yet differs between branches (different weights)
and matches for a copy of the same branch. ``full=True`` hashes every byte instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_BYTES = 1 << 20


def dcp_metadata(ckpt_dir: str | Path):
    """The DCP ``.metadata`` of ``ckpt_dir`` as the plain dataclasses of :mod:`.dcp_metadata`
    (without importing torch.distributed.checkpoint: over a second of every tool's start-up)."""
    from . import dcp_metadata as dcpmd

    with open(Path(ckpt_dir) / dcpmd.METADATA_FILE, "rb") as f:
        return dcpmd.load(f)


def verify_files(ckpt_dir: str | Path, label: str):
    """The DCP metadata of ``ckpt_dir`` after checking every file it points into; ValueError
    naming ``label`` and the damaged file otherwise."""
    ckpt_dir = Path(ckpt_dir)
    try:
        metadata = dcp_metadata(ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same user error
        raise ValueError(f"{label}: cannot read the checkpoint metadata in {ckpt_dir} ({exc}).") from exc
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(need.items()):
        f = ckpt_dir / rel
        if not f.is_file():
            raise ValueError(f"{label}: {f} is missing (the checkpoint metadata references it).")
        size = f.stat().st_size
        if size < end:
            raise ValueError(
                f"{label}: {f} is truncated ({size} bytes, the metadata needs at least {end}); "
                "the checkpoint was not written completely."
            )
    return metadata


def fingerprint(ckpt_dir: str | Path, full: bool = False) -> str:
    ckpt_dir = Path(ckpt_dir)
    h = hashlib.sha256()
    for name in (".metadata", "metadata.json"):
        p = ckpt_dir / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    for f in sorted(ckpt_dir.glob("*.distcp")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if full:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
                continue
            for start in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                fh.seek(start)
                h.update(fh.read(SAMPLE_BYTES))
    return ("sha256-full:" if full else "sha256-sampled:") + h.hexdigest()
