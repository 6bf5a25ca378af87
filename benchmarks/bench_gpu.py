"""GPU throughput and MFU of the trainer: a ~1B Llama-shape dense model and a 4-expert top-2 MoE
built on the same shape, single GPU, bf16, mock data (no Transformer Engine needed: the local
spec uses PyTorch's fused scaled_dot_product_attention).

    python benchmarks/bench_gpu.py [--iters 30] [--seq-length 2048] [--micro-batch-size 4]

Prints tokens/s, TFLOP/s and MFU against the measured bf16 matmul peak of this GPU (8192^3) and
against the vendor peak. Targets: dense >= 45% MFU, MoE >= 35%. Finishes in about 5 minutes on
one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

SHAPE = (
    "--num-layers 16 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 "
    "--num-query-groups 8 --vocab-size 32000 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
    "--bf16 --mock-data --lr 1e-4 --eval-iters 1"
).split()


def run(extra: list[str], iters: int, seq: int, mbs: int, out: Path) -> dict:
    from btx_megatron.config import parse_config
    from btx_megatron.pretrain import run as run_training

    argv = SHAPE + extra + ["--seq-length", str(seq), "--micro-batch-size", str(mbs),
                            "--global-batch-size", str(mbs * 4), "--train-iters", str(iters),
                            "--log-interval", "5", "--metrics-file", str(out)]
    cfg, _ = parse_config(argv)
    run_training(cfg, argv)
    records = [json.loads(l) for l in out.read_text().splitlines() if '"train"' in l]
    steady = records[1:] or records  # the first window includes compilation and warm-up
    tok = sum(r["tokens_per_s"] for r in steady) / len(steady)
    tfl = sum(r["tflops_per_device"] for r in steady) / len(steady)
    return {"tokens_per_s": tok, "tflops": tfl, "mem": max(r["peak_mem_gib"] for r in records)}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    args = p.parse_args()
    import torch

    from btx_megatron.runtime.distributed import destroy
    from btx_megatron.training.metrics import device_peak_tflops, measured_matmul_tflops

    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    measured = measured_matmul_tflops(8192, 20)
    vendor, source = device_peak_tflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [("dense ~1.2B", []),
                            ("MoE 4x top-2", ["--num-experts", "4", "--moe-router-topk", "2",
                                              "--moe-token-dispatcher-type", "alltoall"])]:
            r = run(extra, args.iters, args.seq_length, args.micro_batch_size, Path(tmp) / f"{len(rows)}.jsonl")
            destroy()
            rows.append((name, r))
    print(f"\nGPU: {torch.cuda.get_device_name()} | measured bf16 matmul peak {measured:.0f} TFLOP/s | "
          f"vendor peak {vendor:.0f} ({source})")
    print("| model | tokens/s | TFLOP/s | MFU (measured peak) | MFU (vendor peak) | peak mem GiB |\n|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {100 * r['tflops'] / measured:.1f}% | "
              f"{100 * r['tflops'] / vendor:.1f}% | {r['mem']:.1f} |")


if __name__ == "__main__":
    main()
