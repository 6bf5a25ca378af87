"""Plain file IO for ``torch_dist`` checkpoint files: buffers and positional reads, writes and copies.

Megatron-Core's ``torch_dist`` format is PyTorch DCP: ``.metadata`` (a pickled
``torch.distributed.checkpoint.Metadata``: every key's global shape, dtype and chunks, and where
each chunk lies: file, byte offset, length) plus ``__<rank>_<n>.distcp`` files in which every
chunk is one ``torch.save`` record (a small zip: ``data.pkl``, ``byteorder``, ``data/0`` holding
the raw bytes, ...). The merge, the expert edits and the Hugging Face converters read and write
those files with :mod:`.dcp_reader` and :mod:`.dcp_writer` instead of going through
``dist_checkpointing`` / DCP's planners, which copy each tensor twice per direction, start a
helper process per save and are collective per call. This module holds what both share: buffers
whose memory goes back to the system, a pool of them, and ``preadv`` / ``pwritev`` /
``copy_file_range`` loops that move bytes straight between files and tensor memory.
"""

from __future__ import annotations

import mmap
import os
import threading

import torch

_MAX_IO = 1 << 30  # bytes per preadv/pwritev call (Linux caps one call at 2 GiB - 4 KiB)
_MMAP_MIN = 1 << 20  # buffers from this size on are memory maps (see new_buffer)
_COPY_BUFFER = 8 << 20  # bytes per step where copy_file_range cannot copy


def shape_numel(shape) -> int:
    """The number of elements of a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose memory goes back to the system when it dies.

    Large buffers are anonymous memory maps: malloc would serve them from per-thread arenas
    (glibc raises its mmap threshold to 32 MiB after the first frees) and keep the freed memory,
    so a process streaming gigabytes through short-lived buffers would grow by hundreds of MiB.
    """
    nbytes = shape_numel(shape) * dtype.itemsize
    if nbytes < _MMAP_MIN:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class BufferPool:
    """Large buffers (:func:`new_buffer`) kept for reuse: up to ``max_bytes`` of idle ones, the
    least recently returned dropped first (so the sizes in current use stay).

    Streaming a model through short-lived buffers of a few repeating sizes would fault in fresh
    pages for every byte (a third of the merge's CPU time); reused buffers are faulted in once.
    Thread-safe; a buffer must be handed back (:meth:`put`) only when nothing uses it any more.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._idle: list[torch.Tensor] = []  # uint8 views, oldest first
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = shape_numel(shape) * dtype.itemsize
        raw = None
        if nbytes >= _MMAP_MIN:
            with self._lock:
                for i in range(len(self._idle) - 1, -1, -1):
                    if self._idle[i].numel() == nbytes:
                        raw = self._idle.pop(i)
                        self._idle_bytes -= nbytes
                        break
        if raw is None:
            return new_buffer(shape, dtype)
        return raw.view(dtype).view(shape)

    def put(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if nbytes < _MMAP_MIN or not t.is_contiguous() or t.untyped_storage().nbytes() != nbytes:
            return
        with self._lock:
            self._idle.append(t.reshape(-1).view(torch.uint8))
            self._idle_bytes += nbytes
            while self._idle_bytes > self.max_bytes:
                self._idle_bytes -= self._idle.pop(0).numel()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (writable)."""
    assert t.is_contiguous() and t.device.type == "cpu", "tensor_bytes needs a contiguous CPU tensor"
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def pread_into(fd: int, buf: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + _MAX_IO]], offset + done)
        if n == 0:
            raise ValueError(f"{what} ends {len(buf) - done} bytes early; the file is truncated.")
        done += n


def pwrite_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    total = 0
    for buf in buffers:
        done = 0
        while done < len(buf):
            done += os.pwritev(fd, [buf[done:done + _MAX_IO]], offset + total + done)
        total += len(buf)
    return total


def copy_ranges(ranges: list[tuple[int, int, int]], fd_out: int, offset: int) -> int:
    """Copy (fd, offset, length) ranges to ``fd_out`` at ``offset`` in the kernel
    (``copy_file_range``), or through a buffer where the file systems cannot. Returns the bytes."""
    total = 0
    buf = None
    for fd_in, start, length in ranges:
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(fd_in, fd_out, min(length - done, _MAX_IO), start + done,
                                       offset + total + done)
            except OSError:  # e.g. EXDEV across file systems on older kernels
                n = 0
            if n == 0:
                buf = buf or bytearray(_COPY_BUFFER)
                view = memoryview(buf)[:min(_COPY_BUFFER, length - done)]
                pread_into(fd_in, view, start + done, "a source checkpoint file")
                n = pwrite_all(fd_out, [view], offset + total + done)
            done += n
        total += length
    return total


__all__ = ["BufferPool", "copy_ranges", "new_buffer", "pread_into", "pwrite_all", "shape_numel", "tensor_bytes"]
