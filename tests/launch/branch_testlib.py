"""Shared helpers of the branch-phase tests: a tiny experiment file and checkpoint readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, str(ROOT / "tools" / "launch_branches.py")]
DOMAINS = ("math", "code", "wiki")

TINY_MODEL = {
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
    "num_query_groups": 2, "seq_length": 64, "swiglu": True, "normalization": "RMSNorm",
    "position_embedding_type": "rope", "untie_embeddings_and_output_weights": True,
    "disable_bias_linear": True, "transformer_impl": "local",
}


def tiny_experiment(corpora: Path, out: Path, *, seed_checkpoint: str | None = None, branch_iters: int = 40,
                    wiki_procs: int = 2) -> dict:
    data = corpora / "data"
    seed_data = [{"prefix": str(data / f"{d}_train"), "weight": 1.0} for d in DOMAINS]
    train = {"micro_batch_size": 8, "global_batch_size": 8, "lr": 2e-3, "min_lr": 2e-4,
             "lr_warmup_iters": 2, "weight_decay": 0.1, "seed": 1234}
    exp = {
        "name": "tiny-test",
        "output_dir": str(out),
        "tokenizer": {"type": "SentencePieceTokenizer", "model": str(corpora / "tokenizer" / "tokenizer.model")},
        "model": dict(TINY_MODEL),
        "data": {"split": "100,0,0"},
        "seed": {"checkpoint": seed_checkpoint, "data": seed_data} if seed_checkpoint else {
            "data": seed_data, "train_iters": 120,
        },
        "branch_defaults": {
            "launch": {"nproc_per_node": 1},
            "train": train,
            "checkpoint": {"save_interval": 5},
            "logging": {"log_interval": 1, "eval_iters": 4},
        },
        "domains": [
            {"name": d, "data": str(data / f"{d}_train"), "eval_data": str(data / f"{d}_valid"),
             "train_iters": branch_iters}
            for d in DOMAINS
        ],
        "merge": {"with_seed_expert": True},
        "mix": {"data": {"math": 0.3, "code": 0.4, "wiki": 0.1, "seed": 0.2}, "train_iters": 10},
    }
    if wiki_procs != 1:
        exp["domains"][2]["launch"] = {"nproc_per_node": wiki_procs}
        exp["domains"][2]["train"] = {"micro_batch_size": 4}
    return exp


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def launch(*args, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([*LAUNCH, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})}, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"launch_branches {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def launch_async(*args) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)


def read_tracker(save: Path) -> int | None:
    p = save / "latest_checkpointed_iteration.txt"
    return int(p.read_text()) if p.is_file() else None


def wait_for(predicate, timeout: float = 300, poll: float = 0.05, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def train_records(save: Path) -> list[dict]:
    out = []
    for line in (save / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "train":
            out.append(rec)
    return out


def load_weights(iter_dir: Path, tmp: Path) -> dict:
    """Every tensor of a torch_dist checkpoint directory (model weights under 'model.')."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{iter_dir.parent.parent.name}-{iter_dir.name}-{time.time_ns()}.pt"
    dcp_to_torch_save(str(iter_dir), str(target))
    state = torch.load(target, map_location="cpu", weights_only=False)
    return {k: v for k, v in _flatten(state).items() if isinstance(v, torch.Tensor)}


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def model_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(("model.", "decoder.", "embedding.", "output_layer."))
            and "_extra_state" not in k}
