"""Writes ``torch_dist`` checkpoint files: each process's ``.distcp`` records (:class:`DistcpWriter`),
then rank 0's ``.metadata`` for all of them (:func:`write_metadata`).

Each process appends its chunks to its own ``__<rank>_0.distcp`` on a background thread. The
record framing comes from ``torch.save`` under ``torch.serialization.skip_data`` (so it is
PyTorch's own format, byte for byte) and the tensor bytes are written from the tensor's memory
with ``pwritev``, or, for a chunk that is an unchanged byte range of a source (a BTX expert),
copied file to file with ``copy_file_range`` without passing through the process at all. Every
``sync_every`` bytes a flusher thread starts ``fdatasync`` on what is written so far, so the
disk writes back while the process goes on reading and computing, and the final ``fsync`` of
:meth:`DistcpWriter.close` has only the tail left. Rank 0
then writes ``.metadata`` for all chunks and Megatron's ``metadata.json``; the common state
(iteration, consumed samples) is the ``common_state`` bytes object that
``dist_checkpointing.save`` writes. ``dist_checkpointing.load`` and PyTorch's DCP reader load
the result at any layout. The format is described in :mod:`.storage_io`.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .storage_io import copy_ranges, pwrite_all, shape_numel, tensor_bytes
from .dcp_metadata import METADATA_FILE

DISTCP_METADATA = METADATA_FILE
MEGATRON_CONFIG = "metadata.json"
MEGATRON_CONFIG_TEXT = '{"sharded_backend": "torch_dist", "sharded_backend_version": 1}'
COMMON_STATE_KEY = "common_state/shard_0_1"


class _Recorder(io.RawIOBase):
    """A write target that keeps what ``torch.save`` writes and where, and skips the gaps."""

    def __init__(self) -> None:
        self.pos = self.end = 0
        self.pieces: list[tuple[int, bytes]] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        self.pieces.append((self.pos, data))
        self.pos += len(data)
        self.end = max(self.end, self.pos)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.end + pos
        return self.pos


def torch_save_framing(t: torch.Tensor) -> tuple[bytes, int, bytes]:
    """(bytes before the tensor data, data offset, bytes after) of ``torch.save(t)``."""
    rec = _Recorder()
    with torch.serialization.skip_data():
        torch.save(t, rec)
    nbytes = t.numel() * t.element_size()
    pieces = sorted((p, b) for p, b in rec.pieces if b)
    data_start, pos = None, 0
    for p, b in pieces:  # the one hole torch.save left is the tensor's data
        if p > pos:
            assert data_start is None and p - pos == nbytes, "unexpected torch.save layout"
            data_start = pos
        pos = max(pos, p + len(b))
    if data_start is None:  # an empty tensor: nothing to leave out
        assert nbytes == 0, "unexpected torch.save layout"
        data_start = rec.end
    head, tail = bytearray(data_start), bytearray(rec.end - data_start - nbytes)
    for p, b in pieces:
        if p < data_start:
            head[p:p + len(b)] = b
        else:
            tail[p - data_start - nbytes:p - data_start - nbytes + len(b)] = b
    return bytes(head), data_start, bytes(tail)


@dataclass(frozen=True)
class WrittenChunk:
    """One record of a ``.distcp`` file, as the metadata needs it (picklable)."""

    key: str
    offsets: tuple[int, ...] | None  # None: a bytes object
    sizes: tuple[int, ...] | None
    global_shape: tuple[int, ...] | None
    dtype: str | None
    relative_path: str
    offset: int
    length: int


class DistcpWriter:
    """Appends records to ``<ckpt_dir>/__<rank>_0.distcp`` on a background thread.

    :meth:`add_tensor` returns at once unless ``max_pending_bytes`` are already queued (memory
    stays bounded); the caller must not modify a tensor after handing it over. Errors of the
    writer thread are raised by the next call. :meth:`close` waits, fsyncs and returns what was
    written.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, rank: int, max_pending_bytes: int = 256 << 20,
                 sync_every: int = 128 << 20) -> None:
        self.relative_path = f"__{rank}_0.distcp"
        self.path = Path(ckpt_dir) / self.relative_path
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.written: list[WrittenChunk] = []
        self.bytes_written = 0
        self._pos = 0
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._max_pending = max_pending_bytes
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="distcp-writer", daemon=True)
        self._thread.start()
        # Write-back while writing: the flusher fdatasyncs whenever sync_every more bytes are written.
        self._sync_every = sync_every
        self._synced_at = 0
        self._sync_wanted = threading.Event()
        self._sync_stop = False
        self._flusher = threading.Thread(target=self._flush_loop, name="distcp-flusher", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            self._sync_wanted.wait()
            self._sync_wanted.clear()
            if self._sync_stop:
                return
            try:
                os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
            except OSError as exc:  # the final fsync of close() raises it again if it persists
                self._error = self._error or exc

    def _stop_flusher(self) -> None:
        self._sync_stop = True
        self._sync_wanted.set()
        self._flusher.join()

    def add_tensor(self, key: str, offsets: tuple[int, ...], tensor: torch.Tensor, global_shape: tuple[int, ...],
                   release=None) -> None:
        """Queue ``tensor`` as the chunk of ``key`` at ``offsets``; ``release(tensor)`` is called
        on the writer thread once its bytes are written (e.g. :meth:`BufferPool.put`)."""
        if not tensor.is_contiguous() or tensor.storage_offset() != 0 or \
                tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # torch.save writes whole storages
        self._put(("tensor", key, tuple(offsets), (tensor, release), tuple(global_shape)),
                  tensor.numel() * tensor.element_size())

    def add_bytes(self, key: str, data: bytes) -> None:
        self._put(("bytes", key, None, data, None), len(data))

    def add_file_ranges(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype,
                        ranges: list[tuple[int, int, int]], global_shape: tuple[int, ...]) -> None:
        """Queue a chunk whose bytes are ``ranges`` of open files (copied file to file, in the kernel)."""
        # Only framed, never touched: untouched pages of a large allocation are never faulted in.
        like = torch.empty(shape, dtype=dtype)
        self._put(("ranges", key, tuple(offsets), (like, ranges), tuple(global_shape)), 0)

    def _put(self, item, nbytes: int) -> None:
        with self._cond:
            while self._pending > 0 and self._pending + nbytes > self._max_pending and self._error is None:
                self._cond.wait()
            self._raise()
            self._pending += nbytes
        self._queue.put((item, nbytes))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            item, nbytes = entry
            try:
                if self._error is None:
                    self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc
            with self._cond:
                self._pending -= nbytes
                self._cond.notify_all()

    def _write(self, kind, key, offsets, payload, global_shape) -> None:
        ranges = None
        if kind == "bytes":
            buffers, record = [memoryview(payload)], (None, None, None)
        else:
            tensor, extra = payload
            ranges = extra if kind == "ranges" else None
            head, _, tail = torch_save_framing(tensor)
            data = [] if ranges is not None else [tensor_bytes(tensor)]
            buffers = [memoryview(head), *data, memoryview(tail)]
            record = (tuple(tensor.shape), tuple(global_shape), str(tensor.dtype).replace("torch.", ""))
        if ranges is None:
            length = pwrite_all(self.fd, buffers, self._pos)
            if kind == "tensor" and extra is not None:
                del buffers
                extra(tensor)
        else:
            length = pwrite_all(self.fd, buffers[:1], self._pos)
            length += copy_ranges(ranges, self.fd, self._pos + length)
            length += pwrite_all(self.fd, buffers[1:], self._pos + length)
        sizes, shape, dtype = record
        self.written.append(WrittenChunk(key, offsets, sizes, shape, dtype, self.relative_path, self._pos, length))
        self._pos += length
        self.bytes_written += length
        if self._pos - self._synced_at >= self._sync_every:
            self._synced_at = self._pos
            self._sync_wanted.set()

    def close(self) -> list[WrittenChunk]:
        self._queue.put(None)
        self._thread.join()
        self._stop_flusher()
        try:
            self._raise()
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return self.written

    def abort(self) -> None:
        """Stop without raising (the caller is failing anyway); the file is left for removal."""
        self._queue.put(None)
        self._thread.join()
        self._stop_flusher()
        try:
            os.close(self.fd)
        except OSError:
            pass


def common_state_bytes(common: dict) -> bytes:
    """The ``common_state`` object of a Megatron ``torch_dist`` save (``torch.save([common])``)."""
    buf = io.BytesIO()
    torch.save([common], buf)
    return buf.getvalue()


def write_metadata(ckpt_dir: str | os.PathLike, chunks: list[WrittenChunk]) -> None:
    """``.metadata`` (PyTorch DCP) for every chunk of every rank, then Megatron's ``metadata.json``."""
    from . import dcp_metadata as dcpmd
    from .dcp_metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
        TensorStorageMetadata,
    )
    from .dcp_metadata import StorageInfo as _StorageInfo

    state: dict = {}
    storage: dict = {}
    for c in sorted(chunks, key=lambda c: (c.key, c.offsets or ())):
        if c.offsets is None:
            state[c.key] = BytesStorageMetadata()
            storage[MetadataIndex(c.key)] = _StorageInfo(c.relative_path, c.offset, c.length)
            continue
        md = state.setdefault(c.key, TensorStorageMetadata(
            properties=TensorProperties(dtype=getattr(torch, c.dtype)), size=torch.Size(c.global_shape), chunks=[]))
        if tuple(md.size) != c.global_shape or md.properties.dtype != getattr(torch, c.dtype):
            raise AssertionError(f"chunks of {c.key} disagree on the global shape or dtype")
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)))
        storage[MetadataIndex(c.key, c.offsets)] = _StorageInfo(c.relative_path, c.offset, c.length)
    for key, md in state.items():
        if isinstance(md, TensorStorageMetadata) and sum(shape_numel(ch.sizes) for ch in md.chunks) != shape_numel(md.size):
            raise AssertionError(f"the chunks of {key} do not add up to its global shape {tuple(md.size)}")
    metadata = Metadata(state_dict_metadata=state, storage_data=storage, version="1.0.0",
                        storage_meta=StorageMeta(checkpoint_id=str(ckpt_dir), save_id=str(uuid.uuid4())))
    ckpt_dir = Path(ckpt_dir)
    with open(ckpt_dir / DISTCP_METADATA, "wb") as f:
        dcpmd.dump(metadata, f)  # loads as DCP's own classes (see checkpoint.dcp_metadata)
        f.flush()
        os.fsync(f.fileno())
    with open(ckpt_dir / MEGATRON_CONFIG, "w") as f:
        f.write(MEGATRON_CONFIG_TEXT)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["COMMON_STATE_KEY", "DISTCP_METADATA", "MEGATRON_CONFIG", "DistcpWriter", "WrittenChunk", "common_state_bytes",
           "torch_save_framing", "write_metadata"]
