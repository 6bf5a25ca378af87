"""Which parameters a run trains.

- ``--freeze-experts`` / ``--freeze-router`` (BTX ablations): the mix phase trains attention,
  norms, embeddings and routers only, or keeps the routers fixed.
- ``--train-experts NAME ...`` (FlexOlmo-style expert training): everything is frozen except the
  named experts, and with ``--train-router`` their rows of every router. A new domain expert
  trained this way against a BTX model's shared weights is compatible with them by
  construction and can be added back without averaging.

Frozen shared weights (attention, norms, embeddings, output layer: most of a model) get
``requires_grad = False``, so Megatron-Core's DDP allocates no gradient buffer and its optimizer
no state for them. Frozen *experts* and router rows are frozen by zeroing their gradient and
exempting them from weight decay: Adam's moments of a zero gradient stay zero, so they do not
move at all. They keep (zero) optimizer state because Megatron's distributed checkpoint of the
optimizer covers whole expert tensors ``[layers, experts, ...]``, not single experts.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

ROUTER_SUFFIX = ".mlp.router.weight"
# SequentialMLP: ...mlp.experts.local_experts.3.linear_fc1.weight; TE grouped: ...linear_fc1.weight3
_SEQUENTIAL = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_GROUPED = re.compile(r"\.mlp\.experts\.linear_fc[12]\.(?:weight|bias)(\d+)$")


def global_expert_index(name: str, num_local_experts: int) -> int | None:
    """The global expert index of an expert parameter of this rank (None: not an expert)."""
    match = _SEQUENTIAL.search(name) or _GROUPED.search(name)
    if match is None:
        if ".mlp.experts." in name:
            raise ValueError(f"--train-experts cannot select single experts in {name} (a fused expert weight); "
                             "use the local or TE grouped-GEMM experts.")
        return None
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    return ep_rank * num_local_experts + int(match.group(1))


FROZEN_ATTR = "btx_frozen_by_mask"  # exempt from weight decay (see setup_training)


def apply_freezing(model_chunks, train_cfg, num_experts: int | None) -> int:
    """Freeze per the training options; returns the number of frozen parameter elements."""
    frozen = 0
    trained = train_cfg.trained_expert_ids
    num_local = (num_experts or 0) // max(parallel_state.get_expert_model_parallel_world_size(), 1)
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if trained is not None:
                index = global_expert_index(name, num_local)
                if index is not None:
                    keep = True
                    if index not in trained:
                        _mask_gradient(param, None)
                        frozen += param.numel()
                else:
                    keep = train_cfg.train_router and name.endswith(ROUTER_SUFFIX)
                    if keep:
                        _mask_gradient(param, trained)
            else:
                keep = not ((train_cfg.freeze_experts and ".mlp.experts." in name)
                            or (train_cfg.freeze_router and ".mlp.router." in name))
            if not keep:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


def _mask_gradient(param: torch.nn.Parameter, rows: tuple[int, ...] | None) -> None:
    """Zero the gradient of ``param`` (of all but ``rows`` of a router weight [E, H])."""
    mask = torch.zeros(param.shape[0] if rows is not None else 1, 1, dtype=param.dtype, device=param.device)
    if rows is not None:
        mask[list(rows)] = 1
    param.register_hook(lambda grad: grad * mask.to(grad.dtype) if rows is not None else torch.zeros_like(grad))
    setattr(param, FROZEN_ATTR, True)
