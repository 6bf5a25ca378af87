"""Transformer layer specs: Transformer Engine when importable, local modules otherwise.

Both specs save the same checkpoint keys (the TE names), so a checkpoint written on a GPU
cluster with TE loads on a CPU machine with the local spec and back. The MoE router enters
through ``MoESubmodules.router`` (see :mod:`btx_megatron.models.routers`).
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from .attention import SDPAttention
from .norms import LocalNorm
from .routers import router_class

try:  # Transformer Engine ships with the cluster container only.
    import transformer_engine  # noqa: F401
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TE = False


def resolve_transformer_impl(requested: str) -> str:
    if requested == "auto":
        return "transformer_engine" if HAVE_TE else "local"
    if requested == "transformer_engine" and not HAVE_TE:
        raise ValueError(
            "--transformer-impl transformer_engine needs Transformer Engine, which is not "
            "importable here; use --transformer-impl local (or auto)."
        )
    return requested


def _with_router(moe_spec: functools.partial, model_cfg) -> functools.partial:
    submodules = moe_spec.keywords["submodules"]
    submodules = dataclasses.replace(submodules, router=router_class(
        model_cfg.moe_router_type, sample_temperature_rate=model_cfg.moe_sample_temperature_rate
    ))
    return functools.partial(moe_spec.func, *moe_spec.args, **{**moe_spec.keywords, "submodules": submodules})


def layer_spec(model_cfg, transformer_impl: str) -> ModuleSpec:
    """The spec of one decoder layer for ``model_cfg`` (a :class:`ModelConfig`)."""
    num_experts = model_cfg.num_experts
    if transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=model_cfg.moe_grouped_gemm
        )
        if num_experts is not None:
            spec.submodules.mlp = _with_router(spec.submodules.mlp, model_cfg)
        return spec

    if model_cfg.moe_grouped_gemm:
        raise ValueError(
            "--moe-grouped-gemm needs Transformer Engine's grouped linear layers; drop the flag "
            "to use sequential experts (same checkpoint format)."
        )
    backend = LocalSpecProvider()
    core_attention = DotProductAttention if model_cfg.attention_backend == "unfused" else SDPAttention
    if num_experts is None:
        mlp = functools.partial(
            MLP.as_mlp_submodule,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        )
        # TE fuses the pre-MLP norm into linear_fc1; save under its key so specs interchange.
        keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    else:
        mlp = _with_router(
            get_moe_module_spec_for_backend(backend=backend, num_experts=num_experts, moe_grouped_gemm=False),
            model_cfg,
        )
        # TE's MoE layer keeps a separate pre_mlp_layernorm, so only the attention norm moves.
        keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LocalNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )
