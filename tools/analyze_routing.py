"""Routing analysis of a BTX MoE: per domain and per layer, the fraction of tokens and the mean
router probability of every expert; writes routing.json and a heatmap PNG per domain.

    python tools/analyze_routing.py --load ckpt/mix --data math=data/math_valid \
        --data code=data/code_valid --data wiki=data/wiki_valid --output analysis/routing \
        [--tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model] [--num-batches 8]

    torchrun --nproc-per-node 8 tools/analyze_routing.py --expert-model-parallel-size 8 ...

The tokenizer defaults to the one recorded in the checkpoint's run_config.json. See
btx_megatron/eval/routing.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _domain(text: str) -> tuple[str, list[str]]:
    name, sep, prefix = text.partition("=")
    if not sep or not name or not prefix:
        raise argparse.ArgumentTypeError(f"--data expects NAME=PREFIX, got {text!r}")
    return name, prefix.split()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="MoE checkpoint ROOT or iter_XXXXXXX directory")
    p.add_argument("--data", action="append", type=_domain, required=True, metavar="NAME=PREFIX",
                   help="evaluation domain (indexed dataset prefix); repeat for each domain")
    p.add_argument("--output", required=True, help="directory for routing.json and routing_<domain>.png")
    p.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"))
    p.add_argument("--tokenizer-model")
    p.add_argument("--num-batches", type=int, default=8, help="micro batches per domain per data-parallel rank")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, help="default: the checkpoint's")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-plots", action="store_true", help="write routing.json only")
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    domains: dict[str, list[str]] = {}
    for name, prefixes in args.data:
        if name in domains:
            print(f"error: --data names {name!r} twice", file=sys.stderr)
            return 2
        domains[name] = prefixes
    from btx_megatron.eval.routing import RoutingAnalysisOptions, analyze
    from btx_megatron.runtime.distributed import run_entrypoint

    opts = RoutingAnalysisOptions(
        load=args.load, domains=domains, output=args.output, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, num_batches=args.num_batches,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, seed=args.seed,
        overwrite=args.overwrite, plots=not args.no_plots,
    )
    out: dict = {}
    if run_entrypoint(lambda: out.update(report=analyze(opts))):
        return 2
    report = out["report"]
    if int(os.environ.get("RANK", "0")) == 0:
        for name, summary in report["domains"].items():
            tops = [layer["top_expert"] for layer in summary["layers"].values()]
            print(f"{name}: top expert per layer {tops}")
        print(f"wrote {args.output}/routing.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
