"""Tensor IO on ``torch_dist`` checkpoint directories with plain file reads and writes.

Megatron-Core's ``torch_dist`` format is PyTorch DCP: ``.metadata`` (a pickled
``torch.distributed.checkpoint.Metadata``: every key's global shape, dtype and chunks, and where
each chunk lies: file, byte offset, length) plus ``__<rank>_<n>.distcp`` files in which every
chunk is one ``torch.save`` record (a small zip: ``data.pkl``, ``byteorder``, ``data/0`` holding
the raw bytes, ...). The merge, the expert edits and the Hugging Face converters read and write
those files with this module instead of going through
``dist_checkpointing`` / DCP's planners, which copy each tensor twice per direction, start a
helper process per save and are collective per call.

Reading (:class:`CheckpointReader`): the raw-bytes record of a chunk is located once from the
record's zip directory and pickle (checked: one contiguous little-endian storage of the dtype
and size the metadata names), then any box of the global tensor is filled with ``preadv``
straight into the destination tensor's memory, mapped from the file without a copy
(:meth:`CheckpointReader.view`), or described as file byte ranges for a file-to-file copy. A
record that does not pass the checks is read with ``torch.load`` instead (slower, same result).

Writing (:class:`DistcpWriter`): each process appends its chunks to its own
``__<rank>_0.distcp`` on a background thread. The record framing comes from ``torch.save``
under ``torch.serialization.skip_data`` (so it is PyTorch's own format, byte for byte) and the
tensor bytes are written from the tensor's memory with ``pwritev``, or, for a chunk that is an
unchanged byte range of a source (a BTX expert), copied file to file with ``copy_file_range``
without passing through the process at all. Rank 0 then writes
``.metadata`` for all chunks (:func:`write_metadata`) and Megatron's ``metadata.json``; the
common state (iteration, consumed samples) is the ``common_state`` bytes object that
``dist_checkpointing.save`` writes. ``dist_checkpointing.load`` and PyTorch's DCP reader load
the result at any layout.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import queue
import sys
import threading
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

DISTCP_METADATA = ".metadata"
MEGATRON_CONFIG = "metadata.json"
MEGATRON_CONFIG_TEXT = '{"sharded_backend": "torch_dist", "sharded_backend_version": 1}'
COMMON_STATE_KEY = "common_state/shard_0_1"
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LOCAL_HEADER = 30  # fixed part of a zip local file header
_MAX_IO = 1 << 30  # bytes per preadv/pwritev call (Linux caps one call at 2 GiB - 4 KiB)
_MMAP_MIN = 1 << 20  # buffers from this size on are memory maps (see new_buffer)
_COPY_BUFFER = 8 << 20  # bytes per step where copy_file_range cannot copy
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map all pages at once (Linux)


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose memory goes back to the system when it dies.

    Large buffers are anonymous memory maps: malloc would serve them from per-thread arenas
    (glibc raises its mmap threshold to 32 MiB after the first frees) and keep the freed memory,
    so a process streaming gigabytes through short-lived buffers would grow by hundreds of MiB.
    """
    nbytes = _numel(shape) * dtype.itemsize
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
        nbytes = _numel(shape) * dtype.itemsize
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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _FileSlice(io.RawIOBase):
    """Read-only, seekable view of bytes [offset, offset + length) of an open file (for zipfile).

    The first and last ``edge`` bytes are read once up front: a ``torch.save`` record's local
    headers and pickle sit at its start and its zip directory at its end, so parsing one costs
    two reads instead of a dozen."""

    def __init__(self, fd: int, offset: int, length: int, edge: int = 4096) -> None:
        self.fd, self.base, self.length, self.pos = fd, offset, length, 0
        self.head = os.pread(fd, min(edge, length), offset)
        self.tail_start = max(0, length - edge)
        self.tail = os.pread(fd, length - self.tail_start, offset + self.tail_start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        end = self.pos + n
        if end <= len(self.head):
            data = self.head[self.pos:end]
        elif self.pos >= self.tail_start:
            data = self.tail[self.pos - self.tail_start:end - self.tail_start]
        else:
            data = os.pread(self.fd, n, self.base + self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclass(frozen=True)
class _TensorPickle:
    storage_key: str
    dtype: torch.dtype
    storage_numel: int
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _TensorUnpickler(pickle.Unpickler):
    """Understands exactly one pickled CPU tensor (``torch.save(tensor)``) and nothing else."""

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, location, numel = pid
        if kind != "storage" or location != "cpu" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage {pid}")
        return (key, dtype, int(numel))

    @staticmethod
    def _rebuild(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        key, dtype, numel = storage
        return _TensorPickle(key, dtype, numel, int(storage_offset), tuple(size), tuple(stride))


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(size):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def _sub(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b))


def _contiguous_run(lo: tuple[int, ...], hi: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(first element, elements) of the box [lo, hi) of a row-major tensor of ``shape`` when the
    box is one contiguous run: leading axes of extent 1, then one partial axis, then full axes."""
    k = len(shape)
    while k > 0 and lo[k - 1] == 0 and hi[k - 1] == shape[k - 1]:
        k -= 1  # axes k.. are full
    if any(h - l != 1 for l, h in zip(lo[:max(k - 1, 0)], hi[:max(k - 1, 0)])):
        return None
    strides = _contiguous_strides(shape)
    start = sum(l * s for l, s in zip(lo, strides))
    return start, _numel(h - l for l, h in zip(lo, hi))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class _Record:
    """Where the raw bytes of one chunk lie (None offset: use torch.load on the record)."""

    path: str
    data_offset: int | None
    record_offset: int
    record_length: int


class CheckpointReader:
    """Reads boxes of global tensors from one ``torch_dist`` checkpoint directory.

    Thread-safe: reads are positional (``preadv``) on shared file descriptors.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, metadata, label: str) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir, self.label = Path(ckpt_dir), label
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], object]]] = {}
        for index, info in metadata.storage_data.items():
            md = metadata.state_dict_metadata.get(index.fqn)
            if isinstance(md, TensorStorageMetadata):
                sizes = next(c.sizes for c in md.chunks if tuple(c.offsets) == tuple(index.offset))
                self._chunks.setdefault(index.fqn, []).append((tuple(index.offset), tuple(sizes), info))
                self.tensors[index.fqn] = (tuple(md.size), md.properties.dtype)
        self._fds: dict[str, int] = {}
        self._records: dict[tuple[str, int], _Record] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, relative_path: str) -> int:
        with self._lock:
            if relative_path not in self._fds:
                self._fds[relative_path] = os.open(self.dir / relative_path, os.O_RDONLY)
            return self._fds[relative_path]

    def read(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor) -> int:
        """Fill ``dest`` (contiguous, the global tensor's dtype) with the box of ``key`` that starts
        at ``offsets`` and has ``dest``'s shape. Returns the bytes read."""
        shape, dtype = self.tensors[key]
        if dest.dtype != dtype or dest.dim() != len(shape) or not dest.is_contiguous():
            raise ValueError(f"{self.label}: cannot read {key} ({dtype}, {len(shape)} dims) into "
                             f"{dest.dtype} {tuple(dest.shape)}")
        lo_box, hi_box = tuple(offsets), tuple(o + s for o, s in zip(offsets, dest.shape))
        covered = 0
        for c_off, c_size, info in self._chunks[key]:
            lo = tuple(max(a, b) for a, b in zip(lo_box, c_off))
            hi = tuple(min(a, b + s) for a, b, s in zip(hi_box, c_off, c_size))
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            self._read_chunk(key, c_off, c_size, info, lo, hi, lo_box, dest)
            covered += _numel(h - l for l, h in zip(lo, hi))
        if covered != dest.numel():
            raise ValueError(f"{self.label}: the chunks of {key} in {self.dir} do not cover the slice at "
                             f"{list(offsets)} (size {list(dest.shape)}); the checkpoint metadata is inconsistent.")
        return dest.numel() * dest.element_size()

    def file_ranges(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> list[tuple[int, int, int]] | None:
        """The box of ``key`` at ``offsets`` with ``shape`` as (fd, file offset, length) byte
        ranges in row-major order, when every chunk it touches is directly addressable and holds
        its part as one contiguous run (then the bytes can be copied file to file); else None."""
        itemsize = self.tensors[key][1].itemsize
        lo_box, hi_box = tuple(offsets), tuple(o + s for o, s in zip(offsets, shape))
        pieces = []
        for c_off, c_size, info in self._chunks[key]:
            lo = tuple(max(a, b) for a, b in zip(lo_box, c_off))
            hi = tuple(min(a, b + s) for a, b, s in zip(hi_box, c_off, c_size))
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            src = _contiguous_run(_sub(lo, c_off), _sub(hi, c_off), c_size)
            dst = _contiguous_run(_sub(lo, lo_box), _sub(hi, lo_box), shape)
            rec = self._record(key, c_size, info)
            if src is None or dst is None or rec.data_offset is None:
                return None
            pieces.append((dst[0] * itemsize, self._fd(rec.path), rec.data_offset + src[0] * itemsize,
                           src[1] * itemsize))
        pieces.sort()
        if sum(p[3] for p in pieces) != _numel(shape) * itemsize or any(
                a[0] + a[3] != b[0] for a, b in zip(pieces, pieces[1:])):
            return None
        return [(fd, start, length) for _, fd, start, length in pieces]

    def view(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        """The box as a read-only-by-contract tensor mapped from the file (no copy: the page
        cache's pages, mapped copy-on-write and pre-faulted), when it is one contiguous run of
        one directly addressable chunk; None otherwise. Unmapped when the tensor dies."""
        ranges = self.file_ranges(key, offsets, shape)
        if ranges is None or len(ranges) != 1 or ranges[0][2] == 0:
            return None
        fd, start, length = ranges[0]
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, start - aligned + length, flags=mmap.MAP_PRIVATE | _MAP_POPULATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        dtype = self.tensors[key][1]
        return torch.frombuffer(mapped, dtype=dtype, offset=start - aligned, count=length // dtype.itemsize).view(shape)

    def _read_chunk(self, key, c_off, c_size, info, lo, hi, lo_box, dest: torch.Tensor) -> None:
        rec = self._record(key, c_size, info)
        local = tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, c_off))
        target = dest[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, lo_box))]
        fd = self._fd(rec.path)
        if rec.data_offset is None:  # not a record we can address: let torch.load parse it
            blob = os.pread(fd, rec.record_length, rec.record_offset)
            target.copy_(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)[local])
            return
        where = f"{self.dir / rec.path} ({key})"
        run = _contiguous_run(_sub(lo, c_off), _sub(hi, c_off), c_size)
        if run is not None and target.is_contiguous():  # straight into the destination
            pread_into(fd, tensor_bytes(target), rec.data_offset + run[0] * dest.element_size(), where)
            return
        # Rows [lo0, hi0) along the chunk's first axis are one contiguous run: read, then cut.
        row = _numel(c_size[1:]) * dest.element_size()
        tmp = new_buffer((hi[0] - lo[0], *c_size[1:]), dest.dtype)
        pread_into(fd, tensor_bytes(tmp), rec.data_offset + (lo[0] - c_off[0]) * row, where)
        target.copy_(tmp[(slice(None),) + local[1:]])

    def _record(self, key: str, sizes: tuple[int, ...], info) -> _Record:
        cache_key = (info.relative_path, info.offset)
        with self._lock:
            rec = self._records.get(cache_key)
        if rec is None:
            rec = _Record(info.relative_path, None, info.offset, info.length)
            if sizes and not getattr(info, "transform_descriptors", None):
                rec = self._locate(key, sizes, info) or rec
            with self._lock:
                self._records[cache_key] = rec
        return rec

    def _locate(self, key: str, sizes: tuple[int, ...], info) -> _Record | None:
        """The file offset of a record's raw tensor bytes, or None when it is not a plain
        contiguous little-endian tensor of the chunk's shape and the checkpoint's dtype."""
        fd = self._fd(info.relative_path)
        try:
            zf = zipfile.ZipFile(_FileSlice(fd, info.offset, info.length))
            names = {n.split("/", 1)[-1]: n for n in zf.namelist()}
            if sys.byteorder != "little" or ("byteorder" in names and zf.read(names["byteorder"]) != b"little"):
                return None
            meta = _TensorUnpickler(io.BytesIO(zf.read(names["data.pkl"]))).load()
            entry = zf.getinfo(names[f"data/{meta.storage_key}"])
        except (zipfile.BadZipFile, pickle.UnpicklingError, AttributeError, KeyError, ValueError, TypeError,
                EOFError):
            return None
        shape, dtype = self.tensors[key]
        if (entry.compress_type != zipfile.ZIP_STORED or meta.dtype != dtype or meta.size != sizes
                or meta.stride != _contiguous_strides(meta.size)
                or entry.file_size != meta.storage_numel * dtype.itemsize
                or meta.storage_offset + _numel(meta.size) > meta.storage_numel):
            return None
        header = os.pread(fd, _LOCAL_HEADER, info.offset + entry.header_offset)
        if header[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        data = info.offset + entry.header_offset + _LOCAL_HEADER + name_len + extra_len
        return _Record(info.relative_path, data + meta.storage_offset * dtype.itemsize, info.offset, info.length)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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

    def __init__(self, ckpt_dir: str | os.PathLike, rank: int, max_pending_bytes: int = 256 << 20) -> None:
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

    def close(self) -> list[WrittenChunk]:
        self._queue.put(None)
        self._thread.join()
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
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.filesystem import _StorageInfo

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
        if isinstance(md, TensorStorageMetadata) and sum(_numel(ch.sizes) for ch in md.chunks) != _numel(md.size):
            raise AssertionError(f"the chunks of {key} do not add up to its global shape {tuple(md.size)}")
    metadata = Metadata(state_dict_metadata=state, storage_data=storage, version="1.0.0",
                        storage_meta=StorageMeta(checkpoint_id=str(ckpt_dir), save_id=str(uuid.uuid4())))
    ckpt_dir = Path(ckpt_dir)
    with open(ckpt_dir / DISTCP_METADATA, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())
    with open(ckpt_dir / MEGATRON_CONFIG, "w") as f:
        f.write(MEGATRON_CONFIG_TEXT)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["BufferPool", "CheckpointReader", "DistcpWriter", "WrittenChunk", "common_state_bytes", "copy_ranges", "new_buffer",
           "pread_into", "pwrite_all", "tensor_bytes", "torch_save_framing", "write_metadata"]
