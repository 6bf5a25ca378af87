"""Merge dense BTX branch checkpoints into one MoE checkpoint (Branch-Train-MiX).

    python tools/merge_branches.py --branch math=ckpt/math --branch code=ckpt/code \
        --branch wiki=ckpt/wiki [--seed-expert ckpt/seed] --output ckpt/moe

    python tools/merge_branches.py --workers 8 ...              # same, split over 8 forked processes
    torchrun --nproc-per-node 8 tools/merge_branches.py ...    # same, work and memory split 8 ways
    srun -N 2 --ntasks-per-node 8 python tools/merge_branches.py ...

Expert i of every layer is branch i's FFN (in the order given); every other weight is the
average of the branches; the router is new. Variants: --split-experts C, --blend-experts,
--upcycle-from DIR --num-experts N. The output is a checkpoint ROOT (iter_0000000) with no
optimizer state that the mix phase loads at any TP/PP/EP layout. See btx_megatron/merge/.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _name_value(flag: str):
    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} expects NAME=VALUE, got {text!r}")
        return name, value

    return parse


def _group(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """NAME=VALUE pairs -> NAME -> [VALUE, ...] in the order given."""
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def _weights(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--weights expects NAME=W,NAME=W,..., got {item!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    from btx_megatron.config.model import ROUTER_TYPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    src = p.add_argument_group("sources")
    src.add_argument("--branch", action="append", default=[], type=_name_value("--branch"), metavar="NAME=DIR",
                     help="dense branch checkpoint (ROOT or iter dir); repeat; expert order = order given")
    src.add_argument("--seed-expert", metavar="DIR", help="add the seed model's FFN as a last expert named 'seed'")
    src.add_argument("--upcycle-from", metavar="DIR", help="sparse upcycling: every expert a copy of this dense FFN")
    src.add_argument("--num-experts", type=int, help="experts for --upcycle-from")
    src.add_argument("--upcycle-noise", type=float, default=0.0,
                     help="Gaussian noise added to each upcycled expert weight, relative to the weight's std")
    src.add_argument("--full-hash", action="store_true",
                     help="provenance hash over every byte of the sources (default: metadata + sampled bytes)")
    src.add_argument("--allow-duplicates", action="store_true",
                     help="accept the same checkpoint more than once (ablations and tests)")
    m = p.add_argument_group("merge")
    m.add_argument("--weights", type=_weights, metavar="NAME=W,...",
                   help="averaging weights for the non-expert weights (default uniform over --branch; "
                        "the seed expert gets 0 unless named)")
    m.add_argument("--split-experts", type=int, metavar="C", help="cut each FFN into C experts (N*C experts)")
    m.add_argument("--split-scale", choices=("exact", "megatron", "none"), default="exact",
                   help="compensating scale for split experts: exact (fc2 x C: equal-weight routing over the "
                        "C chunks reproduces the dense FFN), megatron (Megatron-Core granular upcycling), none")
    m.add_argument("--blend-experts", action="store_true", help="expert n = n-th FFN chunk of every branch")
    m.add_argument("--moe-router-topk", type=int, dest="topk",
                   help="top-k the mix phase will use (default: the branches' setting); split multiplies it")
    m.add_argument("--moe-router-type", dest="router_type", choices=ROUTER_TYPES,
                   help="router type the mix phase will use, recorded in the merged model's configuration "
                        "(default: the branches' setting, topk); top-1 routing needs switch or sample-top1")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: the sources')")
    r = p.add_argument_group("router")
    r.add_argument("--router-init", choices=("random", "centroid"), default="random")
    r.add_argument("--router-seed", type=int, default=1234)
    r.add_argument("--centroid-data", action="append", default=[], type=_name_value("--centroid-data"),
                   metavar="NAME=PREFIX", help="each branch's data prefix for --router-init centroid; repeat a "
                   "NAME to average over several prefixes (e.g. the seed's blend)")
    r.add_argument("--centroid-file", help="precomputed centroids (torch.save of {'names', 'centroids' [N, L, H]})")
    r.add_argument("--centroid-samples", type=int, default=16, help="sequences per domain for centroids")
    r.add_argument("--centroid-seq-length", type=int, help="default: the branches' seq length")
    r.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"))
    r.add_argument("--tokenizer-model")
    o = p.add_argument_group("output")
    o.add_argument("--output", required=True, metavar="DIR", help="new checkpoint ROOT")
    o.add_argument("--overwrite", action="store_true", help="replace --output (only once the new one is complete)")
    o.add_argument("--quiet", action="store_true", help="no progress lines")
    o.add_argument("--io-threads", type=int, default=2, help="threads per process reading sources ahead of the merge")
    o.add_argument("--workers", type=int, default=1, metavar="N",
                   help="fork N worker processes after the imports, each merging 1/N of the output (the split of "
                        "an N-process torchrun launch without its start-up; not under torchrun/srun)")
    return p


def options_from_args(args):
    from btx_megatron.merge import MergeOptions

    if args.split_experts and args.blend_experts:
        raise ValueError("choose one of --split-experts and --blend-experts.")
    if args.upcycle_from and (args.split_experts or args.blend_experts):
        raise ValueError("--upcycle-from cannot be combined with --split-experts/--blend-experts.")
    if args.num_experts is not None and not args.upcycle_from:
        raise ValueError("--num-experts applies to --upcycle-from; BTX makes one expert per --branch.")
    method = "split" if args.split_experts else "blend" if args.blend_experts else "upcycle" if args.upcycle_from else "btx"
    if args.router_init == "random" and (args.centroid_data or args.centroid_file):
        raise ValueError("--centroid-data/--centroid-file need --router-init centroid.")
    centroids, names = None, None
    if args.centroid_file:
        import torch

        saved = torch.load(args.centroid_file, map_location="cpu", weights_only=True)
        centroids, names = saved["centroids"], list(saved["names"])
    opts = MergeOptions(
        branches=list(args.branch), output=args.output, seed_expert=args.seed_expert,
        upcycle_from=args.upcycle_from, num_experts=args.num_experts, method=method,
        split=args.split_experts or 1, split_scale=args.split_scale, upcycle_noise=args.upcycle_noise,
        weights=args.weights, router_init=args.router_init, router_seed=args.router_seed, topk=args.topk,
        router_type=args.router_type,
        overwrite=args.overwrite, full_hash=args.full_hash, allow_duplicates=args.allow_duplicates,
        progress=not args.quiet, dtype=args.dtype, centroids=centroids,
        centroid_data=_group(args.centroid_data) or None, centroid_samples=args.centroid_samples,
        centroid_seq_length=args.centroid_seq_length, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, io_threads=args.io_threads, workers=args.workers,
    )
    if names is not None:
        want = [n for n, _ in opts.branches] + (["seed"] if opts.seed_expert else [])
        if opts.upcycle_from:
            want = ["upcycle"]
        if names != want:
            raise ValueError(f"--centroid-file {args.centroid_file} holds centroids for {names}, the sources are {want}.")
        opts.centroid_info = {"file": args.centroid_file}
    return opts


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Only centroid routers import Megatron-Core, which warns about missing GPU-only extensions.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|deprecated|DEPRECATED).*")
    from btx_megatron.merge import run_merge
    from btx_megatron.runtime.processes import WorkerFailed

    try:
        opts = options_from_args(args)
        out = run_merge(opts)
    except ValueError as exc:
        print(f"merge_branches: error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # --workers: a worker was killed, or the workers were stopped by a signal
        print(f"merge_branches: error: {exc}", file=sys.stderr)
        return 1
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if not args.quiet and rank == "0":
        print(f"merge_branches: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from btx_megatron.runtime.processes import exit_now

    exit_now(main())
