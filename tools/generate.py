"""Text completions from any checkpoint and layout (dense or MoE), greedy or sampled.

    python tools/generate.py --load ckpt/mix --prompt "Problem 1. Compute 12 + 7." --max-new-tokens 32
    python tools/generate.py --load ckpt/mix --prompts-file prompts.txt --temperature 0.8 --top-p 0.95 \
        --stop "\n\n" --output completions.jsonl
    python tools/generate.py --load ckpt/mix --prompt "def add(a, b):" --show-experts
    torchrun --nproc-per-node 2 tools/generate.py --load ckpt/mix --expert-model-parallel-size 2 --prompt ...

Prints each completion, then tokens/s. ``--show-experts`` (MoE) prints, for every generated
token, the experts that routed the position it was predicted from, per MoE layer (names from
the merge manifest). ``--prompts-file``: one prompt per line (``\\n`` inside a line stands for a
newline). The tokenizer defaults to the one in the checkpoint run's run_config.json. See
btx_megatron/eval/generation.py (and why it does not use Megatron-Core's inference engines on
CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint ROOT or iter_XXXXXXX directory (any layout)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable; \\n allowed)")
    p.add_argument("--ignore-eod", action="store_true", help="keep generating past the end-of-document token")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--show-experts", action="store_true", help="MoE: experts per generated token and layer")
    p.add_argument("--output", help="also write the completions as JSON lines")
    p.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"))
    p.add_argument("--tokenizer-model")
    p.add_argument("--seq-length", type=int, help="context window (default: the checkpoint's)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true", default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--fp32", dest="bf16", action="store_false")
    return p


def run(args) -> dict:
    from btx_megatron.eval.generation import GenerationOptions, generate_text
    from btx_megatron.eval.inference import InferenceModel
    from btx_megatron.eval.loading import ModelLoadOptions, load_for_eval

    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise ValueError(f"--prompts-file {args.prompts_file} does not exist.")
        with open(args.prompts_file) as f:
            prompts = [_unescape(line.rstrip("\n")) for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt.")
    else:
        prompts = [_unescape(p) for p in args.prompt]
    gen = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=[_unescape(s) for s in args.stop], stop_at_eod=not args.ignore_eod,
                            seed=args.seed, batch_size=args.batch_size, record_experts=args.show_experts)
    loaded = load_for_eval(args.load, ModelLoadOptions(
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model, seq_length=args.seq_length,
        seed=args.seed, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size, bf16=args.bf16))
    if args.show_experts and not loaded.cfg.model.is_moe:
        raise ValueError(f"--show-experts needs an MoE checkpoint; {args.load} is dense.")
    model = InferenceModel(loaded)
    generations, speed = generate_text(model, prompts, gen)
    return {"prompts": prompts, "generations": generations, "speed": speed,
            "expert_names": loaded.expert_names(), "tokenizer": loaded.tokenizer}


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    from btx_megatron.runtime.distributed import run_entrypoint

    out: dict = {}
    if run_entrypoint(lambda: out.update(run(args))):
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    names, tok = out["expert_names"], out["tokenizer"]
    records = []
    for prompt, g in zip(out["prompts"], out["generations"]):
        print(f"--- prompt: {prompt!r}\n{prompt}\033[1m{g.text}\033[0m" if sys.stdout.isatty()
              else f"--- prompt: {prompt!r}\n{prompt}{g.text}")
        print(f"--- {len(g.tokens)} tokens, finished by {g.finish_reason}")
        record = {"prompt": prompt, "completion": g.text, "tokens": g.tokens, "finish_reason": g.finish_reason}
        if g.experts is not None:
            record["experts"] = [{str(layer): [names[e] for e in ids] for layer, ids in step.items()}
                                 for step in g.experts]
            for token, step in zip(g.tokens, record["experts"]):
                layers = "  ".join(f"L{layer}:{'+'.join(ids)}" for layer, ids in step.items())
                print(f"  {tok.detokenize([token])!r:>14}  {layers}")
        records.append(record)
    s = out["speed"]
    print(f"{s['generated_tokens']} tokens in {s['seconds']:.2f} s: {s['tokens_per_second']:.1f} tokens/s "
          "(full recompute per token, no KV cache)")
    if args.output:
        from btx_megatron import checkpoint as fmt

        fmt.write_text_atomic(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
