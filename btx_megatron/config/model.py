"""The model section of the run configuration: a Llama-style GPT, dense or MoE.

Every field maps to the Megatron-LM flag of the same name; ``__post_init__`` fills the derived
defaults and :meth:`ModelConfig._check_moe` holds every router/MoE option check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fields import flag, require, require_positive


ROUTER_TYPES = ("topk", "switch", "sample-top1", "soft")


@dataclass
class ModelConfig:
    """Llama-style GPT architecture (dense, or MoE when ``num_experts`` is set)."""

    num_layers: int = flag(2, "Number of transformer layers.")
    hidden_size: int = flag(64, "Transformer hidden size.")
    ffn_hidden_size: int | None = flag(None, "FFN hidden size (default 4 * hidden size).")
    num_attention_heads: int = flag(4, "Number of attention heads.")
    num_query_groups: int | None = flag(
        None, "Key/value head groups for grouped-query attention (default: one per head)."
    )
    kv_channels: int | None = flag(None, "Head dimension (default hidden / heads).")
    seq_length: int = flag(128, "Training sequence length.")
    max_position_embeddings: int | None = flag(None, "Maximum positions (default seq length).")
    vocab_size: int | None = flag(
        None, "Model vocabulary size before padding (default: the tokenizer's size)."
    )
    make_vocab_size_divisible_by: int = flag(
        128,
        "Pad the vocabulary to a multiple of this. Unlike Megatron-LM the multiple does not "
        "include the TP size, so one checkpoint serves every layout.",
    )
    swiglu: bool = flag(False, "SwiGLU FFN (gated SiLU) as in Llama.")
    normalization: str = flag("LayerNorm", "LayerNorm or RMSNorm.", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float = flag(1e-5, "Epsilon of the normalisation layers.")
    position_embedding_type: str = flag(
        "learned_absolute", "Position embedding.", choices=("learned_absolute", "rope")
    )
    rotary_base: int = flag(10000, "RoPE base (theta).")
    rotary_percent: float = flag(1.0, "Fraction of each head that RoPE rotates.")
    untie_embeddings_and_output_weights: bool = flag(
        False, "Separate input embedding and output layer weights (Llama)."
    )
    disable_bias_linear: bool = flag(False, "No biases in linear layers (Llama).")
    init_method_std: float = flag(0.02, "Std of the normal weight initialisation.")
    hidden_dropout: float = flag(0.0, "Dropout after attention and FFN.")
    attention_dropout: float = flag(0.0, "Dropout on attention probabilities.")
    transformer_impl: str = flag(
        "auto",
        "Layer implementation: transformer_engine, local, or auto (TE when importable).",
        choices=("auto", "transformer_engine", "local"),
    )
    attention_backend: str = flag(
        "auto",
        "Local-spec core attention: sdpa (PyTorch fused scaled_dot_product_attention), "
        "unfused (Megatron's DotProductAttention), auto (sdpa). TE specs use TE attention.",
        choices=("auto", "sdpa", "unfused"),
    )
    # --- Mixture of experts -------------------------------------------------------------
    num_experts: int | None = flag(None, "Experts per MoE layer (None: dense model).")
    moe_ffn_hidden_size: int | None = flag(None, "Expert FFN size (default ffn hidden size).")
    moe_router_topk: int = flag(2, "Experts per token for the top-k router.")
    moe_router_type: str = flag(
        "topk",
        "BTX router: topk (softmax over the selected logits), switch (top-1, capacity), "
        "sample-top1 (Gumbel sample), soft (all experts).",
        choices=ROUTER_TYPES,
    )
    moe_router_load_balancing_type: str = flag(
        "aux_loss", "Load balancing.", choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
    )
    moe_aux_loss_coeff: float = flag(0.01, "Load-balancing loss weight (paper: 0.01).")
    moe_z_loss_coeff: float | None = flag(None, "Router z-loss weight.")
    moe_grouped_gemm: bool = flag(False, "Grouped-GEMM experts (Transformer Engine).")
    moe_token_dispatcher_type: str = flag(
        "allgather", "Token dispatcher.", choices=("allgather", "alltoall")
    )
    moe_expert_capacity_factor: float | None = flag(
        None, "Capacity factor; tokens beyond capacity are dropped (switch router)."
    )
    moe_sample_temperature_rate: float = flag(
        1e-4, "sample-top1: temperature max(0.5, exp(-rate * step))."
    )
    moe_router_dtype: str | None = flag(None, "Router compute dtype (fp32 recommended).", choices=(None, "fp32", "fp64"))

    def __post_init__(self) -> None:
        require(self.num_layers > 0, "--num-layers must be positive.")
        require(self.hidden_size > 0, "--hidden-size must be positive.")
        require_positive(self, ("num_attention_heads", "seq_length", "make_vocab_size_divisible_by", "norm_epsilon",
                                "rotary_base"),
                         optional=("ffn_hidden_size", "num_query_groups", "kv_channels", "max_position_embeddings",
                                   "vocab_size"))
        require(0 < self.rotary_percent <= 1, f"--rotary-percent must be in (0, 1], got {self.rotary_percent}.")
        for name in ("hidden_dropout", "attention_dropout"):
            require(0 <= getattr(self, name) < 1,
                    f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}.")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        require(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
            f"{self.num_attention_heads}; change one or set --kv-channels.",
        )
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads {self.num_attention_heads} is not a multiple of "
            f"--num-query-groups {self.num_query_groups}.",
        )
        require(
            self.max_position_embeddings >= self.seq_length,
            f"--max-position-embeddings {self.max_position_embeddings} is smaller than "
            f"--seq-length {self.seq_length}.",
        )
        if self.num_experts is not None:
            self._check_moe()
        else:
            require(
                self.moe_expert_capacity_factor is None and not self.moe_grouped_gemm,
                "MoE options (--moe-expert-capacity-factor, --moe-grouped-gemm) need --num-experts.",
            )

    def _check_moe(self) -> None:
        """Every router/MoE option check, in one place (the routers assume they passed)."""
        router = self.moe_router_type
        require(self.num_experts >= 1, "--num-experts must be at least 1.")
        require(
            self.moe_ffn_hidden_size is None or self.moe_ffn_hidden_size > 0,
            f"--moe-ffn-hidden-size must be positive, got {self.moe_ffn_hidden_size}.",
        )
        if router == "topk":
            require(
                1 <= self.moe_router_topk <= self.num_experts,
                f"--moe-router-topk {self.moe_router_topk} must be between 1 and "
                f"--num-experts {self.num_experts}.",
            )
        if router in ("soft", "sample-top1"):
            require(
                self.moe_expert_capacity_factor is None,
                f"--moe-router-type {router} does not drop tokens; remove --moe-expert-capacity-factor "
                "(use --moe-router-type switch for capacity-limited top-1 routing).",
            )
            require(
                self.moe_router_load_balancing_type != "sinkhorn",
                f"--moe-router-load-balancing-type sinkhorn chooses the experts itself and works with "
                f"--moe-router-type topk or switch only, not {router}; use aux_loss, seq_aux_loss, "
                "global_aux_loss or none.",
            )
        if router == "switch" and self.moe_expert_capacity_factor is None:
            # The paper's Switch baseline uses capacity factor 1.5.
            self.moe_expert_capacity_factor = 1.5
        require(
            self.moe_expert_capacity_factor is None or self.moe_expert_capacity_factor > 0,
            f"--moe-expert-capacity-factor must be positive, got {self.moe_expert_capacity_factor}.",
        )
        require(
            self.moe_sample_temperature_rate >= 0,
            f"--moe-sample-temperature-rate must be >= 0, got {self.moe_sample_temperature_rate}.",
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def padded_vocab_size(self) -> int:
        assert self.vocab_size is not None, "vocab size must be resolved before building"
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def architecture(self) -> dict[str, Any]:
        """The fields that must agree between checkpoints that are merged or resumed."""
        keys = (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
            "swiglu", "normalization", "norm_epsilon", "position_embedding_type", "rotary_base",
            "rotary_percent", "untie_embeddings_and_output_weights", "disable_bias_linear",
            "max_position_embeddings",
        )
        return {k: getattr(self, k) for k in keys}
