"""btx-megatron checkpoint (any saved layout) -> Hugging Face ``LlamaForCausalLM`` / ``MixtralForCausalLM``.

Streams: the checkpoint is read slice by slice (one decoder layer, or one expert, at a time,
whatever TP/PP/EP layout wrote it, with :class:`btx_megatron.checkpoint.dcp_reader.CheckpointReader`:
positional reads straight into the slice's buffer; the next group is read on a thread while
the current one is converted and written) and each converted tensor is appended straight to
its safetensors shard (at most ``max_shard_size`` bytes; headers are planned up front). Peak
memory is two read groups, independent of the number of layers and of the shard size.
Everything is written to a temporary sibling directory first and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import checkpoint as fmt
from ..checkpoint import staging_dir_for

EXPORT_TOOL = "convert_hf export"
from ..runtime.progress import Progress
from . import mapping
from .hf_config import DTYPES, exported_topk, hf_config_from_model, model_config_from_manifest
from .io import copy_tokenizer_files

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


def _check_metadata(reader: "CheckpointReader", s: mapping.Shapes, source: str) -> None:
    if mapping.EMBED not in reader.tensors:
        raise ValueError(
            f"{source} holds no model weights (no {mapping.EMBED}); it may be an optimizer-only or "
            "foreign checkpoint. Export a checkpoint saved with the model."
        )
    for key, shape in mapping.megatron_global_shapes(s).items():
        if key not in reader.tensors:
            raise ValueError(f"{source} lacks {key}, which its manifest's model implies.")
        found = reader.shape(key)
        if found != shape:
            raise ValueError(
                f"{source}: {key} has shape {list(found)} but the manifest's model implies {list(shape)}."
            )


def _read_groups(s: mapping.Shapes) -> Iterator[list[mapping.Address]]:
    """The order and grouping in which slices are read (each group is one load call)."""
    yield [(mapping.EMBED, ())]
    for layer in range(s.num_layers):
        addrs = mapping.megatron_layer_addresses(s, layer)
        if not s.is_moe:
            yield addrs
            continue
        yield [a for a in addrs if a[0] not in (mapping.EXPERT_FC1, mapping.EXPERT_FC2)]
        for e in range(s.num_experts):
            yield [(mapping.EXPERT_FC1, (layer, e)), (mapping.EXPERT_FC2, (layer, e))]
    yield [(mapping.FINAL_NORM, ())] + ([] if s.tied_embeddings else [(mapping.OUTPUT, ())])


class CheckpointReader:
    """Reads (key, layer[, expert]) slices of a torch_dist checkpoint directory, whatever
    TP/PP/EP layout wrote it, in one process and without a process group (the chunks that
    overlap a slice are read straight into its buffer)."""

    def __init__(self, ckpt_dir: Path):
        from ..checkpoint.verify import verify_files
        from ..checkpoint.dcp_reader import CheckpointReader as ChunkReader

        self.dir = Path(ckpt_dir)
        self._reader = ChunkReader(self.dir, verify_files(self.dir, f"--load {self.dir}"), f"--load {self.dir}")
        self.tensors = self._reader.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key][0])

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key][1]

    def read(self, addresses: list[mapping.Address]) -> dict[mapping.Address, torch.Tensor]:
        out = {}
        for key, index in addresses:
            shape = self.shape(key)
            buf = torch.empty((1,) * len(index) + shape[len(index):], dtype=self.dtype(key))
            self._reader.read(key, tuple(index) + (0,) * (len(shape) - len(index)), buf)
            out[(key, index)] = buf.reshape(shape[len(index):])
        return out

    def close(self) -> None:
        self._reader.close()


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _StreamingShardWriter:
    """Writes safetensors shards tensor by tensor, holding none of them in memory.

    Every name, shape and dtype is known before any data is read (``plan``), so each shard's
    header (names -> byte ranges) is written first and tensor bytes are appended as they
    arrive, in the planned order. Shards: ``model-XXXXX-of-YYYYY.safetensors`` plus
    ``model.safetensors.index.json``, or a single ``model.safetensors``.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_size: int):
        self.out_dir, self.dtype = out_dir, dtype
        self.shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in plan:
            nbytes = _numel(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_shard_size:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, shape))
            size += nbytes
        n = len(self.shards)
        self.names = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.order = [name for shard in self.shards for name, _ in shard]
        self.total_size = sum(_numel(shape) * dtype.itemsize for _, shape in plan)
        self._next = 0
        self._shard = -1
        self._file = None
        self._remaining: list[str] = []

    def _open_next(self) -> None:
        self._shard += 1
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in self.shards[self._shard]:
            nbytes = _numel(shape) * self.dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
        path = self.out_dir / self.names[self._shard]
        self._file = open(path, "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._remaining = [name for name, _ in self.shards[self._shard]]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name == self.order[self._next], f"expected {self.order[self._next]}, got {name}"
        if not self._remaining:
            self._close()
            self._open_next()
        assert tensor.dtype == self.dtype
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._remaining.pop(0)
        self._next += 1

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        assert self._next == len(self.order), "not every planned tensor was written"
        self._close()
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, shard in enumerate(self.shards) for name, _ in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.names


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _plan(s: mapping.Shapes, reader: "CheckpointReader", groups) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes in write order, from the mapping applied to meta tensors."""
    plan = []
    for group in groups:
        for key, index in group:
            meta = torch.empty(reader.shape(key)[len(index):], device="meta")
            plan += [(name, tuple(t.shape)) for name, t in mapping.hf_from_megatron(s, (key, index), meta)]
    return plan


def _find_tokenizer_dir(ckpt_dir: Path, manifest: dict, tokenizer_dir: str | None) -> Path | None:
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        if not path.is_dir():
            raise ValueError(f"--tokenizer-dir {path} is not a directory.")
        return path
    root = ckpt_dir.parent
    recorded = (manifest.get("btx") or {}).get("tokenizer_dir")
    for candidate in ([root / recorded] if recorded else []) + [root / "tokenizer"]:
        if candidate.is_dir():
            return candidate
    return None


def _special_tokens(manifest: dict, tok_dir: Path | None) -> dict[str, Any]:
    special = dict((manifest.get("btx") or {}).get("hf_special_tokens") or {})
    gen = tok_dir / "generation_config.json" if tok_dir else None
    if not special and gen is not None and gen.is_file():
        data = json.loads(gen.read_text())
        special = {k: data[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in data}
    return special


def export_hf(load: str | Path, output: str | Path, *, tokenizer_dir: str | None = None,
              allow_approximate_router: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
              dtype: torch.dtype | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Export the checkpoint at ``load`` (ROOT or iteration dir) to a Hugging Face directory."""
    output = Path(output)
    ckpt_dir, _ = fmt.resolve(load, "--load")
    manifest = fmt.read_manifest(ckpt_dir)
    source = f"--load {load}"
    model_cfg = model_config_from_manifest(manifest, source)
    topk, router_note = (exported_topk(model_cfg, allow_approximate_router, source)
                         if model_cfg.is_moe else (None, None))
    if router_note:
        print(f"[export] WARNING: {router_note}", flush=True)
    shapes = mapping.Shapes.from_model_config(model_cfg)

    reader = CheckpointReader(ckpt_dir)
    _check_metadata(reader, shapes, source)
    stored = {reader.dtype(k) for k in mapping.megatron_global_shapes(shapes)}
    out_dtype = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    if out_dtype not in DTYPES.values():
        raise ValueError(f"{source}: weights are {out_dtype}; pass --dtype float32/bfloat16/float16.")

    tok_dir = _find_tokenizer_dir(ckpt_dir, manifest, tokenizer_dir)
    fmt.check_output(output, [load, ckpt_dir] + ([tok_dir] if tok_dir else []), tool=EXPORT_TOOL, overwrite=overwrite)
    special = _special_tokens(manifest, tok_dir)
    # Built (and validated: Llama-style models only) before any tensor is read.
    hf_cfg = hf_config_from_model(model_cfg, out_dtype, num_experts_per_tok=topk, special_tokens=special)

    groups = list(_read_groups(shapes))
    total_items = sum(len(g) for g in groups)
    total_bytes = sum(int(torch.Size(reader.shape(k)[len(i):]).numel()) * out_dtype.itemsize
                      for g in groups for k, i in g)
    bar = Progress("export", total_bytes, total_items=total_items, enabled=progress)
    staging = staging_dir_for(output)
    try:
        writer = _StreamingShardWriter(staging, _plan(shapes, reader, groups), out_dtype, max_shard_size)
        with ThreadPoolExecutor(1, thread_name_prefix="export-read") as ahead:
            upcoming = ahead.submit(reader.read, groups[0])
            for i, group in enumerate(groups):
                slices = upcoming.result()
                if i + 1 < len(groups):  # read the next group while this one is converted and written
                    upcoming = ahead.submit(reader.read, groups[i + 1])
                for address in group:
                    nbytes = 0
                    for name, tensor in mapping.hf_from_megatron(shapes, address, slices.pop(address)):
                        tensor = tensor.to(out_dtype)
                        writer.add(name, tensor)
                        nbytes += tensor.numel() * tensor.element_size()
                    bar.update(nbytes, items=1)
        shard_names = writer.finish()

        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        copied = copy_tokenizer_files(tok_dir, staging)
        gen_src = tok_dir / "generation_config.json" if tok_dir else None
        if gen_src is not None and gen_src.is_file():
            shutil.copy2(gen_src, staging / "generation_config.json")
        else:
            gen = {k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            (staging / "generation_config.json").write_text(json.dumps(dict(sorted(gen.items())), indent=2) + "\n")
        provenance = {
            "source_checkpoint": str(Path(ckpt_dir).resolve()),
            "iteration": manifest.get("iteration"),
            "kind": manifest.get("kind"),
            "saved_layout": manifest.get("layout"),
            "router_note": router_note,
            "tokenizer_files": copied,
            "vocab_padding_removed": shapes.padded_vocab_size - shapes.vocab_size,
        }
        (staging / "btx_export.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        fmt.mark_output(staging, EXPORT_TOOL)
        fmt.publish_directory(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        reader.close()
    if progress:
        print(f"[export] {hf_cfg['architectures'][0]} -> {output}: {len(shard_names)} shard(s), "
              f"{bar.bytes / 1e6:.1f} MB in {bar.seconds:.1f} s", flush=True)
    return output
