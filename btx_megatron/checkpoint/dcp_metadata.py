"""PyTorch DCP's ``.metadata`` file, read and written without importing ``torch.distributed.checkpoint``.

``.metadata`` is a pickle of ``torch.distributed.checkpoint.metadata.Metadata`` (with
``TensorStorageMetadata``, ``ChunkStorageMetadata``, ``TensorProperties``, ``MetadataIndex``,
``StorageMeta``, ``BytesStorageMetadata`` and ``filesystem._StorageInfo`` inside). Importing that
package costs 1.3-1.5 s of CPU here (it pulls in DTensor, the planners and the FSDP helpers),
a fifth of an offline merge of 220M-parameter models. The offline tools (merge, expert edits,
Hugging Face export, checkpoint checks) only need the fields, so they read and write the file
through the plain dataclasses below:

- :func:`load` unpickles the DCP classes as these dataclasses (the save planner's objects in
  ``planner_data`` as :class:`Opaque`; classes from outside DCP as usual);
- :func:`dump` pickles these dataclasses under the DCP class names with the state each DCP
  class pickles itself with, so PyTorch's ``FileSystemReader.read_metadata`` and Megatron-Core
  load the file as if DCP had written it (``tests/checkpoint/test_dcp_metadata.py`` checks both
  directions field by field against the real classes).

The names and states follow torch 2.x's ``torch/distributed/checkpoint/metadata.py`` and
``filesystem.py``; a change there shows up as a failing round-trip test.
"""

from __future__ import annotations

import enum
import io
import pickle
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

METADATA_FILE = ".metadata"  # the file in a checkpoint directory
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"


@dataclass
class ChunkStorageMetadata:
    offsets: torch.Size
    sizes: torch.Size


class MemFormat(enum.Enum):
    """DCP's ``_MEM_FORMAT_ENCODING``: how ``TensorProperties`` pickles a memory format."""

    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


_MEMORY_FORMATS = {
    MemFormat.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
    MemFormat.TORCH_CHANNELS_LAST: torch.channels_last,
    MemFormat.TORCH_PRESERVE_FORMAT: torch.preserve_format,
}


@dataclass
class TensorProperties:
    dtype: torch.dtype = torch.float32
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False

    def __getstate__(self):  # DCP's state: a tuple with the memory format encoded
        encoding = next((e for e, f in _MEMORY_FORMATS.items() if f == self.memory_format), None)
        if encoding is None:
            raise ValueError(f"invalid torch.memory_format {self.memory_format}")
        return (self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory)

    def __setstate__(self, state) -> None:
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        self.memory_format = _MEMORY_FORMATS[MemFormat(encoding.value)]


@dataclass
class TensorStorageMetadata:
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    pass


@dataclass
class StorageMeta:
    checkpoint_id: Any = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    state_dict_metadata: dict[str, Any]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass(frozen=True)
class MetadataIndex:
    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(hash=False, compare=False, default=None)

    def __init__(self, fqn: str, offset=None, index: int | None = None) -> None:
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "offset", None if offset is None else torch.Size(offset))


@dataclass
class StorageInfo:
    """DCP's ``filesystem._StorageInfo``: where one item's bytes lie."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: Any = None

    def __getstate__(self):  # DCP's state: the fields that are set
        return {k: v for k, v in self.__dict__.items() if v is not None}


# (module, name) in the pickle <-> the class here.
_CLASSES: dict[tuple[str, str], type] = {
    **{(_METADATA_MODULE, c.__name__): c for c in (ChunkStorageMetadata, TensorProperties, TensorStorageMetadata,
                                                   BytesStorageMetadata, StorageMeta, Metadata, MetadataIndex)},
    (_METADATA_MODULE, "_MEM_FORMAT_ENCODING"): MemFormat,
    (_FILESYSTEM_MODULE, "_StorageInfo"): StorageInfo,
}
_NAMES = {cls: key for key, cls in _CLASSES.items()}


class Opaque:
    """Any other DCP object in a ``.metadata`` (the save planner's ``planner_data``: ``SavePlan``,
    ``WriteItem``, ...): kept as given, never interpreted. The offline tools do not read it, and
    what they write has none."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<DCP {type(self).__name__}>"


_OPAQUE: dict[tuple[str, str], type] = {}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        cls = _CLASSES.get((module, name))
        if cls is not None:
            return cls
        if module.startswith("torch.distributed.checkpoint"):
            return _OPAQUE.setdefault((module, name), type(name, (Opaque,), {"__module__": __name__}))
        return super().find_class(module, name)


class _Pickler(pickle._Pickler):  # the Python pickler: its save_global can be overridden
    def save_global(self, obj, name=None):
        key = _NAMES.get(obj) if isinstance(obj, type) else None
        if key is None:
            return super().save_global(obj, name)
        # What pickle writes for a class it found under that name (protocol >= 4), without
        # importing the module to check that it is there.
        self.save(key[0])
        self.save(key[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def save_type(self, obj):  # a class object is saved through save_global (as pickle does)
        return self.save_global(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[type] = save_type
    dispatch[enum.EnumType] = save_type


def load(file: BinaryIO) -> Metadata:
    return _Unpickler(file).load()


def loads(data: bytes) -> Metadata:
    return load(io.BytesIO(data))


def dump(metadata: Metadata, file: BinaryIO) -> None:
    _Pickler(file, protocol=pickle.DEFAULT_PROTOCOL).dump(metadata)


def dumps(metadata: Metadata) -> bytes:
    buf = io.BytesIO()
    dump(metadata, buf)
    return buf.getvalue()


def is_tensor(md: Any) -> bool:
    """``md`` (a ``state_dict_metadata`` value, from :func:`load` or from DCP) describes a tensor."""
    return type(md).__name__ == "TensorStorageMetadata"


__all__ = ["METADATA_FILE", "BytesStorageMetadata", "ChunkStorageMetadata", "MemFormat", "Metadata", "MetadataIndex", "Opaque", "StorageInfo",
           "StorageMeta", "TensorProperties", "TensorStorageMetadata", "dump", "dumps", "is_tensor", "load", "loads"]
