"""Helpers for the merge tests: tiny dense branch checkpoints and PyTorch-only read-back."""

from __future__ import annotations

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
