"""Helpers for the mix-phase tests: a tiny "merged" MoE checkpoint and rank workers.

The merged checkpoint is made without the merge tool (whose own tests cover it): the trainer
saves a freshly initialised tiny MoE with ``--no-save-optim`` at iteration 0, and its manifest
gets the ``btx`` provenance section a merge writes. That is exactly what the mix phase reads.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_MODEL = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 "
    "--num-query-groups 2 --seq-length 32 --vocab-size 256 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear"
).split()
TINY_TRAIN = (
    "--mock-data --micro-batch-size 2 --global-batch-size 8 --lr 2e-3 --lr-warmup-iters 2 "
    "--log-interval 1 --eval-iters 1 --seed 7"
).split()
EXPERT_NAMES = ["math", "code", "wiki", "seed"]


def train_worker(argv: list[str]) -> dict:
    """btx_megatron.pretrain in-process on this rank."""
    from btx_megatron.config import parse_config
    from btx_megatron.pretrain import run

    cfg, _ = parse_config(argv)
    result = run(cfg, argv)
    return {"losses": result.losses, "iteration": result.iteration}


def mix_worker(argv: list[str]) -> dict:
    """btx_megatron.pretrain_mix in-process on this rank."""
    from btx_megatron import pretrain_mix

    result = pretrain_mix.run(argv)
    return {"losses": result.losses, "iteration": result.iteration, "exit_reason": result.exit_reason}


def mix_sequence_worker(runs: list[list[str]], read_after: dict[str, str] | None = None, keys=None):
    """Several mix runs one after the other in this process (saves process start-ups).

    The process group stays up between runs (``initialize_distributed`` reuses it and rebuilds
    Megatron's groups); re-creating it on the same port can fail while the old store's socket
    lingers."""
    results = [mix_worker(argv) for argv in runs]
    if read_after:  # {label: checkpoint dir}: model tensors ``keys`` after all runs, whole
        tensors = {label: read_tensors_worker(path) for label, path in read_after.items()}
        return results, {label: {k: t[k] for k in keys} for label, t in tensors.items()}
    return results


def make_merged_checkpoint(root: str | Path, names=EXPERT_NAMES, seed: int = 11, extra_btx: dict | None = None) -> Path:
    """A tiny MoE ROOT at iteration 0, no optimizer state, manifest with merge provenance."""
    from tests.dist_utils import run_distributed

    root = Path(root)
    argv = TINY_MODEL + TINY_TRAIN + [
        "--num-experts", str(len(names)), "--train-iters", "0", "--no-save-optim",
        "--save", str(root), "--seed", str(seed),
    ]
    run_distributed(train_worker, 1, argv)
    manifest_path = root / "iter_0000000" / "btx_checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    # A merge output has no optimizer state. (--no-save-optim should already do this; the
    # manifest is set explicitly so the fixture does not depend on that flag.)
    manifest["optimizer"] = {"saved": False, "distributed": False, "sharding_type": None}
    manifest["btx"] = {
        "method": "btx", "expert_names": list(names), "recommended_topk": 2,
        "sources": [{"name": n, "path": f"/nowhere/{n}"} for n in names],
        "tool": "tests/mix/mix_helpers.py", **(extra_btx or {}),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return root


def read_tensors_worker(ckpt_dir: str) -> dict:
    """Every model tensor of a checkpoint directory, whole (any saved layout)."""
    import torch
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    tensors = load_plain_tensors(ckpt_dir)
    return {k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def metrics(path: str | Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r.get("type") == kind]
