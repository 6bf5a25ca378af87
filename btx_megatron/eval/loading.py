"""A checkpoint, loaded for evaluation: the one place that turns ``--load PATH`` into a model.

Every evaluation (perplexity, routing analysis, lm-evaluation-harness, text generation) goes
through :func:`load_for_eval`: resolve the checkpoint, check its DCP files
(:func:`btx_megatron.checkpoint.verify_files`, so a truncated checkpoint is one clear message),
read the manifest, find the tokenizer (flags, else the run's ``run_config.json``), build a
:class:`~btx_megatron.config.Config` with the checkpoint's architecture and the requested
layout (:func:`build_eval_config`), start the process groups and build the model exactly as
training does (``training.setup.setup_training``), load the weights and switch to eval mode.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as fmt


@dataclasses.dataclass(kw_only=True)
class ModelLoadOptions:
    """How to load a checkpoint for evaluation; the evaluation option classes extend it."""

    tokenizer_type: str | None = None       # default: the run_config.json next to the checkpoint
    tokenizer_model: str | None = None
    seq_length: int | None = None           # default: the checkpoint's
    micro_batch_size: int = 4
    seed: int = 1234                        # sample order (perplexity) / sampling seed (generation)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    bf16: bool | None = None                # None: bf16 on CUDA, fp32 on CPU

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}.")
        if self.seq_length is not None and self.seq_length < 2:
            raise ValueError(f"--seq-length must be >= 2, got {self.seq_length}.")


def tokenizer_from_run_config(path: str | Path) -> tuple[str | None, str | None]:
    """The tokenizer a trainer run recorded in ``run_config.json`` (None, None if absent).

    Looked for in ``path`` (a save ROOT), its parent (``path`` an ``iter_XXXXXXX`` directory) and
    grandparent (a stage directory holding ``checkpoints/``)."""
    p = Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        f = candidate / "run_config.json"
        if f.is_file():
            data = json.loads(f.read_text()).get("config", {}).get("data", {})
            if data.get("tokenizer_type"):
                return data.get("tokenizer_type"), data.get("tokenizer_model")
    return None, None


def resolve_tokenizer(path: str | Path, tokenizer_type: str | None,
                      tokenizer_model: str | None) -> tuple[str, str | None]:
    """The given tokenizer, else the run's; ValueError naming the flags when neither exists."""
    if tokenizer_type:
        return tokenizer_type, tokenizer_model
    tt, tm = tokenizer_from_run_config(path)
    if tt is None:
        raise ValueError(
            f"--load {path} has no run_config.json naming its tokenizer (merged and converted "
            "checkpoints have none); pass --tokenizer-type and --tokenizer-model."
        )
    return tt, tm


def build_eval_config(manifest: dict, opts: ModelLoadOptions, tokenizer_type: str, tokenizer_model: str | None,
                      *, domains: dict[str, list[str]] | None = None, eval_iters: int = 1):
    """A :class:`Config` with the checkpoint's architecture and the requested evaluation layout."""
    from ..config import Config
    from ..config.schema import SECTIONS

    model_fields = {f.name for f in dataclasses.fields(SECTIONS["model"])}
    model = {k: v for k, v in manifest["model"].items() if k in model_fields}
    if opts.seq_length is not None:
        model["seq_length"] = opts.seq_length
        model["max_position_embeddings"] = max(opts.seq_length, model.get("max_position_embeddings") or 0)
    bf16 = torch.cuda.is_available() if opts.bf16 is None else opts.bf16
    tp = opts.tensor_model_parallel_size
    return Config.from_dict({
        "model": model,
        "parallel": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": opts.pipeline_model_parallel_size,
            "expert_model_parallel_size": opts.expert_model_parallel_size,
            "sequence_parallel": tp > 1,
        },
        "precision": {"bf16": bool(bf16)},
        "train": {"micro_batch_size": opts.micro_batch_size, "train_iters": 0, "seed": opts.seed},
        "data": {"eval_domains": domains or {}, "tokenizer_type": tokenizer_type, "tokenizer_model": tokenizer_model},
        "logging": {"eval_iters": eval_iters},
    })


@dataclasses.dataclass
class LoadedModel:
    path: str
    ckpt_dir: Path
    iteration: int
    manifest: dict
    cfg: Any
    setup: Any
    tokenizer: Any
    forced_experts: dict[str, str] | None = None  # domain -> expert name (EvalOptions.force_expert)

    @property
    def model(self) -> list[torch.nn.Module]:
        return self.setup.model

    def expert_names(self) -> list[str]:
        """The MoE checkpoint's expert names (merge manifest), else expert_0 ... expert_{N-1}."""
        n = self.cfg.model.num_experts or 0
        names = list((self.manifest.get("btx") or {}).get("expert_names") or [])
        return names if len(names) == n else [f"expert_{i}" for i in range(n)]


def load_for_eval(path: str | Path, opts: ModelLoadOptions, *, domains: dict[str, list[str]] | None = None,
                  eval_iters: int = 1) -> LoadedModel:
    """Initialise distributed state (idempotent), build the checkpoint's model and load weights."""
    from ..data import build_tokenizer, check_vocab_fits
    from ..models import virtual_pipeline_size
    from ..runtime.distributed import initialize_distributed, read_launch_env
    from ..training.checkpointing import load_model_weights
    from ..training.setup import setup_training

    ckpt_dir, iteration = fmt.resolve(path, "--load")
    manifest = fmt.read_manifest(ckpt_dir)
    fmt.verify_files(ckpt_dir, f"--load {path}")
    tokenizer_type, tokenizer_model = resolve_tokenizer(path, opts.tokenizer_type, opts.tokenizer_model)
    cfg = build_eval_config(manifest, opts, tokenizer_type, tokenizer_model, domains=domains, eval_iters=eval_iters)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, cfg.model.vocab_size)
    check_vocab_fits(tokenizer, cfg.model.vocab_size)
    cfg.validate_layout(read_launch_env().world_size)
    initialize_distributed(cfg.parallel, cfg.train.seed, virtual_pipeline_size=virtual_pipeline_size(cfg))
    setup = setup_training(cfg, with_optimizer=False)
    load_model_weights(setup.model, path)
    for chunk in setup.model:
        chunk.eval()
    return LoadedModel(str(path), ckpt_dir, iteration, manifest, cfg, setup, tokenizer)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


__all__ = ["LoadedModel", "ModelLoadOptions", "build_eval_config", "load_for_eval", "rank", "resolve_tokenizer",
           "tokenizer_from_run_config"]
