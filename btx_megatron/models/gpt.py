"""Llama-style GPT (dense or MoE) from Megatron-Core's ``GPTModel``."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .norms import LocalNorm
from .routers import first_moe_layer_number, soft_layer_mlp
from .specs import HAVE_TE, layer_spec, resolve_transformer_impl

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def virtual_pipeline_size(cfg) -> int | None:
    """Model chunks per pipeline rank for the interleaved schedule (None: not interleaved)."""
    layers_per_vp = cfg.parallel.num_layers_per_virtual_pipeline_stage
    if layers_per_vp is None:
        return None
    return cfg.model.num_layers // (cfg.parallel.pipeline_model_parallel_size * layers_per_vp)


def transformer_config(cfg) -> TransformerConfig:
    """Megatron-Core ``TransformerConfig`` for a :class:`btx_megatron.config.Config`."""
    m, p, prec, t = cfg.model, cfg.parallel, cfg.precision, cfg.train
    impl = resolve_transformer_impl(m.transformer_impl)
    on_gpu = torch.cuda.is_available()
    dtype = _DTYPES[prec.params_dtype_name]
    moe = {}
    if m.is_moe:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.expert_ffn_hidden_size,
            moe_router_topk=_effective_topk(m),
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff if m.moe_router_load_balancing_type != "none" else 0.0,
            moe_z_loss_coeff=m.moe_z_loss_coeff,
            moe_grouped_gemm=m.moe_grouped_gemm,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_expert_capacity_factor=m.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=False,
            # Switch top-1 keeps the gate probability of a full softmax (pre-softmax form);
            # otherwise a top-1 gate is identically 1 and the router never learns.
            moe_router_pre_softmax=m.moe_router_type in ("switch", "sample-top1"),
            moe_router_dtype=m.moe_router_dtype,
            moe_permute_fusion=False,
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=not m.disable_bias_linear,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(cfg),
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=prec.bf16,
        fp16=prec.fp16,
        fp8=prec.fp8_format,
        fp8_recipe=prec.fp8_recipe if prec.fp8_format else "delayed",
        fp8_amax_history_len=prec.fp8_amax_history_len,
        fp8_amax_compute_algo=prec.fp8_amax_compute_algo,
        attention_softmax_in_fp32=prec.attention_softmax_in_fp32,
        # Full-weight initialisation on CPU then slicing gives identical weights for every TP
        # size on CPU; on GPU Megatron's default (per-rank init on device) is much faster.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fused kernels need CUDA (and Apex/TE for some); these are the ones PyTorch provides.
        bias_activation_fusion=on_gpu and m.swiglu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=on_gpu and impl == "transformer_engine",
        gradient_accumulation_fusion=on_gpu and impl == "transformer_engine",
        cross_entropy_loss_fusion=on_gpu,
        calculate_per_token_loss=True,
        # gloo matches messages between two ranks in posting order. Batched p2p posts sends and
        # receives in an order that crosses activations and gradients when both pipeline
        # neighbours are the same rank (PP=2, interleaved); individual ops are ordered by rank
        # parity and match correctly.
        batch_p2p_comm=on_gpu,
        deterministic_mode=t.deterministic,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method if t.recompute_granularity == "full" else None,
        recompute_num_layers=t.recompute_num_layers if t.recompute_granularity == "full" else None,
        transformer_impl=impl,
        **moe,
    )


def _effective_topk(m) -> int:
    if m.moe_router_type in ("switch", "sample-top1"):
        return 1
    if m.moe_router_type == "soft":
        return m.num_experts
    return m.moe_router_topk


def _block_spec(cfg, impl: str, tconfig: TransformerConfig, vp_stage: int | None) -> ModuleSpec:
    layer = layer_spec(cfg.model, impl)
    num_layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    layer_specs = [layer] * num_layers
    if cfg.model.moe_router_type == "sample-top1" and cfg.model.is_moe:
        # The first MoE layer routes softly (all experts); token dispatchers size their buffers
        # from the layer's top-k, so that layer gets its own MoE spec.
        first = first_moe_layer_number(tconfig) - 1 - get_transformer_layer_offset(tconfig, vp_stage=vp_stage)
        if 0 <= first < num_layers:
            layer_specs[first] = dataclasses.replace(
                layer, submodules=dataclasses.replace(layer.submodules, mlp=soft_layer_mlp(layer.submodules.mlp))
            )
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = LocalNorm
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm),
    )


def build_model_chunks(cfg, tconfig: TransformerConfig) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), unwrapped, on device."""
    m = cfg.model
    impl = tconfig.transformer_impl
    vp_size = virtual_pipeline_size(cfg)
    first_pp = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last_pp = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=tconfig,
            transformer_layer_spec=_block_spec(cfg, impl, tconfig, stage),
            vocab_size=m.padded_vocab_size,
            max_sequence_length=m.max_position_embeddings,
            pre_process=first_pp and is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size),
            post_process=last_pp and is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            rotary_percent=m.rotary_percent,
            rotary_base=m.rotary_base,
            vp_stage=stage,
        )
        chunk.vp_stage = stage
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


__all__ = ["HAVE_TE", "build_model_chunks", "transformer_config", "virtual_pipeline_size"]
