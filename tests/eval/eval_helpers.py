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


# --- lm-evaluation-harness tests: a dense and an MoE checkpoint, their Hugging Face exports and
# the built-in tasks. Random weights with a large init std: logits far from uniform, so greedy
# choices have margins far above float32 noise (a trained-for-2-steps model is nearly uniform
# and its arg-max could flip between two correct implementations).
HARNESS_MODEL = ["--init-method-std", "0.2"]
HARNESS_SEQ = 128  # evaluation window (RoPE): longer than the 32 tokens the models saw


def make_harness_models(work: str, corpora: str) -> dict:
    """{"dense"|"moe": {"ckpt", "hf"}, "tokenizer_dir", "task_dir"} under ``work``."""
    import shutil

    from btx_megatron.convert import export_hf
    from btx_megatron.eval.tasks import build_builtin_tasks

    ckpts = make_checkpoints(work, {
        "dense": ["--seed", "7", *HARNESS_MODEL],
        "moe": ["--seed", "8", "--num-experts", "4", "--moe-router-topk", "2", *HARNESS_MODEL],
    })
    tok_dir = Path(work) / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    shutil.copy(Path(corpora) / "tokenizer" / "tokenizer.model", tok_dir / "tokenizer.model")
    out: dict = {"tokenizer_dir": str(tok_dir)}
    for name, path in ckpts.items():
        hf = Path(work) / f"{name}_hf"
        export_hf(path, hf, tokenizer_dir=str(tok_dir), overwrite=True, progress=False)
        out[name] = {"ckpt": path, "hf": str(hf)}
    # The test corpora's held-out split is a document or two: items come from the train split.
    out["task_dir"] = str(Path(work) / "tasks")
    build_builtin_tasks(corpora, out["task_dir"], num_items=12, split="train", max_tokens=HARNESS_SEQ)
    return out


def task_responses(results: dict) -> dict[str, list]:
    """lm-eval ``log_samples`` output -> {task: [per-document responses, in document order]}."""
    out = {}
    for task, samples in (results.get("samples") or {}).items():
        out[task] = [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    return out


def accuracies(results: dict) -> dict[str, float]:
    return {t: v for t, r in results["results"].items() for k, v in r.items()
            if k in ("acc,none", "exact_match,none")}
