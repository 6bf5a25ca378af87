"""CPU training next to a competing training process: intra-op threads per process.

    python benchmarks/bench_cpu_threads.py              # the built-in seed's shape, 3 rounds
    python benchmarks/bench_cpu_threads.py --iters 40 --rounds 2

Three scenarios run in alternation (so machine noise hits each alike), each a real
``python -m btx_megatron.pretrain`` on mock data with the built-in experiment's seed shape:

- idle: one run, PyTorch's default threads (every core);
- before: two runs at once, both with the default threads (each process uses every core:
  the oversubscription the local runner used to allow);
- after: two runs at once with ``OMP_NUM_THREADS`` = cores / processes, what
  ``launch.local`` gives concurrent CPU runs.

Reported: median tokens/s per run over the steady iterations (the first ``--skip`` are dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The built-in seed (examples/tiny/experiment.yaml): 4 layers, hidden 64, FFN 256, seq 128.
SEED_SHAPE = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--seq-length", "128", "--max-position-embeddings", "128", "--swiglu",
    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear", "--transformer-impl", "local", "--vocab-size", "1024",
]


def run_argv(save: Path, iters: int) -> list[str]:
    return [sys.executable, "-m", "btx_megatron.pretrain", *SEED_SHAPE, "--mock-data",
            "--micro-batch-size", "8", "--global-batch-size", "32", "--train-iters", str(iters),
            "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--save", str(save),
            "--save-interval", "100000", "--no-save-optim", "--seed", "1"]


def steady_tokens_per_s(save: Path, skip: int) -> float:
    records = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [r["tokens_per_s"] for r in records if r.get("type") == "train" and r["iteration"] > skip]
    return statistics.median(rates)


def scenario(work: Path, name: str, processes: int, threads: int | None, iters: int, skip: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    saves = [work / f"{name}-{i}" for i in range(processes)]
    procs = []
    for i, save in enumerate(saves):
        # Each run is its own single-process job with its own rendezvous port.
        penv = {**env, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(29600 + i + 10 * processes)}
        procs.append(subprocess.Popen(run_argv(save, iters), cwd=ROOT, env=penv,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{name}: a run failed (exit {p.returncode}):\n{err[-3000:]}")
    return [steady_tokens_per_s(s, skip) for s in saves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="first iterations left out (warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    plans = [("idle", 1, None), ("before", 2, None), ("after", 2, max(1, cores // 2))]
    results: dict[str, list[float]] = {name: [] for name, _, _ in plans}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        for r in range(args.rounds):
            for name, processes, threads in plans:
                rates = scenario(Path(tmp) / f"r{r}", name, processes, threads, args.iters, args.skip)
                results[name] += rates
                print(f"round {r} {name}: " + ", ".join(f"{x:,.0f}" for x in rates) + " tokens/s per run", flush=True)
    print(f"\n{cores} cores. Median tokens/s per run (steady iterations, {args.rounds} rounds):\n")
    print("| scenario | processes | threads each | tokens/s per run | machine tokens/s |\n|---|---:|---|---:|---:|")
    for name, processes, threads in plans:
        per_run = statistics.median(results[name])
        print(f"| {name} | {processes} | {threads or 'default (' + str(cores) + ')'} | {per_run:,.0f} | "
              f"{per_run * processes:,.0f} |")


if __name__ == "__main__":
    main()
