"""Hugging Face Llama / Mistral / Mixtral directory -> btx-megatron checkpoint ROOT.

The output is an ordinary checkpoint ROOT (``iter_0000000`` + tracker, see
:mod:`btx_megatron.checkpoint`) that ``btx_megatron.pretrain --load ROOT --finetune``
loads at any TP/PP/EP layout, plus::

    ROOT/model_args.txt   the model flags on one line (``$(cat ROOT/model_args.txt)``)
    ROOT/model.yaml       the same options for ``--config``
    ROOT/tokenizer/       tokenizer files copied from the Hugging Face directory

Streams: each Megatron slice (one layer of one key, or one expert) is computed from its
Hugging Face tensors through :mod:`.mapping` and written at once as one chunk of a
``torch_dist`` checkpoint (:mod:`btx_megatron.checkpoint.dcp_writer`; a writer thread overlaps the
writes with the next slices' reads). The keys and global shapes are the ones Megatron-Core's
``GPTModel`` saves (:func:`.mapping.megatron_global_shapes`), so the trainer loads the result at
any TP/PP/EP layout. No model is built and Megatron-Core is not imported; peak memory is a few
slices (bounded by the writer's queue), independent of the model size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from .. import checkpoint as fmt
from ..checkpoint import staging_dir_for

IMPORT_TOOL = "convert_hf import"
from ..runtime.progress import Progress
from . import mapping
from .hf_config import PRECISION_OF_DTYPE, hf_dtype, model_config_from_hf, model_flags
from .io import HFWeights, copy_tokenizer_files


def _check_hf_weights(weights: HFWeights, s: mapping.Shapes, hf_dir: Path) -> None:
    expected = mapping.hf_expected_shapes(s)
    names = set(weights.names())
    if s.tied_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    missing = sorted(set(expected) - names)
    if missing:
        raise ValueError(
            f"--hf-dir {hf_dir}: {len(missing)} tensor(s) that config.json implies are missing from the "
            f"weights/index, e.g. {missing[:5]}."
        )
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ValueError(
            f"--hf-dir {hf_dir}: unexpected tensor(s) for this config.json, e.g. {unexpected[:5]}; "
            "the architecture has features this converter does not map."
        )
    for name, shape in expected.items():
        found = weights.shape(name)
        if found != shape:
            raise ValueError(
                f"--hf-dir {hf_dir}: {name} has shape {list(found)} but config.json implies {list(shape)}."
            )


def _addresses(s: mapping.Shapes) -> list[mapping.Address]:
    """Every Megatron slice, in write order: global tensors, then layer by layer."""
    addrs = list(mapping.megatron_global_addresses(s))
    for layer in range(s.num_layers):
        addrs += mapping.megatron_layer_addresses(s, layer)
    return addrs


def import_hf(hf_dir: str | Path, output: str | Path, *, make_vocab_size_divisible_by: int = 128,
              seq_length: int | None = None, dtype: torch.dtype | None = None,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Convert ``hf_dir`` into a checkpoint ROOT at ``output``; returns ``output``."""
    from ..runtime.distributed import read_launch_env

    hf_dir, output = Path(hf_dir), Path(output)
    if read_launch_env().world_size > 1:
        raise ValueError("tools/convert_hf.py runs as one process; launch it with python, not torchrun/srun.")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--hf-dir {hf_dir} has no config.json; point it at a Hugging Face model directory.")
    fmt.check_output(output, [hf_dir], tool=IMPORT_TOOL, overwrite=overwrite)
    hf = json.loads(config_path.read_text())
    model_cfg, arch, notes = model_config_from_hf(
        hf, source=str(config_path), make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        seq_length=seq_length)
    dtype = dtype or hf_dtype(hf) or torch.float32
    shapes = mapping.Shapes.from_model_config(model_cfg)
    weights = HFWeights(hf_dir)
    _check_hf_weights(weights, shapes, hf_dir)

    staging = staging_dir_for(output)
    try:
        ckpt_dir = fmt.iteration_dir(staging, 0)
        ckpt_dir.mkdir()
        bar = _write_weights(ckpt_dir, weights, shapes, dtype, progress)
        tokenizer_files = copy_tokenizer_files(hf_dir, staging / "tokenizer", extra=("generation_config.json",))
        special = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        _manifest(model_cfg, PRECISION_OF_DTYPE.get(dtype, "fp32"), {
            "converted_from": str(hf_dir.resolve()),
            "hf_architecture": arch,
            "hf_special_tokens": special,
            "tokenizer_dir": "tokenizer" if tokenizer_files else None,
            "vocab_padding": f"rows {model_cfg.vocab_size}..{model_cfg.padded_vocab_size - 1} of the "
                             "embedding/output are zeros added by the import",
            "notes": notes,
        }).write(ckpt_dir)
        flags = model_flags(model_cfg)
        (staging / "model_args.txt").write_text(" ".join(flags) + "\n")
        (staging / "model.yaml").write_text(yaml.safe_dump(_flags_to_yaml(flags), sort_keys=False))
        fmt.write_text_atomic(staging / fmt.TRACKER, "0\n")
        fmt.mark_output(staging, IMPORT_TOOL)
        fmt.publish_directory(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        weights.close()
    if progress:
        print(f"[import] {arch} -> {output} ({bar.bytes / 1e6:.1f} MB in {bar.seconds:.1f} s)", flush=True)
    return output


def _write_weights(ckpt_dir: Path, weights: HFWeights, s: mapping.Shapes, dtype: torch.dtype,
                   progress: bool) -> Progress:
    """Every Megatron slice as one chunk of ``ckpt_dir`` (plus the common state and metadata)."""
    from ..checkpoint.dcp_writer import COMMON_STATE_KEY, DistcpWriter, common_state_bytes, write_metadata

    global_shapes = mapping.megatron_global_shapes(s)
    addresses = _addresses(s)
    total = sum(math.prod(global_shapes[key][len(index):]) for key, index in addresses) * dtype.itemsize
    bar = Progress("import", total, total_items=len(addresses), enabled=progress)
    writer = DistcpWriter(ckpt_dir, 0)
    try:
        writer.add_bytes(COMMON_STATE_KEY, common_state_bytes({"iteration": 0, "consumed_samples": 0}))
        for key, index in addresses:
            value = mapping.megatron_from_hf(s, (key, index), lambda name: weights.get(name).to(dtype))
            chunk = value.reshape((1,) * len(index) + tuple(value.shape))
            assert tuple(chunk.shape[len(index):]) == tuple(global_shapes[key][len(index):]), (key, chunk.shape)
            writer.add_tensor(key, tuple(index) + (0,) * value.dim(), chunk, global_shapes[key])
            bar.update(value.numel() * value.element_size(), items=1)
        chunks = writer.close()
    except BaseException:
        writer.abort()
        raise
    write_metadata(ckpt_dir, chunks)
    return bar


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _flags_to_yaml(flags: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        name = flags[i][2:]
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            out[name] = _scalar(flags[i + 1])
            i += 2
        else:
            out[name] = True
            i += 1
    return out


def _manifest(model_cfg, precision: str, btx: dict[str, Any]) -> fmt.Manifest:
    return fmt.Manifest(model=dataclasses.asdict(model_cfg), tool=f"btx_megatron {__version__} tools/convert_hf.py import",
                        precision=precision, extra={"btx": btx})
