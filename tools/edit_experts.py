"""Grow and prune a trained BTX model: add a domain expert, remove one, list the experts.

    python tools/edit_experts.py add --load ckpt/btx --branch law=ckpt/law --output ckpt/btx+law \
        [--router-init centroid --centroid-data law=/data/law_train \
         [--centroid-contrast math=/data/math_train --centroid-contrast code=/data/code_train] \
         --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model] [--blend-shared 0.2]
    python tools/edit_experts.py remove --load ckpt/btx --expert wiki --output ckpt/btx-wiki \
        [--moe-router-topk 1] [--expert-model-parallel-size 2]
    python tools/edit_experts.py list --load ckpt/btx [--json]

    torchrun --nproc-per-node 8 tools/edit_experts.py add ...   # work and memory split 8 ways
    python tools/edit_experts.py add --workers 8 ...            # the same split over 8 forked processes

``add``: the new expert (last) is the dense branch's FFN; shared weights stay the BTX model's
(or are blended with the branch's); the router row is the BTX model's mean hidden state on the
new domain (centroid) or random. ``remove``: drops an expert and its router row. Both write a new
checkpoint ROOT (model weights, iteration 0) that loads at any TP/PP/EP, and append the edit to
the manifest's history. See btx_megatron/merge/edit.py.
"""

from __future__ import annotations

import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--load", required=True, metavar="DIR", help="the BTX MoE checkpoint (ROOT or iter dir)")
        q.add_argument("--output", required=True, metavar="DIR", help="new checkpoint ROOT")
        q.add_argument("--moe-router-topk", type=int, dest="topk",
                       help="top-k recommended to the result (default: the loaded model's)")
        q.add_argument("--expert-model-parallel-size", type=int,
                       help="refuse a result whose expert count this EP size does not divide")
        q.add_argument("--overwrite", action="store_true", help="replace --output (only once the new one is complete)")
        q.add_argument("--full-hash", action="store_true", help="provenance hashes over every byte")
        q.add_argument("--quiet", action="store_true", help="no progress lines")
        q.add_argument("--workers", type=int, default=1, metavar="N",
                       help="fork N worker processes after the imports, each writing 1/N of the result (the split "
                            "of an N-process torchrun launch without its start-up; not under torchrun/srun)")

    add = sub.add_parser("add", help="add a dense branch's FFN as a new expert")
    common(add)
    add.add_argument("--branch", required=True, type=_name_value("--branch"), metavar="NAME=DIR",
                     help="the new domain's dense branch (trained from the BTX model's seed)")
    add.add_argument("--router-init", choices=("random", "centroid"), default="random")
    add.add_argument("--router-seed", type=int, default=1234)
    add.add_argument("--centroid-data", action="append", default=[], type=_name_value("--centroid-data"),
                     metavar="NAME=PREFIX", help="the new domain's data for --router-init centroid (repeatable)")
    add.add_argument("--centroid-contrast", action="append", default=[], type=_name_value("--centroid-contrast"),
                     metavar="NAME=PREFIX", help="other domains' data (repeatable): the row points from their mean "
                     "hidden state to the new domain's, so it tells the new domain apart from the old ones")
    add.add_argument("--centroid-samples", type=int, default=16, help="sequences per domain for the centroids")
    add.add_argument("--centroid-seq-length", type=int, help="default: the model's seq length")
    add.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"))
    add.add_argument("--tokenizer-model")
    add.add_argument("--blend-shared", type=float, default=0.0, metavar="W",
                     help="shared weights = (1-W)*BTX + W*branch (default 0: keep the BTX model's)")

    rm = sub.add_parser("remove", help="remove an expert and its router row")
    common(rm)
    rm.add_argument("--expert", action="append", required=True, metavar="NAME",
                    help="expert to remove (a source name removes all its split chunks); repeatable")

    ls = sub.add_parser("list", help="experts, their sources and the edit history")
    ls.add_argument("--load", required=True, metavar="DIR")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--full-hash", action="store_true", help="hash every byte of the checkpoint")
    return p


def options_from_args(args):
    from btx_megatron.merge.edit_options import AddOptions, RemoveOptions

    common = dict(load=args.load, output=args.output, topk=args.topk, overwrite=args.overwrite,
                  expert_model_parallel_size=args.expert_model_parallel_size, full_hash=args.full_hash,
                  progress=not args.quiet, workers=args.workers)
    if args.command == "remove":
        return RemoveOptions(experts=list(args.expert), **common)
    if args.router_init == "random" and (args.centroid_data or args.centroid_contrast):
        raise ValueError("--centroid-data / --centroid-contrast need --router-init centroid.")
    data: dict[str, list[str]] = {}
    for name, prefix in args.centroid_data:
        data.setdefault(name, []).append(prefix)
    contrast: dict[str, list[str]] = {}
    for name, prefix in args.centroid_contrast:
        contrast.setdefault(name, []).append(prefix)
    return AddOptions(branch=args.branch, router_init=args.router_init, router_seed=args.router_seed,
                      centroid_data=data or None, contrast_data=contrast or None,
                      centroid_samples=args.centroid_samples,
                      centroid_seq_length=args.centroid_seq_length, tokenizer_type=args.tokenizer_type,
                      tokenizer_model=args.tokenizer_model, blend_shared=args.blend_shared, **common)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Only centroid routers import Megatron-Core, which warns about missing GPU-only extensions.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|deprecated|DEPRECATED).*")
    from btx_megatron.merge import edit, edit_list
    from btx_megatron.runtime.processes import WorkerFailed

    try:
        if args.command == "list":
            info = edit_list.describe(args.load, args.full_hash)
            print(json.dumps(info, indent=2) if args.json else edit_list.format_description(info))
            return 0
        opts = options_from_args(args)
        out = edit.add_expert(opts) if args.command == "add" else edit.remove_expert(opts)
    except ValueError as exc:
        print(f"edit_experts: error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # --workers: a worker was killed, or the workers were stopped by a signal
        print(f"edit_experts: error: {exc}", file=sys.stderr)
        return 1
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if not args.quiet and rank == "0":
        print(f"edit_experts: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from btx_megatron.runtime.processes import exit_now

    exit_now(main())
