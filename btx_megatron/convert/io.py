"""Reading Hugging Face weight files and copying tokenizer files."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt",
)
# Buffers older Llama checkpoints saved that are recomputed by the model.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """Tensors of one ``.safetensors`` file, read one by one with positional reads.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    byte range) and the raw bytes. Reading with ``pread`` into a fresh tensor (instead of
    memory-mapping the file, as ``safetensors.safe_open`` does) keeps the file's pages out of the
    process: a streaming import's memory stays a few tensors, not the model.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid safetensors file ({exc}).") from exc
        header.pop("__metadata__", None)
        self.base = 8 + size
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            shape = tuple(info.get("shape", ()))
            start, end = info.get("data_offsets", (0, -1))
            if dtype is None or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} has an unsupported dtype {info.get('dtype')!r} or a "
                                 "byte range that does not match its shape.")
            self.entries[name] = (dtype, shape, self.base + start, end - start)
        self._fd: int | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        from ..checkpoint.storage_io import pread_into, tensor_bytes

        dtype, shape, offset, nbytes = self.entries[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = torch.empty(shape, dtype=dtype)
        if nbytes:
            pread_into(self._fd, tensor_bytes(out), offset, f"{self.path} ({name})")
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class HFWeights:
    """Lazy access to the tensors of a Hugging Face model directory.

    Accepts ``model.safetensors``, ``model.safetensors.index.json`` + shards,
    ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards. Only one ``.bin`` shard
    is held at a time (memory-mapped); safetensors are read tensor by tensor
    (:class:`SafetensorsFile`).
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self.weight_map: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self._bin_name: str | None = None
        self._bin: dict[str, torch.Tensor] | None = None
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.dir / index_name
            if index.is_file():
                try:
                    self.weight_map = dict(json.loads(index.read_text())["weight_map"])
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{index} is not a valid weight index ({exc}).") from exc
                break
            if (self.dir / single).is_file():
                self.weight_map = {name: single for name in self._names_in(single)}
                break
        else:
            raise ValueError(
                f"--hf-dir {self.dir} has no weights: expected model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json."
            )
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise ValueError(f"--hf-dir {self.dir}: the index names shard(s) that are missing: {missing}.")
        self.weight_map = {k: v for k, v in self.weight_map.items() if not k.endswith(IGNORED_HF_SUFFIXES)}

    def _names_in(self, filename: str) -> list[str]:
        if filename.endswith(".safetensors"):
            return list(self._safetensors(filename).keys())
        return list(self._load_bin(filename).keys())

    def _safetensors(self, filename: str) -> SafetensorsFile:
        if filename not in self._handles:
            self._handles[filename] = SafetensorsFile(self.dir / filename)
        return self._handles[filename]

    def _load_bin(self, filename: str) -> dict[str, torch.Tensor]:
        if self._bin_name != filename:
            self._bin = None  # release the previous shard first
            self._bin = torch.load(self.dir / filename, map_location="cpu", mmap=True, weights_only=True)
            self._bin_name = filename
        return self._bin

    def names(self) -> list[str]:
        return list(self.weight_map)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._bin = None

    def shape(self, name: str) -> tuple[int, ...]:
        filename = self.weight_map[name]
        if filename.endswith(".safetensors"):
            return self._safetensors(filename).shape(name)
        return tuple(self._load_bin(filename)[name].shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ValueError(f"--hf-dir {self.dir}: tensor {name} is missing from the weights/index.")
        filename = self.weight_map[name]
        if filename.endswith(".safetensors"):
            if name not in self._safetensors(filename).entries:
                raise ValueError(f"--hf-dir {self.dir}: the index maps {name} to {filename}, which lacks it.")
            return self._safetensors(filename).get(name)
        if name not in self._load_bin(filename):
            raise ValueError(f"--hf-dir {self.dir}: the index maps {name} to {filename}, which lacks it.")
        return self._bin[name]


def copy_tokenizer_files(src: Path | None, dst: Path, extra: tuple[str, ...] = ()) -> list[str]:
    if src is None or not src.is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES + extra:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
