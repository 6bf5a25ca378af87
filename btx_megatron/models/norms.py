"""Normalisation layers for the local (non-Transformer-Engine) layer spec.

Megatron-Core's local spec wraps ``torch.nn.RMSNorm``/``LayerNorm``, which refuse sequence
parallelism. With sequence parallelism a norm sees a sequence shard, so its weight gradients
must be summed over the tensor-parallel group; Megatron's DDP does that for parameters marked
``sequence_parallel = True``. This norm is the torch functional one with that marking, and its
parameter names (``weight``/``bias``) match the Transformer Engine norms' checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LocalNorm(torch.nn.Module):
    """RMSNorm or LayerNorm with Megatron's norm constructor signature."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(
                f"Unsupported --normalization {config.normalization}; use RMSNorm or LayerNorm."
            )
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            self.bias.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = (self.hidden_size,)
        if self.rms:
            return F.rms_norm(hidden_states, shape, self.weight, self.eps)
        return F.layer_norm(hidden_states, shape, self.weight, self.bias, self.eps)
