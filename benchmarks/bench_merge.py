"""Benchmark tools/merge_branches.py: throughput against a plain file copy, peak memory per process.

    python benchmarks/bench_merge.py [--hidden 512 --layers 8 16 --branches 3 --worlds 1 2]

For each model size: N dense branch checkpoints are written by the trainer's saver (Megatron's
chunk layout; hidden 512, SwiGLU FFN 1536, vocab 8192, fp32), then merged in-process with 1 and
2 processes (gloo; library imports done before the clock starts). Printed per run:
* merge rate = (bytes read + bytes written) / merge wall time, and the same for a plain
  read/write copy of the source files (16 MiB buffers, fsync like the merge's writer) measured in
  the same run (read X + write X bytes); the ratio is the figure of merit (target >= 80%). Both
  run with warm page caches (the sources were just written), so this compares CPU-side
  overheads at memory speed, a harder floor than a cold disk.
* peak RSS per process above its post-import baseline (ru_maxrss), next to the sizes of one
  branch and of the MoE output: the merge streams, so it stays near ``max_inflight_mib``
  whatever the model size (flat from 8 to 16 layers).

``benchmarks/bench_merge_peer.py`` measures whole commands (start-up included) against
mergekit-moe on Hugging Face models.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.dist_utils


def _argv(hidden: int, layers: int) -> list[str]:
    return (f"--num-layers {layers} --hidden-size {hidden} --ffn-hidden-size {3 * hidden} "
            f"--num-attention-heads 8 --num-query-groups 4 --seq-length 64 --vocab-size 8192 "
            "--swiglu --normalization RMSNorm --position-embedding-type rope "
            "--untie-embeddings-and-output-weights --disable-bias-linear").split()


def make_branches(root: str, argv: list[str], n: int) -> list[str]:
    import torch

    from btx_megatron.config import parse_config
    from btx_megatron.models import build_model_chunks, transformer_config
    from btx_megatron.runtime.distributed import initialize_distributed
    from btx_megatron.training.checkpointing import save_checkpoint

    cfg, _ = parse_config(argv)
    initialize_distributed(cfg.parallel, seed=1)
    model = build_model_chunks(cfg, transformer_config(cfg))[0]
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        path = os.path.join(root, f"branch{i}")
        save_checkpoint(cfg, 0, [model], save_dir=path)
        paths.append(path)
    return paths


def merge_worker(branches: list[str], output: str, repeat: int = 2) -> dict:
    import torch

    from btx_megatron.merge import MergeOptions, run_merge

    torch.distributed.init_process_group("gloo")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        run_merge(MergeOptions(branches=[(f"b{i}", p) for i, p in enumerate(branches)], output=output,
                               progress=False, overwrite=i > 0))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # First call apart: it includes first-use costs (lazy imports, allocator growth).
    return {"seconds": min(times), "first": times[0], "base_mib": base / 1024, "peak_mib": peak / 1024}


def _files(path: str) -> list[Path]:
    return [f for f in Path(path).rglob("*") if f.is_file()]


def _bytes(path: str) -> int:
    return sum(f.stat().st_size for f in _files(path))


def copy_rate(sources: list[str], dest: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for i, s in enumerate(sources):
        for f in _files(s):
            target = Path(dest) / f"s{i}" / f.relative_to(s)
            target.parent.mkdir(parents=True, exist_ok=True)
            # A user-space read/write copy: shutil.copyfile may use copy_file_range, which some
            # file systems satisfy by sharing blocks (no bytes moved), not a disk-speed floor.
            with open(f, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            n += f.stat().st_size
    os.sync()
    return time.perf_counter() - t0, n


def main() -> None:
    from tests.dist_utils import run_distributed

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--branches", type=int, default=3)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="merges per process; the fastest is reported")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_merge_", dir=args.dir)
    rows = []
    try:
        for layers in args.layers:
            d = os.path.join(work, f"L{layers}")
            branches = run_distributed(make_branches, 1, d, _argv(args.hidden, layers), args.branches)[0]
            src_bytes = sum(_bytes(b) for b in branches)
            copy_times = []
            for _ in range(args.repeat):  # best of --repeat, like the merge
                copy_s, copied = copy_rate(branches, os.path.join(d, "copy"))
                copy_times.append(copy_s)
                shutil.rmtree(os.path.join(d, "copy"))
            copy_mibs = 2 * copied / 2**20 / min(copy_times)
            for world in args.worlds:
                out = os.path.join(d, f"moe_w{world}")
                res = run_distributed(merge_worker, world, branches, out, args.repeat)
                out_bytes = _bytes(out)
                secs = max(r["seconds"] for r in res)
                first = max(r["first"] for r in res)
                merge_mibs = (src_bytes + out_bytes) / 2**20 / secs
                rows.append({
                    "layers": layers, "world": world, "branch_mib": src_bytes / args.branches / 2**20,
                    "moe_mib": out_bytes / 2**20, "merge_s": secs, "first_s": first, "merge_mibs": merge_mibs,
                    "copy_mibs": copy_mibs, "ratio": merge_mibs / copy_mibs,
                    "rss_delta_mib": [round(r["peak_mib"] - r["base_mib"], 1) for r in res],
                    "rss_peak_mib": [round(r["peak_mib"], 1) for r in res],
                })
                shutil.rmtree(out)
                r = rows[-1]
                print(f"L={layers:2d} W={world}: branch {r['branch_mib']:.0f} MiB, MoE {r['moe_mib']:.0f} MiB, "
                      f"merge {r['merge_s']:.2f}s (first call {r['first_s']:.2f}s) = {r['merge_mibs']:.0f} MiB/s (read+write) vs copy "
                      f"{r['copy_mibs']:.0f} MiB/s -> {100 * r['ratio']:.0f}%; peak RSS above baseline per "
                      f"process {r['rss_delta_mib']} MiB (absolute {r['rss_peak_mib']})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
