"""Pure name and tensor mappings between Hugging Face Llama/Mistral/Mixtral and Megatron-Core.

Megatron side: the global keys of a torch_dist checkpoint (what ``GPTModel.sharded_state_dict()``
writes, the TE names for both layer specs). Per-layer keys carry the layer as a leading axis and
expert keys carry (layer, expert)::

    key                                                    slice shape
    embedding.word_embeddings.weight                       [V_pad, H]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight   [L] x [H]
    decoder.layers.self_attention.linear_qkv.weight        [L] x [G * (Q/G + 2) * D, H]
    decoder.layers.self_attention.linear_proj.weight       [L] x [H, Q * D]
    decoder.layers.mlp.linear_fc1.layer_norm_weight        [L] x [H]          (dense)
    decoder.layers.mlp.linear_fc1.weight                   [L] x [2F, H]      (dense, gate; up)
    decoder.layers.mlp.linear_fc2.weight                   [L] x [H, F]       (dense)
    decoder.layers.pre_mlp_layernorm.weight                [L] x [H]          (MoE)
    decoder.layers.mlp.router.weight                       [L] x [E, H]       (MoE)
    decoder.layers.mlp.experts.experts.linear_fc1.weight   [L, E] x [2F, H]   (MoE)
    decoder.layers.mlp.experts.experts.linear_fc2.weight   [L, E] x [H, F]    (MoE)
    decoder.final_layernorm.weight                         [H]
    output_layer.weight                                    [V_pad, H]         (untied only)

(Q heads, G query groups, D head dim, F FFN size, E experts, V_pad padded vocabulary.)

Fused QKV: ``SelfAttention.get_query_key_value_tensors`` views the projection output as
[G, (Q/G + 2) * D] and splits each group into its Q/G query heads, one key head and one value
head, so the weight rows are grouped per query group. Hugging Face keeps q_proj/k_proj/v_proj
separate with heads in order; query head h belongs to group h // (Q/G) in both (HF's
``repeat_kv`` repeats each key head Q/G times consecutively).

Both sides apply RoPE to the two non-interleaved halves of each head (``rotate_half``,
Megatron's default ``rotary_interleaved=False``), so no permutation of q/k rows is needed.

Vocabulary padding: Megatron pads the vocabulary to ``ModelConfig.padded_vocab_size``; the
import fills the extra embedding/output rows with zeros (they are never a target, and a zero
output row gives logit 0 for a token that never occurs) and the export drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
DENSE_MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
MOE_MLP_NORM = "decoder.layers.pre_mlp_layernorm.weight"
ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"

LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM",)
SUPPORTED_ARCHITECTURES = LLAMA_ARCHITECTURES + MOE_ARCHITECTURES

# A Megatron tensor address: (global key, index along the prepended axes: () / (layer,) /
# (layer, expert)).
Address = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class Shapes:
    """The sizes the mappings need (from a :class:`ModelConfig`)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied_embeddings: bool
    num_experts: int | None = None

    @classmethod
    def from_model_config(cls, m) -> "Shapes":
        return cls(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            ffn_hidden_size=m.expert_ffn_hidden_size if m.is_moe else m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups,
            head_dim=m.head_dim,
            vocab_size=m.vocab_size,
            padded_vocab_size=m.padded_vocab_size,
            tied_embeddings=not m.untie_embeddings_and_output_weights,
            num_experts=m.num_experts,
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None


# --- tensor transforms ----------------------------------------------------------------------


def qkv_hf_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int,
                       head_dim: int) -> torch.Tensor:
    """q [Q*D, H], k [G*D, H], v [G*D, H] -> fused [G * (Q/G + 2) * D, H], grouped per group."""
    hidden = q.shape[-1]
    q_g = q.reshape(num_query_groups, -1, hidden)
    k_g = k.reshape(num_query_groups, head_dim, hidden)
    v_g = v.reshape(num_query_groups, head_dim, hidden)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, hidden)


def qkv_megatron_to_hf(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
                       head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_hf_to_megatron`."""
    hidden = qkv.shape[-1]
    per_group = num_attention_heads // num_query_groups
    grouped = qkv.reshape(num_query_groups, (per_group + 2) * head_dim, hidden)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, hidden).contiguous(), k.reshape(-1, hidden).contiguous(),
            v.reshape(-1, hidden).contiguous())


def fc1_hf_to_megatron(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: Megatron's fc1 is [gate; up] (``glu`` applies act to the first half)."""
    return torch.cat([gate, up], dim=0)


def fc1_megatron_to_hf(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Append zero rows up to ``padded_vocab_size`` (see the module docstring)."""
    extra = padded_vocab_size - weight.shape[0]
    assert extra >= 0, (weight.shape, padded_vocab_size)
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return weight[:vocab_size].contiguous()


# --- names -----------------------------------------------------------------------------------


def hf_layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def hf_global_names(s: Shapes) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not s.tied_embeddings:
        names.append("lm_head.weight")
    return names


def hf_layer_names(s: Shapes, layer: int) -> list[str]:
    """The Hugging Face tensor names of one decoder layer (on-disk names)."""
    p = hf_layer_prefix(layer)
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v", "o")]
    if s.is_moe:
        names.append(p + "block_sparse_moe.gate.weight")
        for e in range(s.num_experts):
            names += [p + f"block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")]
    else:
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    return names


def hf_expected_shapes(s: Shapes) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name -> shape implied by config.json."""
    H, F, D = s.hidden_size, s.ffn_hidden_size, s.head_dim
    shapes = {"model.embed_tokens.weight": (s.vocab_size, H), "model.norm.weight": (H,)}
    if not s.tied_embeddings:
        shapes["lm_head.weight"] = (s.vocab_size, H)
    for i in range(s.num_layers):
        p = hf_layer_prefix(i)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (s.num_attention_heads * D, H)
        shapes[p + "self_attn.k_proj.weight"] = (s.num_query_groups * D, H)
        shapes[p + "self_attn.v_proj.weight"] = (s.num_query_groups * D, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, s.num_attention_heads * D)
        if s.is_moe:
            shapes[p + "block_sparse_moe.gate.weight"] = (s.num_experts, H)
            for e in range(s.num_experts):
                q = p + f"block_sparse_moe.experts.{e}."
                shapes[q + "w1.weight"] = (F, H)
                shapes[q + "w3.weight"] = (F, H)
                shapes[q + "w2.weight"] = (H, F)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (F, H)
            shapes[p + "mlp.up_proj.weight"] = (F, H)
            shapes[p + "mlp.down_proj.weight"] = (H, F)
    return shapes


def megatron_global_shapes(s: Shapes) -> dict[str, tuple[int, ...]]:
    """Megatron checkpoint key -> global shape (prepended axes included)."""
    H, F, D, L = s.hidden_size, s.ffn_hidden_size, s.head_dim, s.num_layers
    qkv_rows = s.num_query_groups * (s.num_attention_heads // s.num_query_groups + 2) * D
    shapes = {
        EMBED: (s.padded_vocab_size, H),
        FINAL_NORM: (H,),
        INPUT_NORM: (L, H),
        QKV: (L, qkv_rows, H),
        PROJ: (L, H, s.num_attention_heads * D),
    }
    if not s.tied_embeddings:
        shapes[OUTPUT] = (s.padded_vocab_size, H)
    if s.is_moe:
        E = s.num_experts
        shapes.update({MOE_MLP_NORM: (L, H), ROUTER: (L, E, H),
                       EXPERT_FC1: (L, E, 2 * F, H), EXPERT_FC2: (L, E, H, F)})
    else:
        shapes.update({DENSE_MLP_NORM: (L, H), FC1: (L, 2 * F, H), FC2: (L, H, F)})
    return shapes


def prepended_axes(key: str) -> int:
    """How many leading axes of ``key`` index layers/experts rather than the tensor itself."""
    if key in (EXPERT_FC1, EXPERT_FC2):
        return 2
    if key.startswith("decoder.layers."):
        return 1
    return 0


def megatron_layer_addresses(s: Shapes, layer: int) -> list[Address]:
    """The Megatron slices that make up one decoder layer."""
    addrs: list[Address] = [(INPUT_NORM, (layer,)), (QKV, (layer,)), (PROJ, (layer,))]
    if s.is_moe:
        addrs += [(MOE_MLP_NORM, (layer,)), (ROUTER, (layer,))]
        for e in range(s.num_experts):
            addrs += [(EXPERT_FC1, (layer, e)), (EXPERT_FC2, (layer, e))]
    else:
        addrs += [(DENSE_MLP_NORM, (layer,)), (FC1, (layer,)), (FC2, (layer,))]
    return addrs


def megatron_global_addresses(s: Shapes) -> list[Address]:
    addrs: list[Address] = [(EMBED, ()), (FINAL_NORM, ())]
    if not s.tied_embeddings:
        addrs.append((OUTPUT, ()))
    return addrs


# --- conversions -----------------------------------------------------------------------------


def megatron_from_hf(s: Shapes, address: Address, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The value of one Megatron slice, computed from Hugging Face tensors fetched by ``get``."""
    key, index = address
    if key == EMBED:
        return pad_vocab(get("model.embed_tokens.weight"), s.padded_vocab_size)
    if key == OUTPUT:
        return pad_vocab(get("lm_head.weight"), s.padded_vocab_size)
    if key == FINAL_NORM:
        return get("model.norm.weight")
    p = hf_layer_prefix(index[0])
    if key == INPUT_NORM:
        return get(p + "input_layernorm.weight")
    if key in (DENSE_MLP_NORM, MOE_MLP_NORM):
        return get(p + "post_attention_layernorm.weight")
    if key == QKV:
        return qkv_hf_to_megatron(get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                                  get(p + "self_attn.v_proj.weight"), s.num_query_groups, s.head_dim)
    if key == PROJ:
        return get(p + "self_attn.o_proj.weight")
    if key == FC1:
        return fc1_hf_to_megatron(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"))
    if key == FC2:
        return get(p + "mlp.down_proj.weight")
    if key == ROUTER:
        return get(p + "block_sparse_moe.gate.weight")
    if key in (EXPERT_FC1, EXPERT_FC2):
        q = p + f"block_sparse_moe.experts.{index[1]}."
        if key == EXPERT_FC1:
            return fc1_hf_to_megatron(get(q + "w1.weight"), get(q + "w3.weight"))
        return get(q + "w2.weight")
    raise KeyError(f"no Hugging Face source for Megatron key {key}")


def hf_from_megatron(s: Shapes, address: Address, value: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors that one Megatron slice becomes (inverse of megatron_from_hf)."""
    key, index = address
    if key == EMBED:
        yield "model.embed_tokens.weight", unpad_vocab(value, s.vocab_size)
        return
    if key == OUTPUT:
        yield "lm_head.weight", unpad_vocab(value, s.vocab_size)
        return
    if key == FINAL_NORM:
        yield "model.norm.weight", value
        return
    p = hf_layer_prefix(index[0])
    if key == INPUT_NORM:
        yield p + "input_layernorm.weight", value
    elif key in (DENSE_MLP_NORM, MOE_MLP_NORM):
        yield p + "post_attention_layernorm.weight", value
    elif key == QKV:
        q, k, v = qkv_megatron_to_hf(value, s.num_attention_heads, s.num_query_groups, s.head_dim)
        yield p + "self_attn.q_proj.weight", q
        yield p + "self_attn.k_proj.weight", k
        yield p + "self_attn.v_proj.weight", v
    elif key == PROJ:
        yield p + "self_attn.o_proj.weight", value
    elif key == FC1:
        gate, up = fc1_megatron_to_hf(value)
        yield p + "mlp.gate_proj.weight", gate
        yield p + "mlp.up_proj.weight", up
    elif key == FC2:
        yield p + "mlp.down_proj.weight", value
    elif key == ROUTER:
        yield p + "block_sparse_moe.gate.weight", value
    elif key == EXPERT_FC1:
        gate, up = fc1_megatron_to_hf(value)
        q = p + f"block_sparse_moe.experts.{index[1]}."
        yield q + "w1.weight", gate
        yield q + "w3.weight", up
    elif key == EXPERT_FC2:
        yield p + f"block_sparse_moe.experts.{index[1]}.w2.weight", value
    else:
        raise KeyError(f"no Hugging Face target for Megatron key {key}")
