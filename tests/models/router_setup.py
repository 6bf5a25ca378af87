"""Tiny MoE configs and routers for the router tests (single process or gloo ranks)."""

from __future__ import annotations

import dataclasses

import torch

from btx_megatron.config import parse_config
from btx_megatron.models import build_model_chunks, transformer_config
from btx_megatron.runtime.distributed import initialize_distributed

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --seq-length 32 "
    "--vocab-size 256 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear --num-experts 4"
)


def tiny_config(router_type: str, extra: str = ""):
    cfg, _ = parse_config(f"{TINY} --moe-router-type {router_type} {extra}".split())
    return cfg


def tconfig_for(cfg):
    """Megatron's TransformerConfig for ``cfg``.

    Megatron refuses top-1 without ``moe_router_pre_softmax``; until ``transformer_config`` sets
    it for sample-top1 too (the router ignores it), build sample-top1's config from the switch
    one without its capacity factor, which is otherwise identical.
    """
    try:
        return transformer_config(cfg)
    except ValueError as exc:
        if cfg.model.moe_router_type != "sample-top1" or "pre-softmax" not in str(exc):
            raise
    switch = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe_router_type="switch"))
    return dataclasses.replace(transformer_config(switch), moe_expert_capacity_factor=None)


def setup(router_type: str, extra: str = "", seed: int = 1):
    cfg = tiny_config(router_type, extra)
    initialize_distributed(cfg.parallel, seed=seed)
    return cfg, tconfig_for(cfg)


def build_model(router_type: str, extra: str = "", seed: int = 1):
    cfg, tconfig = setup(router_type, extra, seed)
    return build_model_chunks(cfg, tconfig)[0], cfg, tconfig


def build_router(router_type: str, tconfig, layer_number: int = 2, **kwargs):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from btx_megatron.models.routers import router_class

    router = router_class(router_type, **kwargs)(config=tconfig, pg_collection=get_default_pg_collection())
    router.set_layer_number(layer_number)
    return router


def router_logits(router, x_SBH: torch.Tensor) -> torch.Tensor:
    """The router's logits recomputed by hand: [S*B, E] = x W^T in fp32."""
    return x_SBH.reshape(-1, x_SBH.shape[-1]).float() @ router.weight.detach().float().t()
