"""Pretraining entrypoint for every dense or MoE stage (seed, branches, baselines).

    torchrun --nproc-per-node 2 -m btx_megatron.pretrain --num-layers 2 ... --mock-data
    srun python -m btx_megatron.pretrain ...            # rank/world from SLURM
    python -m btx_megatron.pretrain --dry-run --nnodes 1 --nproc-per-node 8 ...  # plan only
"""

from __future__ import annotations

import sys

from btx_megatron.config import Config, parse_config
from btx_megatron.data import build_tokenizer, check_vocab_fits
from btx_megatron.models import virtual_pipeline_size
from btx_megatron.models.specs import resolve_transformer_impl
from btx_megatron.runtime.distributed import initialize_distributed, read_launch_env, run_entrypoint
from btx_megatron.runtime.processes import exit_with_parent
from btx_megatron.training.checkpointer import plan_start
from btx_megatron.training.trainer import Trainer, configure_logging


def resolve_vocab(cfg: Config) -> None:
    """``--vocab-size`` defaults to the tokenizer's size; it may not be smaller."""
    d = cfg.data
    if d.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, cfg.model.vocab_size)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = tokenizer.vocab_size
        check_vocab_fits(tokenizer, cfg.model.vocab_size)
    if cfg.model.vocab_size is None:
        raise ValueError("--vocab-size is required without a tokenizer (e.g. with --mock-data).")
    d.vocab_size = cfg.model.vocab_size


def preflight(cfg: Config) -> str:
    """Checks on paths and the environment that must fail before any model is built; returns
    where the run starts (see :func:`btx_megatron.training.checkpointer.plan_start`)."""
    impl = resolve_transformer_impl(cfg.model.transformer_impl)
    if cfg.precision.fp8_format and impl != "transformer_engine":
        raise ValueError(
            f"--fp8-format {cfg.precision.fp8_format} needs Transformer Engine, which is not "
            "importable here; drop --fp8-format (bf16 still works) or run in the cluster's TE container."
        )
    return plan_start(cfg)


def run(cfg: Config, argv: list[str] | None = None, hooks=None):
    """Initialise distributed state for ``cfg`` and train; returns the TrainResult."""
    configure_logging()
    # A worker whose launcher (torchrun, srun, the pipeline) dies gets SIGTERM: it saves and exits.
    exit_with_parent()
    start = preflight(cfg)
    resolve_vocab(cfg)
    launch = read_launch_env()
    cfg.validate_layout(launch.world_size)
    if launch.rank == 0:
        print(f"[start] {start}", flush=True)
    initialize_distributed(cfg.parallel, cfg.train.seed, virtual_pipeline_size=virtual_pipeline_size(cfg))
    return Trainer(cfg, argv=argv, hooks=hooks).train()


def dry_run_plan(argv: list[str]) -> str:
    """``--dry-run``: validate the config for the planned world size (``--world-size`` or
    ``--nnodes`` x ``--nproc-per-node``) and return the per-device plan; nothing is built,
    loaded or started, so a cluster layout can be planned anywhere."""
    from btx_megatron.training.memory import dry_run, split_dry_run_args

    plan, argv = split_dry_run_args(argv)
    cfg, _ = parse_config(argv)
    if cfg.model.vocab_size is None:
        resolve_vocab(cfg)
    return dry_run(cfg, plan)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from btx_megatron.training.memory import wants_dry_run

    if wants_dry_run(argv):
        return run_entrypoint(lambda: print(dry_run_plan(argv)))
    return run_entrypoint(lambda: run(parse_config(argv)[0], argv))


if __name__ == "__main__":
    sys.exit(main())
