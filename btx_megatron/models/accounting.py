"""Analytic parameter and FLOP counts of the models :mod:`btx_megatron.models.gpt` builds.

Pure arithmetic on a :class:`~btx_megatron.config.ModelConfig` (and a
:class:`~btx_megatron.config.ParallelConfig` for per-rank counts): nothing is built, so a
cluster layout can be planned on a laptop (``--dry-run``), and the trainer's TFLOP/s and MFU
use the same formula (:func:`flops_per_token`, the one home for it).

What is counted (Megatron-Core ``GPTModel`` with the local or Transformer Engine spec; both
allocate the same parameters):

- embedding ``[V/TP, H]`` on the first pipeline stage (plus ``[P, H]`` learned positions);
- per layer: two norms (``H``, ``2H`` for LayerNorm), fused QKV ``[(nh + 2 ng) d / TP, H]``,
  output projection ``[H, nh d / TP]``, and either the dense MLP (``fc1 [F g / TP, H]`` with
  ``g = 2`` for SwiGLU, ``fc2 [H, F / TP]``) or the MoE block: the router ``[E, H]`` (fp32,
  replicated on every rank) and ``E / EP`` local experts split by the expert TP size ``ETP``;
  row-parallel biases are whole (``H``), column-parallel ones are split;
- the final norm and the output layer ``[V/TP, H]`` on the last stage. Tied embeddings live in
  the embedding on a single stage; with PP > 1 the last stage holds its own copy.

Legend: ``H`` hidden, ``F`` FFN hidden, ``V`` padded vocabulary, ``nh`` heads, ``ng`` query
groups, ``d`` head dim, ``E`` experts, ``k`` experts per token, ``S`` sequence length.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameters split by how they are reduced: ``dense`` over data parallel, ``expert`` over
    the expert data-parallel group (MoE expert weights)."""

    dense: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: "ParamCount") -> "ParamCount":
        return ParamCount(self.dense + other.dense, self.expert + other.expert)

    def __mul__(self, n: int) -> "ParamCount":
        return ParamCount(self.dense * n, self.expert * n)


def _norm(m) -> int:
    return m.hidden_size * (1 if m.normalization == "RMSNorm" else 2)


def _attention(m, tp: int) -> int:
    h, d = m.hidden_size, m.head_dim
    bias = not m.disable_bias_linear
    qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * d // tp
    proj_in = m.num_attention_heads * d // tp
    return qkv_out * h + bias * qkv_out + h * proj_in + bias * h


def _mlp(m, ffn: int, tp: int) -> int:
    """One dense MLP (or one expert) with its FFN size split ``tp`` ways."""
    h = m.hidden_size
    bias = not m.disable_bias_linear
    fc1_out = ffn * (2 if m.swiglu else 1) // tp
    return fc1_out * h + bias * fc1_out + h * (ffn // tp) + bias * h


def layer_parameters(m, tp: int = 1, ep: int = 1, etp: int | None = None) -> ParamCount:
    """Parameters of one decoder layer on one rank."""
    etp = tp if etp is None else etp
    dense = 2 * _norm(m) + _attention(m, tp)
    if not m.is_moe:
        return ParamCount(dense + _mlp(m, m.ffn_hidden_size, tp), 0)
    router = m.num_experts * m.hidden_size + (0 if m.disable_bias_linear else m.num_experts)
    experts = (m.num_experts // ep) * _mlp(m, m.expert_ffn_hidden_size, etp)
    return ParamCount(dense + router, experts)


def _embedding(m, tp: int) -> int:
    positions = m.max_position_embeddings * m.hidden_size if m.position_embedding_type == "learned_absolute" else 0
    return m.padded_vocab_size // tp * m.hidden_size + positions


def stage_parameters(m, p, pp_rank: int = 0) -> ParamCount:
    """Parameters one rank of pipeline stage ``pp_rank`` holds (all its virtual chunks)."""
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    count = layer_parameters(m, tp, p.expert_model_parallel_size, p.expert_tensor_parallel_size) * (m.num_layers // pp)
    output = m.padded_vocab_size // tp * m.hidden_size
    if pp_rank == 0:
        count += ParamCount(_embedding(m, tp), 0)
    if pp_rank == pp - 1:
        count += ParamCount(_norm(m), 0)
        if m.untie_embeddings_and_output_weights or pp > 1:
            count += ParamCount(output, 0)
    return count


def rank_parameters(m, p) -> list[ParamCount]:
    """Per-rank parameters of every pipeline stage (index = pipeline rank)."""
    return [stage_parameters(m, p, r) for r in range(p.pipeline_model_parallel_size)]


def total_parameters(m) -> ParamCount:
    """The model's parameters (unsplit, one copy of tied embeddings)."""
    count = layer_parameters(m) * m.num_layers + ParamCount(_embedding(m, 1) + _norm(m), 0)
    if m.untie_embeddings_and_output_weights:
        count += ParamCount(m.padded_vocab_size * m.hidden_size, 0)
    return count


def experts_per_token(m, layer_number: int = 1) -> int:
    """Experts each token's FFN runs through in a layer (1-based ``layer_number``)."""
    if not m.is_moe:
        return 1
    if m.moe_router_type == "soft":
        return m.num_experts
    if m.moe_router_type == "sample-top1":
        return m.num_experts if layer_number == 1 else 1  # the first MoE layer routes softly
    if m.moe_router_type == "switch":
        return 1
    return m.moe_router_topk


def active_parameters(m) -> int:
    """Parameters one token touches (dense count for a dense model)."""
    total = total_parameters(m)
    if not m.is_moe:
        return total.total
    active_experts = sum(experts_per_token(m, i + 1) for i in range(m.num_layers))
    return total.dense + active_experts * _mlp(m, m.expert_ffn_hidden_size, 1)


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token (one multiply-add = 2 FLOPs), matrix multiplies only."""

    linear: float      # projections: QKV, attention output, MLP/experts, router, output layer
    attention: float   # QK^T and attention-weighted V

    @property
    def total(self) -> float:
        return self.linear + self.attention


def forward_flops_per_token(m, seq_length: int, *, causal: bool = True) -> ForwardFlops:
    """Forward matmul FLOPs per token.

    ``causal`` counts the lower half of the score matrix (what a causal kernel computes);
    ``causal=False`` the full ``S x S`` matrix (what an unfused or masked implementation does).
    Norms, activations, softmax, rotary embeddings and the loss are not counted.
    """
    h, d = m.hidden_size, m.head_dim
    q_out, kv_out = m.num_attention_heads * d, 2 * m.num_query_groups * d
    attention_proj = 2 * h * (q_out + kv_out) + 2 * q_out * h
    mlp_mult = 3 if m.swiglu else 2
    linear = m.num_layers * attention_proj + 2 * h * m.padded_vocab_size
    for layer in range(1, m.num_layers + 1):
        if m.is_moe:
            linear += experts_per_token(m, layer) * 2 * h * m.expert_ffn_hidden_size * mlp_mult
            linear += 2 * h * m.num_experts  # router logits
        else:
            linear += 2 * h * m.ffn_hidden_size * mlp_mult
    # QK^T and PV: 2 matmuls of [S, d] x [d, S] per head, 2 FLOPs per multiply-add.
    attention = m.num_layers * 2 * 2 * seq_length * q_out * (0.5 if causal else 1.0)
    return ForwardFlops(float(linear), float(attention))


def flops_per_token(m, seq_length: int) -> float:
    """Training FLOPs per token: forward + backward (twice the forward) = 3x forward.

    MoE layers count the experts a token is routed to (plus the router), so the MFU of a top-2
    BTX model compares with that of a dense model of the same active size. Activation
    recomputation is not counted (model FLOPs, not hardware FLOPs).
    """
    return 3.0 * forward_flops_per_token(m, seq_length).total
