"""Pretraining entrypoint for every dense or MoE stage (seed, branches, baselines).

    torchrun --nproc-per-node 2 -m btx_megatron.pretrain --num-layers 2 ... --mock-data
    srun python -m btx_megatron.pretrain ...            # rank/world from SLURM
"""

from __future__ import annotations

import sys

from btx_megatron.config import Config, parse_config


def resolve_vocab(cfg: Config) -> None:
    """``--vocab-size`` defaults to the tokenizer's size; it may not be smaller."""
    d = cfg.data
    if d.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        from btx_megatron.data import build_tokenizer, check_vocab_fits

        tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, cfg.model.vocab_size)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = tokenizer.vocab_size
        check_vocab_fits(tokenizer, cfg.model.vocab_size)
    if cfg.model.vocab_size is None:
        raise ValueError("--vocab-size is required without a tokenizer (e.g. with --mock-data).")
    d.vocab_size = cfg.model.vocab_size


def preflight(cfg: Config) -> None:
    """Checks on paths and the environment that must fail before any model is built."""
    from btx_megatron import checkpoint_format as fmt
    from btx_megatron.models.specs import resolve_transformer_impl

    impl = resolve_transformer_impl(cfg.model.transformer_impl)
    if cfg.precision.fp8_format and impl != "transformer_engine":
        raise ValueError(
            f"--fp8-format {cfg.precision.fp8_format} needs Transformer Engine, which is not "
            "importable here; drop --fp8-format (bf16 still works) or run in the cluster's TE container."
        )
    ck = cfg.checkpoint
    if ck.load:
        own_resume = ck.save and fmt.read_tracker(ck.save) is not None
        if not own_resume:
            fmt.resolve(ck.load, "--load")
    if ck.save and not ck.load and not ck.overwrite_save and fmt.read_tracker(ck.save) is not None:
        raise ValueError(
            f"--save {ck.save} already holds checkpoints of another run, and --load is not given. "
            f"Resume it with --load {ck.save}, pick a new --save directory, or pass --overwrite-save."
        )


def run(cfg: Config, argv: list[str] | None = None, stage: str = "pretrain", trainer_cls=None):
    """Initialise distributed state for ``cfg`` and train; returns the TrainResult."""
    from btx_megatron.models import virtual_pipeline_size
    from btx_megatron.runtime.distributed import initialize_distributed, read_launch_env
    from btx_megatron.training.trainer import Trainer, configure_logging

    configure_logging()
    preflight(cfg)
    resolve_vocab(cfg)
    cfg.validate_layout(read_launch_env().world_size)
    initialize_distributed(cfg.parallel, cfg.train.seed, virtual_pipeline_size=virtual_pipeline_size(cfg))
    trainer = (trainer_cls or Trainer)(cfg, argv=argv, stage=stage)
    return trainer.train()


def main(argv: list[str] | None = None) -> int:
    from btx_megatron.runtime.distributed import run_entrypoint

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_entrypoint(lambda: run(parse_config(argv)[0], argv))


if __name__ == "__main__":
    sys.exit(main())
