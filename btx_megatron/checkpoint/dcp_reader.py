"""Reads boxes of global tensors from a ``torch_dist`` checkpoint directory (:class:`CheckpointReader`).

The raw-bytes record of a chunk is located once from the record's zip directory and pickle
(checked: one contiguous little-endian storage of the dtype and size the metadata names), then
any box of the global tensor is filled with ``preadv`` straight into the destination tensor's
memory, mapped from the file without a copy (:meth:`CheckpointReader.view`), or described as
file byte ranges for a file-to-file copy. A record that does not pass the checks is read with
``torch.load`` instead (slower, same result). The format is described in :mod:`.storage_io`.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .storage_io import new_buffer, pread_into, shape_numel, tensor_bytes

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LOCAL_HEADER = 30  # fixed part of a zip local file header
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map all pages at once (Linux)


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
    return start, shape_numel(h - l for l, h in zip(lo, hi))


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
        from .dcp_metadata import is_tensor

        self.dir, self.label = Path(ckpt_dir), label
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], object]]] = {}
        for index, info in metadata.storage_data.items():
            md = metadata.state_dict_metadata.get(index.fqn)
            if is_tensor(md):
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
            covered += shape_numel(h - l for l, h in zip(lo, hi))
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
        if sum(p[3] for p in pieces) != shape_numel(shape) * itemsize or any(
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
        row = shape_numel(c_size[1:]) * dest.element_size()
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
                or meta.storage_offset + shape_numel(meta.size) > meta.storage_numel):
            return None
        header = os.pread(fd, _LOCAL_HEADER, info.offset + entry.header_offset)
        if header[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        data = info.offset + entry.header_offset + _LOCAL_HEADER + name_len + extra_len
        return _Record(info.relative_path, data + meta.storage_offset * dtype.itemsize, info.offset, info.length)


__all__ = ["CheckpointReader"]
