"""Module-level functions run on gloo ranks by the distributed tests (must be picklable)."""

from __future__ import annotations

import torch

TINY_DENSE = (
    "--num-layers 4 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 "
    "--num-query-groups 2 --seq-length 32 --vocab-size 256 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
    "--mock-data --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 2 "
    "--log-interval 100 --eval-iters 1 --seed 7"
).split()

TINY_MOE = TINY_DENSE + "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01".split()


def train(argv: list[str]) -> dict:
    """Run btx_megatron.pretrain in-process; return losses and a weight fingerprint."""
    from btx_megatron.config import parse_config
    from btx_megatron.pretrain import run

    cfg, _ = parse_config(argv)
    result = run(cfg, argv)
    return {"losses": result.losses, "iteration": result.iteration, "eval": result.eval_history[-1]}


def load_and_forward(argv: list[str], load: str) -> list[float]:
    """Per-sample mean loss of a fixed batch after loading ``load`` (logits parity checks)."""
    from btx_megatron.config import parse_config
    from btx_megatron.models import virtual_pipeline_size
    from btx_megatron.pretrain import resolve_vocab
    from btx_megatron.runtime.distributed import initialize_distributed
    from btx_megatron.training import checkpointing
    from btx_megatron.training.components import Evaluator
    from btx_megatron.training.trainer import Trainer

    cfg, _ = parse_config(argv + ["--load", load, "--finetune", "--train-iters", "0"])
    resolve_vocab(cfg)
    cfg.validate_layout(torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(__import__("os").environ["WORLD_SIZE"]))
    initialize_distributed(cfg.parallel, cfg.train.seed, virtual_pipeline_size=virtual_pipeline_size(cfg))
    trainer = Trainer(cfg)
    checkpointing.load_model_weights(trainer.model, load)
    trainer.build_data()
    return [Evaluator(cfg, trainer.setup, trainer.datasets).loss(trainer.datasets["valid"])]
