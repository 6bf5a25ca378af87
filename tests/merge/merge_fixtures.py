"""Helpers for the merge tests: tiny dense branch checkpoints and PyTorch-only read-back."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

TINY = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 4 "
    "--num-query-groups 2 --seq-length 16 --vocab-size 200 --make-vocab-size-divisible-by 64 "
    "--swiglu --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear --micro-batch-size 2"
).split()


def parse(argv: list[str]):
    from btx_megatron.config import parse_config

    cfg, _ = parse_config(argv)
    return cfg


def build(cfg, seed: int = 1):
    """Model chunks for ``cfg`` on the current layout (initialises Megatron's groups)."""
    from btx_megatron.models import build_model_chunks, transformer_config, virtual_pipeline_size
    from btx_megatron.runtime.distributed import initialize_distributed

    initialize_distributed(cfg.parallel, seed=seed, virtual_pipeline_size=virtual_pipeline_size(cfg))
    return build_model_chunks(cfg, transformer_config(cfg))


def make_branch(root: str | Path, seed: int, argv: list[str] = TINY) -> Path:
    """Save a dense model with seed-dependent weights (norm weights perturbed too, so the
    averaged norms differ from every branch's) as a checkpoint ROOT via the trainer's saver."""
    from btx_megatron.training.checkpointing import save_checkpoint

    cfg = parse(argv)
    model = build(cfg, seed=seed)[0]
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Branches diverge everywhere in training; norm weights get a larger push so the
            # averaged norms differ clearly from each branch's.
            std = 0.1 if p.dim() == 1 else 0.01
            p.add_(torch.randn(p.shape, generator=g) * std)
    save_checkpoint(cfg, 0, [model], save_dir=str(root))
    return Path(root)


def read_dcp(ckpt_dir: str | Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors straight from the files with PyTorch's own DCP reader (no project code)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir))
    md = reader.read_metadata().state_dict_metadata
    if keys is None:
        keys = [k for k, v in md.items()
                if isinstance(v, TensorStorageMetadata) and k.startswith(("embedding.", "decoder.", "output_layer."))]
    state = {k: torch.empty(md[k].size, dtype=md[k].properties.dtype) for k in keys}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def write_token_dataset(prefix: str | Path, seed: int, num_docs: int = 8, doc_len: int = 40,
                        vocab: int = 200, low: int = 0) -> str:
    """A Megatron indexed dataset (.bin/.idx) of random token documents drawn from
    [low, low + vocab/2) so that domains differ in their token distribution."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    g = torch.Generator().manual_seed(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(num_docs):
        doc = torch.randint(low, min(vocab - 1, low + vocab // 2), (doc_len,), generator=g, dtype=torch.int32)
        builder.add_document(doc, [doc_len])
    builder.finalize(prefix + ".idx")
    return prefix


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def as_fresh_tool_process(monkeypatch) -> None:
    """Make the test process look like a tool that just started, before it forks ``--workers``
    (btx_megatron.runtime.processes.fork_workers refuses to fork a process with threads or inside a
    process group): no launch variables, no process group (the branch builds leave one), no tqdm
    monitor thread (Hugging Face's progress bars in earlier tests start one)."""
    from btx_megatron.runtime.distributed import destroy

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    destroy()
    monitor = sys.modules.get("tqdm._monitor")
    for thread in threading.enumerate():
        if monitor is not None and isinstance(thread, monitor.TMonitor):
            thread.exit()  # a later progress bar starts a new one


# ---------------------------------------------------------------------------------------------
# Running merges and reading their results
# ---------------------------------------------------------------------------------------------

L = 2
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
DENSE_FC1 = "decoder.layers.mlp.linear_fc1.weight"
DENSE_FC2 = "decoder.layers.mlp.linear_fc2.weight"
ROUTER = "decoder.layers.mlp.router.weight"


def merge(output, branches=None, **kw):
    from btx_megatron.merge import MergeOptions, run_merge

    kw.setdefault("progress", False)
    return run_merge(MergeOptions(branches=[(n, str(p)) for n, p in (branches or [])], output=str(output), **kw))


def iter_dir(path) -> Path:
    return Path(path) / "iter_0000000"


def moe_argv(num_experts: int, topk: int, extra: list[str] = ()) -> list[str]:
    return TINY + ["--num-experts", str(num_experts), "--moe-router-topk", str(topk), *extra]


def load(model_chunks, path):
    from btx_megatron.training.checkpointing import load_model_weights

    return load_model_weights(model_chunks, str(path))


def tokens(seed: int = 0, b: int = 2, s: int = 16):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 200, (b, s), generator=g)
    return tok, torch.arange(s).unsqueeze(0).expand(b, s)


@torch.no_grad()
def logits_of(model, tok, pos):
    model.eval()
    return model(tok, pos, None)


def reference_average(tensors: list[torch.Tensor], weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """The merge's averaging as it was first written (whole tensors): a float64 running sum
    ``acc.add_(t, alpha=w)`` in source order (weight 0 skipped, weight 1 without alpha), one
    division by the weight sum unless it is 1, one rounding to ``dtype``."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        if w == 0.0:
            continue
        if w == 1.0:
            acc.add_(t)
        else:
            acc.add_(t, alpha=w)
    total = float(sum(weights))
    return (acc if total == 1.0 else acc / total).to(dtype)


def cast_checkpoint(src_root: str | Path, dst_root: str | Path, dtype: torch.dtype, strided: tuple[str, ...] = ()) -> Path:
    """A copy of a checkpoint ROOT with every model tensor cast to ``dtype``, written with
    PyTorch's own DCP writer as whole tensors (one chunk per key: a layout Megatron's saver never
    writes, so readers must cut layer slices out of multi-layer chunks). Keys in ``strided`` are
    saved as transposed views (same values, column-major records that no reader can address
    directly)."""
    import json
    import shutil

    import torch.distributed.checkpoint as dcp

    src, dst = iter_dir(src_root), iter_dir(dst_root)
    dst.mkdir(parents=True)
    state = {k: v.to(dtype) for k, v in read_dcp(src).items()}
    for k in strided:
        state[k] = state[k].transpose(-1, -2).contiguous().transpose(-1, -2)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dst)), no_dist=True)
    shutil.copy(src / "metadata.json", dst / "metadata.json")
    manifest = json.loads((src / "btx_checkpoint.json").read_text())
    manifest["precision"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    (dst / "btx_checkpoint.json").write_text(json.dumps(manifest))
    (Path(dst_root) / "latest_checkpointed_iteration.txt").write_text("0\n")
    return Path(dst_root)
