"""Tiny checkpoints and corpora for the evaluation tests (one process per test module)."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 "
    "--num-query-groups 2 --seq-length 32 --vocab-size 1000 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear"
).split()
# --mock-data trains on random tokens: the weights are not at initialisation (so the numbers
# are not trivially uniform) yet the runs take seconds.
TINY_TRAIN = (
    "--mock-data --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 1 "
    "--log-interval 1 --eval-iters 1 --train-iters 2 --no-save-optim"
).split()
DOMAINS = ("math", "code", "wiki")


def make_checkpoints(work: str, specs: dict[str, list[str]]) -> dict[str, str]:
    """{name: extra flags} -> {name: checkpoint ROOT}; runs in this process, one after another."""
    from btx_megatron.config import parse_config
    from btx_megatron.pretrain import run

    out = {}
    for name, extra in specs.items():
        root = Path(work) / name
        argv = TINY_MODEL + TINY_TRAIN + extra + ["--save", str(root)]
        cfg, _ = parse_config(argv)
        run(cfg, argv)
        out[name] = str(root)
    return out


def build_corpora(out: str) -> str:
    from btx_megatron.data import CorporaConfig, build_corpora as build

    build(CorporaConfig(output=out, tokens_per_domain=20000, vocab_size=1000, workers=1))
    return out


def tokenizer_flags(corpora: str) -> dict[str, str]:
    return {"tokenizer_type": "SentencePieceTokenizer",
            "tokenizer_model": str(Path(corpora) / "tokenizer" / "tokenizer.model")}


def domain_prefixes(corpora: str, split: str = "valid") -> dict[str, list[str]]:
    return {d: [str(Path(corpora) / "data" / f"{d}_{split}")] for d in DOMAINS}
