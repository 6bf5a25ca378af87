"""Per-domain validation loss and perplexity of a checkpoint (dense or MoE) or of a BTM ensemble.

    python tools/evaluate.py --load ckpt/mix --eval-domain math=data/math_valid \
        --eval-domain code=data/code_valid --eval-domain wiki=data/wiki_valid \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --output mix_eval.json

    # BTM: branch models kept separate, top-k per sequence by tf-idf similarity
    python tools/evaluate.py --btm --btm-topk 2 \
        --load math=ckpt/math --load code=ckpt/code --load wiki=ckpt/wiki \
        --btm-train-data math=data/math_train --btm-train-data code=data/code_train ... \
        --eval-domain math=data/math_valid ... --output btm_eval.json

Every domain is scored on the same number of sequences (--num-samples; default: the smallest
domain's one pass). See btx_megatron/btx/evaluation.py and btx_megatron/btx/btm.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pair(flag: str):
    def parse(text: str) -> tuple[str, list[str]]:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} expects NAME=PATH, got {text!r}")
        return name, value.split()
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", action="append", required=True, metavar="[NAME=]CKPT",
                   help="checkpoint ROOT or iter dir; with --btm, NAME=CKPT once per branch")
    p.add_argument("--eval-domain", action="append", type=_pair("--eval-domain"), required=True,
                   metavar="NAME=PREFIX", help="held-out indexed dataset of a domain; repeat per domain")
    p.add_argument("--output", required=True, help="JSON file for the results")
    p.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"))
    p.add_argument("--tokenizer-model")
    p.add_argument("--num-samples", type=int, help="sequences per domain (default: smallest domain's one pass)")
    p.add_argument("--seq-length", type=int, help="default: the checkpoint's")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234, help="order of the validation sequences")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true", default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--fp32", dest="bf16", action="store_false")
    p.add_argument("--force-expert", action="append", default=[], metavar="[DOMAIN=]EXPERT",
                   help="MoE only: route every token (of DOMAIN) to EXPERT, a name from the merge "
                        "(e.g. math, seed); repeat per domain")
    p.add_argument("--oracle-routing", action="store_true",
                   help="MoE only: each domain's tokens to the expert of the same name (how much of "
                        "each branch a merged model keeps, with no router training)")
    g = p.add_argument_group("BTM ensemble")
    g.add_argument("--btm", action="store_true", help="ensemble the --load NAME=CKPT branch models")
    g.add_argument("--btm-topk", type=int, default=2)
    g.add_argument("--btm-train-data", action="append", type=_pair("--btm-train-data"), default=[],
                   metavar="NAME=PREFIX", help="a branch's training data (its tf-idf profile)")
    g.add_argument("--btm-weighting", choices=("softmax", "normalized", "uniform"), default="softmax")
    g.add_argument("--btm-temperature", type=float, default=0.1)
    g.add_argument("--btm-context", choices=("causal", "prefix"), default="causal")
    g.add_argument("--btm-prefix-fraction", type=float, default=0.5)
    g.add_argument("--btm-profile-samples", type=int, default=256)
    return p


def _named(pairs, flag: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"{flag} names {name!r} twice.")
        out[name] = value
    return out


def _force_map(args) -> dict[str, str] | None:
    """--oracle-routing / --force-expert [DOMAIN=]EXPERT -> {domain or "*": expert}."""
    force: dict[str, str] = {}
    if args.oracle_routing:
        force.update({name: name for name, _ in args.eval_domain})
    for item in args.force_expert:
        domain, sep, expert = item.rpartition("=")
        key = domain if sep else "*"
        if not expert or (sep and not domain):
            raise ValueError(f"--force-expert expects EXPERT or DOMAIN=EXPERT, got {item!r}.")
        force[key] = expert
    if force and args.btm:
        raise ValueError("--force-expert/--oracle-routing apply to one MoE checkpoint, not to --btm.")
    return force or None


def run(args) -> dict:
    from btx_megatron.btx.evaluation import EvalOptions, evaluate_checkpoint

    opts = EvalOptions(
        domains=_named(args.eval_domain, "--eval-domain"), tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, num_samples=args.num_samples, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, seed=args.seed,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, bf16=args.bf16,
        force_expert=_force_map(args),
    )
    if not args.btm:
        if len(args.load) != 1 or "=" in args.load[0]:
            raise ValueError("give one --load CKPT (several --load NAME=CKPT only with --btm).")
        return evaluate_checkpoint(args.load[0], opts=opts)
    from btx_megatron.btx.btm import BTMOptions, evaluate_btm

    branches = {}
    for item in args.load:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--btm needs --load NAME=CKPT per branch, got {item!r}.")
        if name in branches:
            raise ValueError(f"--load names branch {name!r} twice.")
        branches[name] = path
    btm = BTMOptions(topk=args.btm_topk, weighting=args.btm_weighting, temperature=args.btm_temperature,
                     context=args.btm_context, prefix_fraction=args.btm_prefix_fraction,
                     profile_samples=args.btm_profile_samples)
    return evaluate_btm(branches, _named(args.btm_train_data, "--btm-train-data"), opts=opts, btm=btm)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    from btx_megatron import checkpoint_format as fmt
    from btx_megatron.runtime.distributed import run_entrypoint

    out: dict = {}
    if run_entrypoint(lambda: out.update(result=run(args))):
        return 2
    result = out["result"]
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        fmt.write_json_atomic(args.output, result)
        for name, r in result["domains"].items():
            print(f"{name}: loss {r['loss']:.4f} ppl {r['ppl']:.2f} ({r['tokens']:,} tokens)")
        print(f"average ppl {result['average_ppl']:.2f}; wrote {args.output}")
        if "selection" in result:
            print("BTM top-1 fractions: " + json.dumps({d: s["top1_fraction"] for d, s in result["selection"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
