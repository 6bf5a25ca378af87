"""Hugging Face Llama / Mistral / Mixtral directory -> btx-megatron checkpoint ROOT.

The output is an ordinary checkpoint ROOT (``iter_0000000`` + tracker, see
:mod:`btx_megatron.checkpoint_format`) that ``btx_megatron.pretrain --load ROOT --finetune``
loads at any TP/PP/EP layout, plus::

    ROOT/model_args.txt   the model flags on one line (``$(cat ROOT/model_args.txt)``)
    ROOT/model.yaml       the same options for ``--config``
    ROOT/tokenizer/       tokenizer files copied from the Hugging Face directory

The model is built once at TP=PP=EP=1 (weights not initialised), every parameter is filled
from the Hugging Face tensors through :mod:`.mapping`, and ``GPTModel.sharded_state_dict()`` is
saved with ``dist_checkpointing``: the keys are exactly the ones the trainer saves and loads.
Peak memory is one copy of the model in the checkpoint dtype plus one Hugging Face tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from .. import checkpoint_format as fmt
from . import mapping
from .hf_config import hf_dtype, model_config_from_hf, model_flags
from .io import HFWeights, Progress, copy_tokenizer_files, single_process_group, staging_dir_for

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


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


def _address(local_name: str, item) -> mapping.Address:
    """(global key, layer/expert index) of one entry of a TP=PP=EP=1 sharded state dict."""
    from megatron.core.dist_checkpointing import ShardedTensor

    n = mapping.prepended_axes(item.key)
    if isinstance(item, ShardedTensor):
        assert item.prepend_axis_num == n, (item.key, item.prepend_axis_num)
        return item.key, tuple(item.global_offset[:n])
    # ShardedTensorFactory (SwiGLU fc1): at TP=EP=1 local layer/expert numbers are global.
    index = [int(_LAYER.search(local_name).group(1))] if n >= 1 else []
    if n == 2:
        index.append(int(_EXPERT.search(local_name).group(1)))
    return item.key, tuple(index)


def import_hf(hf_dir: str | Path, output: str | Path, *, make_vocab_size_divisible_by: int = 128,
              seq_length: int | None = None, dtype: torch.dtype | None = None,
              overwrite: bool = False, progress: bool = True) -> Path:
    """Convert ``hf_dir`` into a checkpoint ROOT at ``output``; returns ``output``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    from ..config import Config, PrecisionConfig
    from ..models import build_model_chunks, transformer_config

    hf_dir, output = Path(hf_dir), Path(output)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--hf-dir {hf_dir} has no config.json; point it at a Hugging Face model directory.")
    if output.exists() and not overwrite:
        raise ValueError(f"--output {output} exists; pass --overwrite to replace it.")
    hf = json.loads(config_path.read_text())
    model_cfg, arch, notes = model_config_from_hf(
        hf, source=str(config_path), make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        seq_length=seq_length)
    dtype = dtype or hf_dtype(hf) or torch.float32
    shapes = mapping.Shapes.from_model_config(model_cfg)
    weights = HFWeights(hf_dir)
    _check_hf_weights(weights, shapes, hf_dir)

    single_process_group()
    precision = PrecisionConfig(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    build_cfg = Config(model=dataclasses.replace(model_cfg, transformer_impl="local"), precision=precision)
    tconfig = transformer_config(build_cfg)
    tconfig.perform_initialization = False  # every weight is overwritten below
    model = build_model_chunks(build_cfg, tconfig)[0]
    sharded = model.sharded_state_dict()

    targets = {name: item for name, item in sharded.items() if not isinstance(item, ShardedObject)}
    total = sum(item.data.numel() * item.data.element_size() for item in targets.values())
    bar = Progress("import", len(targets), total, enabled=progress)
    filled: set[mapping.Address] = set()
    expected_shapes = mapping.megatron_global_shapes(shapes)
    with torch.no_grad():
        for name, item in targets.items():
            address = _address(name, item)
            assert address[0] in expected_shapes, f"model key {address[0]} has no mapping"
            value = mapping.megatron_from_hf(shapes, address, weights.get)
            assert tuple(value.shape) == tuple(item.data.shape), (address, value.shape, item.data.shape)
            item.data.copy_(value)
            filled.add(address)
            bar.update(1, item.data.numel() * item.data.element_size())
    wanted = set(mapping.megatron_global_addresses(shapes))
    for layer in range(shapes.num_layers):
        wanted.update(mapping.megatron_layer_addresses(shapes, layer))
    assert filled == wanted, f"unfilled: {sorted(wanted - filled)[:5]} extra: {sorted(filled - wanted)[:5]}"

    staging = staging_dir_for(output)
    try:
        ckpt_dir = fmt.iteration_dir(staging, 0)
        ckpt_dir.mkdir()
        dist_checkpointing.save({"model": sharded, "iteration": 0, "consumed_samples": 0}, str(ckpt_dir))
        tokenizer_files = copy_tokenizer_files(hf_dir, staging / "tokenizer", extra=("generation_config.json",))
        special = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        fmt.write_json_atomic(ckpt_dir / fmt.MANIFEST, _manifest(model_cfg, precision, {
            "converted_from": str(hf_dir.resolve()),
            "hf_architecture": arch,
            "hf_special_tokens": special,
            "tokenizer_dir": "tokenizer" if tokenizer_files else None,
            "vocab_padding": f"rows {model_cfg.vocab_size}..{model_cfg.padded_vocab_size - 1} of the "
                             "embedding/output are zeros added by the import",
            "notes": notes,
        }))
        flags = model_flags(model_cfg)
        (staging / "model_args.txt").write_text(" ".join(flags) + "\n")
        (staging / "model.yaml").write_text(yaml.safe_dump(_flags_to_yaml(flags), sort_keys=False))
        fmt.write_text_atomic(staging / fmt.TRACKER, "0\n")
        fmt.publish_directory(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if progress:
        print(f"[import] {arch} -> {output} ({bar.bytes / 1e6:.1f} MB in {bar.seconds:.1f} s)", flush=True)
    return output


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


def _manifest(model_cfg, precision, btx: dict[str, Any]) -> dict[str, Any]:
    # Same fields as the trainer's manifest (training/checkpointing.save_checkpoint).
    return {
        "format_version": fmt.FORMAT_VERSION,
        "iteration": 0,
        "consumed_samples": 0,
        "kind": "moe" if model_cfg.is_moe else "dense",
        "model": dataclasses.asdict(model_cfg),
        "layout": {
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            "virtual_pipeline_size": None, "expert_model_parallel_size": 1,
            "expert_tensor_parallel_size": 1, "data_parallel_size": 1, "world_size": 1,
            "use_distributed_optimizer": False,
        },
        "optimizer": {"saved": False, "distributed": False, "sharding_type": None},
        "precision": precision.params_dtype_name,
        "tool": f"btx_megatron {__version__} tools/convert_hf.py import",
        "git_revision": _git_revision(),
        "btx": btx,
    }


def _git_revision() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"
