"""Trainer overhead: steps/s of btx_megatron's training loop vs a bare Megatron-Core loop.

Both run the same model, data and optimizer in one process, alternating rounds so machine
noise hits both alike. The bare loop is what Megatron-Core's minimal example does: DDP-wrapped
GPTModel, `get_forward_backward_func`, optimizer step; no logging, metrics, checkpoints, signals.

    python benchmarks/bench_trainer.py [--rounds 3] [--iters 20]
Target: trainer / bare >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

MODEL = (
    "--num-layers 4 --hidden-size 256 --ffn-hidden-size 704 --num-attention-heads 8 --num-query-groups 4 "
    "--seq-length 256 --vocab-size 4096 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear --mock-data --micro-batch-size 4 "
    "--global-batch-size 8 --lr 1e-4 --log-interval 1 --eval-iters 1 --seed 1"
).split()


def bare_loop(cfg, iters: int) -> float:
    """Seconds per step of the minimal Megatron-Core loop on the trainer's model and data."""
    from btx_megatron.training.setup import setup_training
    from btx_megatron.training.trainer import Trainer, _forward_step

    s = setup_training(cfg)
    data = Trainer.__new__(Trainer)  # only for its dataset builder
    data.cfg, data.datasets, data.tokenizer = cfg, {}, None
    data.build_data()
    dataset = data.datasets["train"]
    from btx_megatron.training.trainer import microbatches

    batches = microbatches(dataset, 0, cfg.train.micro_batch_size, 0, 1)
    start = None
    for step in range(iters + 2):
        if step == 2:  # warm-up excluded
            start = time.perf_counter()
        for chunk in s.model:
            chunk.zero_grad_buffer()
        s.optimizer.zero_grad()
        s.forward_backward(forward_step_func=_forward_step, data_iterator=batches, model=s.model,
                           num_microbatches=s.num_microbatches, seq_length=cfg.model.seq_length,
                           micro_batch_size=cfg.train.micro_batch_size, forward_only=False)
        s.optimizer.step()
        s.scheduler.step(increment=1)
    return (time.perf_counter() - start) / iters


def trainer_loop(cfg, iters: int) -> float:
    from btx_megatron.training.trainer import Trainer

    cfg.train.train_iters = iters
    trainer = Trainer(cfg)
    trainer.train()
    return trainer.loop_seconds / iters


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    from btx_megatron.config import parse_config
    from btx_megatron.pretrain import resolve_vocab
    from btx_megatron.runtime.distributed import initialize_distributed
    from btx_megatron.training.trainer import configure_logging

    configure_logging()
    cfg, _ = parse_config(MODEL)
    resolve_vocab(cfg)
    cfg.validate_layout(1)
    initialize_distributed(cfg.parallel, cfg.train.seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    bare, ours = [], []
    for r in range(args.rounds):
        bare.append(bare_loop(cfg, args.iters))
        ours.append(trainer_loop(cfg, args.iters))
        print(f"round {r}: bare {1 / bare[-1]:.2f} steps/s, trainer {1 / ours[-1]:.2f} steps/s", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print("\n| loop | steps/s (median) |\n|---|---|")
    print(f"| bare Megatron-Core | {1 / b:.3f} |\n| btx_megatron trainer | {1 / o:.3f} |")
    print(f"\ntrainer / bare = {b / o:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
