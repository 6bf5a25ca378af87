"""MoE routers selectable with ``--moe-router-type`` (entered through ``MoESubmodules.router``)."""

from __future__ import annotations

from megatron.core.transformer.moe.router import TopKRouter


def router_class(router_type: str):
    """The router module for ``--moe-router-type``."""
    if router_type in ("topk", "switch"):
        return TopKRouter
    raise ValueError(f"--moe-router-type {router_type} is not available yet.")
