"""Core attention for the local spec: PyTorch's fused ``scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` materialises the [b*np, sq, sk] score matrix;
without Transformer Engine that is the unfused fallback. This subclass keeps its constructor
(partitioning, scaling, config checks) and replaces the maths with SDPA, which dispatches to
flash / memory-efficient kernels on GPU and a fused kernel on CPU. GQA key/value heads are
shared through ``enable_gqa`` instead of being materialised.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "packed sequences need TE attention"
        assert attention_bias is None, "attention bias is not supported by SDPAttention"
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if attention_mask is not None:
            # Megatron masks are True where attention is *blocked*; SDPA wants True = keep.
            mask = ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        scale = self.softmax_scale
        if self.config.apply_query_key_layer_scaling:
            scale = scale * self.layer_number  # SDPA applies one scale; undo the split form.
        gqa = q.size(1) != k.size(1)
        if dropout > 0.0 and self.config.sequence_parallel is False:
            ctx = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale,
                enable_gqa=gqa,
            )
        # [b, h, s, d] -> [s, b, h*d]
        out = out.permute(2, 0, 1, 3).contiguous()
        return out.view(out.size(0), out.size(1), -1)
