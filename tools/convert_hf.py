"""Hugging Face <-> btx-megatron checkpoints.

    python tools/convert_hf.py import --hf-dir llama-2-7b-hf --output ckpt/seed
    python tools/convert_hf.py export --load ckpt/btx_mix --output hf/btx-4x7b [--tokenizer-dir DIR]

``import`` reads LlamaForCausalLM / MistralForCausalLM / MixtralForCausalLM weights (safetensors or
.bin, sharded or not) and writes a checkpoint ROOT for ``btx_megatron.pretrain --load ROOT
--finetune`` plus ROOT/model_args.txt (the model flags) and ROOT/tokenizer/. ``export`` writes a
dense checkpoint as LlamaForCausalLM and an MoE checkpoint as MixtralForCausalLM.
"""

from __future__ import annotations

import argparse
import sys

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Hugging Face <-> btx-megatron checkpoint conversion")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> checkpoint ROOT")
    imp.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + weights).")
    imp.add_argument("--output", required=True, help="Checkpoint ROOT to write.")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="Pad the vocabulary to a multiple of this (zero rows; removed on export).")
    imp.add_argument("--seq-length", type=int, default=None,
                     help="Sequence length recorded in the model config (default min(max positions, 4096)).")
    imp.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                     help="Checkpoint dtype (default: config.json's torch_dtype).")
    exp = sub.add_parser("export", help="checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True, help="Checkpoint ROOT or iteration directory (any layout).")
    exp.add_argument("--output", required=True, help="Hugging Face directory to write.")
    exp.add_argument("--tokenizer-dir", default=None,
                     help="Copy tokenizer files from here (default: ROOT/tokenizer when present).")
    exp.add_argument("--allow-approximate-router", action="store_true",
                     help="Export sample-top1/switch/soft routers as the closest Mixtral top-k.")
    exp.add_argument("--max-shard-size", type=_size, default="5GiB", help="Largest safetensors shard (e.g. 2GB).")
    exp.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                     help="Output dtype (default: the checkpoint's).")
    for p in (imp, exp):
        p.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
        p.add_argument("--no-progress", action="store_true", help="No progress line.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from btx_megatron.convert import export_hf, import_hf

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        if args.command == "import":
            import_hf(args.hf_dir, args.output, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                      seq_length=args.seq_length, dtype=dtype, overwrite=args.overwrite,
                      progress=not args.no_progress)
        else:
            export_hf(args.load, args.output, tokenizer_dir=args.tokenizer_dir,
                      allow_approximate_router=args.allow_approximate_router,
                      max_shard_size=args.max_shard_size, dtype=dtype, overwrite=args.overwrite,
                      progress=not args.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from btx_megatron.runtime.processes import exit_now

    exit_now(main())
