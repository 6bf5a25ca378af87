"""Evaluate a checkpoint: per-domain perplexity, a BTM ensemble, or downstream tasks through
lm-evaluation-harness.

    python tools/evaluate.py --load ckpt/mix --eval-domain math=data/math_valid \
        --eval-domain code=data/code_valid --eval-domain wiki=data/wiki_valid \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --output mix_eval.json

    # BTM: branch models kept separate, top-k per sequence by tf-idf similarity
    python tools/evaluate.py --btm --btm-topk 2 \
        --load math=ckpt/math --load code=ckpt/code --load wiki=ckpt/wiki \
        --btm-train-data math=data/math_train --btm-train-data code=data/code_train ... \
        --eval-domain math=data/math_valid ... --output btm_eval.json

    # Downstream tasks (lm-eval): the paper's suite on the datasets in the local HF cache
    python tools/evaluate.py --load ckpt/mix --tasks btx-paper --output mix_tasks.json
    # the built-in offline tasks, made from the corpora's held-out documents
    python tools/evaluate.py --load ckpt/mix --tasks btx-builtin --corpora data/corpora --output tasks.json
    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt/mix --tasks arc_easy,gsm8k:8 \
        --tensor-model-parallel-size 2 --output tasks.json

Perplexity: every domain is scored on the same number of sequences (--num-samples; default:
the smallest domain's one pass). Tasks: ``--output`` gets lm-eval's results JSON plus a
per-domain summary; tasks whose dataset is not available offline are skipped with one line;
code-execution tasks (HumanEval, MBPP) need --confirm-run-unsafe-code. See
btx_megatron/eval/ (perplexity.py, btm.py, harness.py, tasks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


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
    p.add_argument("--eval-domain", action="append", type=_pair("--eval-domain"), default=[],
                   metavar="NAME=PREFIX", help="held-out indexed dataset of a domain; repeat per domain "
                                               "(perplexity; required unless --tasks)")
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
    t = p.add_argument_group("downstream tasks (lm-evaluation-harness)")
    t.add_argument("--tasks", help="comma-separated: btx-paper, btx-builtin, lm-eval task names; NAME:SHOTS sets "
                                   "a task's few-shot count")
    t.add_argument("--task-dir", help="extra lm-eval task YAMLs (--include_path); with btx-builtin: where the "
                                      "built-in tasks are (or are written, with --corpora)")
    t.add_argument("--corpora", help="built-in corpora directory (tools/build_corpora.py) to make the "
                                     "btx-builtin tasks from its held-out documents")
    t.add_argument("--task-items", type=int, default=40, help="items per built-in task")
    t.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if < 1)")
    t.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    t.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-written code (HumanEval, MBPP)")
    t.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON")
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


def run_tasks(args) -> dict:
    """--tasks: lm-eval on one checkpoint."""
    from btx_megatron.eval.harness import evaluate_tasks
    from btx_megatron.eval.loading import ModelLoadOptions
    from btx_megatron.eval.tasks import resolve_task_specs

    if args.btm or args.force_expert or args.oracle_routing or args.eval_domain:
        raise ValueError("--tasks evaluates one checkpoint on downstream tasks; drop --eval-domain/--btm/"
                         "--force-expert/--oracle-routing (run perplexity separately).")
    if len(args.load) != 1 or "=" in args.load[0]:
        raise ValueError("--tasks takes one --load CKPT.")
    opts = ModelLoadOptions(
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model, seq_length=args.seq_length,
        seed=args.seed, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, bf16=args.bf16)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    return evaluate_tasks(args.load[0], resolve_task_specs(args.tasks), opts, batch_size=args.batch_size,
                          include_path=args.task_dir, corpora=args.corpora, task_items=args.task_items,
                          limit=limit, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
                          log_samples=args.log_samples)


def run(args) -> dict:
    from btx_megatron.eval.perplexity import EvalOptions, evaluate_checkpoint

    if args.tasks:
        return run_tasks(args)
    if not args.eval_domain:
        raise ValueError("pass --eval-domain NAME=PREFIX (perplexity) or --tasks (downstream tasks).")
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
    from btx_megatron.eval.btm import BTMOptions, evaluate_btm

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


def _print_tasks(summary: dict, output: str) -> None:
    for name, entry in summary["tasks"].items():
        print(f"{name} ({entry['domain']}, {entry['num_fewshot']}-shot): {entry['metric']} {entry['value']:.4f}")
    for domain, value in summary["domains"].items():
        print(f"domain {domain}: {value:.4f}")
    for name, reason in summary["skipped"].items():
        print(f"skipped {name}: {reason}")
    print(f"wrote {output} (lm-eval results under 'lm_eval', the per-domain summary under 'summary')")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    from btx_megatron import checkpoint as fmt
    from btx_megatron.runtime.distributed import run_entrypoint

    out: dict = {}
    if run_entrypoint(lambda: out.update(result=run(args))):
        return 2
    result = out["result"]
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        fmt.write_json_atomic(args.output, result)
        if "summary" in result:  # --tasks
            _print_tasks(result["summary"], args.output)
            return 0
        for name, r in result["domains"].items():
            print(f"{name}: loss {r['loss']:.4f} ppl {r['ppl']:.2f} ({r['tokens']:,} tokens)")
        print(f"average ppl {result['average_ppl']:.2f}; wrote {args.output}")
        if "selection" in result:
            print("BTM top-1 fractions: " + json.dumps({d: s["top1_fraction"] for d, s in result["selection"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
