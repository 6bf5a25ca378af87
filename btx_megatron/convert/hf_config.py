"""Hugging Face ``config.json`` <-> :class:`ModelConfig` (pure functions on dicts)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import ModelConfig
from .mapping import LLAMA_ARCHITECTURES, MOE_ARCHITECTURES, SUPPORTED_ARCHITECTURES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PRECISION_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Routers whose forward pass Mixtral (softmax over all experts, top-k, renormalise; the same as
# a softmax over the top-k logits, Megatron's TopKRouter default) reproduces exactly.
EXACT_ROUTERS = ("topk",)
# The closest Mixtral top-k for routers it cannot express, and why it differs.
APPROXIMATE_ROUTERS = {
    "switch": (1, "Switch top-1 scales the expert output by the full-softmax probability and drops "
                  "tokens over capacity; Mixtral top-1 renormalises the weight to 1 and never drops"),
    "sample-top1": (1, "sample-top1 draws a Gumbel sample during training; exported as deterministic "
                       "top-1 (weight 1), the hard inference-time choice"),
    "soft": (None, "soft routing sends every token to every expert; exported as top-k with "
                   "k = num_experts (softmax over all experts), which matches only if the soft "
                   "router is a plain softmax over all experts"),
}


def hf_architecture(hf: dict[str, Any], source: str) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return archs[0]


def _rope(hf: dict[str, Any], source: str) -> float:
    """rope_theta from legacy (``rope_theta``/``rope_scaling``) or v5 (``rope_parameters``) form."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if scaling not in (None, {}) or rope_type not in ("default", None):
        kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or rope_type
        raise ValueError(
            f"{source}: RoPE scaling {kind!r} is not supported: ModelConfig has no rope-scaling "
            "field yet, and converting without it would change the model. Use a checkpoint "
            "without rope_scaling (e.g. Llama-2, Mistral, Mixtral)."
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return theta


def model_config_from_hf(hf: dict[str, Any], *, source: str = "config.json",
                         make_vocab_size_divisible_by: int = 128,
                         seq_length: int | None = None) -> tuple[ModelConfig, str, list[str]]:
    """config.json -> (ModelConfig, architecture, notes). Raises ValueError for what cannot map."""
    arch = hf_architecture(hf, source)
    notes: list[str] = []
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (SwiGLU needs 'silu').")
    for flag_name in ("attention_bias", "mlp_bias"):
        if hf.get(flag_name):
            raise ValueError(f"{source}: {flag_name}=true is not supported (the project's models have "
                             "no linear biases, --disable-bias-linear).")
    theta = _rope(hf, source)
    if float(theta) != int(theta):
        raise ValueError(f"{source}: rope_theta {theta} is not an integer (ModelConfig.rotary_base is int).")
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim")
    kv_channels = head_dim if head_dim not in (None, hidden // heads) else None
    max_pos = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window")
    if window is not None and window < max_pos:
        notes.append(f"sliding_window {window} not carried over: identical for sequences up to {window} tokens")
    if seq_length is None:
        seq_length = min(max_pos, 4096, window or max_pos)
    fields: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=kv_channels,
        seq_length=seq_length,
        max_position_embeddings=max_pos,
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        position_embedding_type="rope",
        rotary_base=int(theta),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        disable_bias_linear=True,
        init_method_std=hf.get("initializer_range", 0.02),
    )
    if arch in MOE_ARCHITECTURES:
        fields.update(
            num_experts=hf["num_local_experts"],
            moe_router_topk=hf["num_experts_per_tok"],
            moe_router_type="topk",
            moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.01),
        )
    else:
        assert arch in LLAMA_ARCHITECTURES
    return ModelConfig(**fields), arch, notes


def hf_dtype(hf: dict[str, Any]) -> torch.dtype | None:
    name = hf.get("dtype") or hf.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def model_config_from_manifest(manifest: dict[str, Any], source: str) -> ModelConfig:
    saved = dict(manifest.get("model") or {})
    if not saved:
        raise ValueError(f"{source}: the manifest has no 'model' section.")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def exported_topk(m: ModelConfig, allow_approximate_router: bool, source: str) -> tuple[int, str | None]:
    """Mixtral ``num_experts_per_tok`` for ``m``, and a note when it is an approximation."""
    if m.moe_router_type in EXACT_ROUTERS:
        return m.moe_router_topk, None
    k, why = APPROXIMATE_ROUTERS[m.moe_router_type]
    k = k or m.num_experts
    if not allow_approximate_router:
        raise ValueError(
            f"{source} uses --moe-router-type {m.moe_router_type}, which MixtralForCausalLM cannot "
            f"express ({why}). Pass --allow-approximate-router to export it as top-{k} anyway."
        )
    return k, f"router {m.moe_router_type} exported as Mixtral top-{k}: {why}"


def hf_config_from_model(m: ModelConfig, dtype: torch.dtype, *, num_experts_per_tok: int | None = None,
                         special_tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for ``LlamaForCausalLM`` (dense) or ``MixtralForCausalLM`` (MoE)."""
    if not (m.swiglu and m.normalization == "RMSNorm" and m.position_embedding_type == "rope"
            and m.disable_bias_linear and m.rotary_percent == 1.0):
        raise ValueError(
            "Only Llama-style models export to Hugging Face: need --swiglu --normalization RMSNorm "
            "--position-embedding-type rope --disable-bias-linear and --rotary-percent 1.0; this "
            f"checkpoint has swiglu={m.swiglu}, normalization={m.normalization}, "
            f"position_embedding_type={m.position_embedding_type}, "
            f"disable_bias_linear={m.disable_bias_linear}, rotary_percent={m.rotary_percent}."
        )
    cfg: dict[str, Any] = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "hidden_size": m.hidden_size,
        "initializer_range": m.init_method_std,
        "max_position_embeddings": m.max_position_embeddings,
        "num_attention_heads": m.num_attention_heads,
        "num_hidden_layers": m.num_layers,
        "num_key_value_heads": m.num_query_groups,
        "rms_norm_eps": m.norm_epsilon,
        "rope_scaling": None,
        "rope_theta": float(m.rotary_base),
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "torch_dtype": DTYPE_NAMES[dtype],
        "use_cache": True,
        "vocab_size": m.vocab_size,
    }
    if m.is_moe:
        cfg.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            intermediate_size=m.expert_ffn_hidden_size,
            num_local_experts=m.num_experts,
            num_experts_per_tok=num_experts_per_tok or m.moe_router_topk,
            router_aux_loss_coef=m.moe_aux_loss_coeff if m.moe_router_load_balancing_type != "none" else 0.0,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    else:
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama",
                   intermediate_size=m.ffn_hidden_size, mlp_bias=False, pretraining_tp=1)
    for k, v in (special_tokens or {}).items():
        if v is not None:
            cfg[k] = v
    return dict(sorted(cfg.items()))


def model_flags(m: ModelConfig) -> list[str]:
    """The Megatron-style flags that describe ``m`` (for launch scripts)."""
    argv = [
        "--num-layers", m.num_layers, "--hidden-size", m.hidden_size,
        "--ffn-hidden-size", m.ffn_hidden_size, "--num-attention-heads", m.num_attention_heads,
        "--num-query-groups", m.num_query_groups,
    ]
    if m.kv_channels is not None:
        argv += ["--kv-channels", m.kv_channels]
    argv += [
        "--max-position-embeddings", m.max_position_embeddings,
        "--vocab-size", m.vocab_size, "--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by,
        "--swiglu", "--normalization", m.normalization, "--norm-epsilon", m.norm_epsilon,
        "--position-embedding-type", m.position_embedding_type, "--rotary-base", m.rotary_base,
        "--disable-bias-linear", "--init-method-std", m.init_method_std,
    ]
    if m.untie_embeddings_and_output_weights:
        argv.append("--untie-embeddings-and-output-weights")
    if m.is_moe:
        argv += ["--num-experts", m.num_experts, "--moe-router-topk", m.moe_router_topk,
                 "--moe-router-type", m.moe_router_type, "--moe-aux-loss-coeff", m.moe_aux_loss_coeff]
    return [str(a) for a in argv]
