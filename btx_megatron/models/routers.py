"""MoE routers selectable with ``--moe-router-type`` (entered through ``MoESubmodules.router``).

Every router here is a Megatron-Core :class:`TopKRouter`: gating, input jitter, z-loss, the
load-balancing losses (``aux_loss`` is the paper's alpha * N * sum_i u_i p_i), their logging
through Megatron's MoE metrics tracker and the state-dict keys all come from it. Each returns
``(probs, routing_map)`` of shape [num_tokens, num_experts] like Megatron's router.

- ``topk``: Megatron's top-k with ``moe_router_pre_softmax=False`` *is* the paper's form,
  g = softmax over the selected top-k logits, so selection is inherited unchanged.
- ``switch``: Megatron's top-1 with ``moe_router_pre_softmax=True`` (gate = full-softmax
  probability of the chosen expert, so the LM loss reaches the router) and a capacity factor;
  the tokens Megatron drops beyond capacity are counted here.
- ``sample-top1``: Gumbel-softmax sample, only the largest kept, temperature
  max(0.5, exp(-r * step)); soft routing in the first MoE layer; argmax at evaluation.
- ``soft``: every expert, weighted by the softmax over all experts.

All routers keep per-layer routing statistics (tokens per expert, dropped tokens, mean
router probability) for the trainer and the routing-analysis tool; see
:func:`routing_statistics`. The trainer calls :func:`set_router_step` once per iteration.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Iterable, Iterator

import torch
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

from ..config.model import ROUTER_TYPES

# Balancing options that choose the experts themselves; they only make sense for the routers
# that use Megatron's own selection.
_SELECTION_BALANCING = ("sinkhorn", "quantile_balancing")


class _RoutingStatistics:
    """Routing counters accumulated over forward passes until read by :func:`routing_statistics`.

    Counters stay tensors on the router's device so recording never synchronises with the host.
    Only passes that train (grad enabled) or evaluate are counted: under full activation
    recomputation the first, no-grad forward of a training step is repeated, and counting it
    would double the figures (Megatron's expert-bias counters use the same rule).
    """

    def _init_routing_statistics(self) -> None:
        self._stat_tokens_per_expert = None  # [E] assignments kept after capacity dropping
        self._stat_prob_sum = None  # [E] sum over tokens of the full-softmax probability
        self._stat_num_tokens = None  # [] tokens seen
        self._stat_dropped = None  # [] (token, expert) assignments dropped beyond capacity
        self._last_dropped = None
        self._total_dropped = None

    def _record_routing(self, logits_TE: torch.Tensor, routing_map_TE: torch.Tensor, num_requested: int) -> None:
        if self.training and not torch.is_grad_enabled():
            return
        with torch.no_grad():
            kept = routing_map_TE.sum(dim=0).to(torch.float64)
            dropped = num_requested - kept.sum()
            prob_sum = torch.softmax(logits_TE.detach().float(), dim=-1).sum(dim=0).to(torch.float64)
            if self._stat_tokens_per_expert is None:
                self._stat_tokens_per_expert = torch.zeros_like(kept)
                self._stat_prob_sum = torch.zeros_like(kept)
                self._stat_num_tokens = torch.zeros((), dtype=torch.float64, device=kept.device)
                self._stat_dropped = torch.zeros_like(self._stat_num_tokens)
            if self._total_dropped is None:
                self._total_dropped = torch.zeros((), dtype=torch.float64, device=kept.device)
            self._stat_tokens_per_expert += kept
            self._stat_prob_sum += prob_sum
            self._stat_num_tokens += routing_map_TE.shape[0]
            self._stat_dropped += dropped
            self._total_dropped += dropped
            self._last_dropped = dropped

    @property
    def last_num_dropped(self) -> int:
        """(token, expert) assignments dropped beyond capacity in the last counted forward."""
        return 0 if self._last_dropped is None else int(self._last_dropped.item())

    @property
    def total_num_dropped(self) -> int:
        """Assignments dropped since the router was built (not reset by reading statistics)."""
        return 0 if self._total_dropped is None else int(self._total_dropped.item())

    def _pop_routing_counters(self) -> torch.Tensor | None:
        """[tokens_per_expert (E), prob_sum (E), num_tokens, dropped] as one float64 tensor; resets."""
        if self._stat_tokens_per_expert is None:
            return None
        packed = torch.cat(
            [
                self._stat_tokens_per_expert,
                self._stat_prob_sum,
                self._stat_num_tokens.reshape(1),
                self._stat_dropped.reshape(1),
            ]
        )
        self._stat_tokens_per_expert = self._stat_prob_sum = None
        self._stat_num_tokens = self._stat_dropped = None
        return packed


class BTXTopKRouter(_RoutingStatistics, TopKRouter):
    """``topk``: Megatron's top-k selection, which with ``moe_router_pre_softmax=False`` is
    g = softmax(TopK(W x)), the paper's form; adds routing statistics."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self._init_routing_statistics()

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        # Megatron's selection marks exactly top-k experts per token; its capacity step only
        # clears entries (pad_to_capacity is off), so the shortfall is the dropped count.
        self._record_routing(
            logits.reshape(-1, self.config.num_moe_experts), routing_map, routing_map.shape[0] * self.topk
        )
        return probs, routing_map


class SwitchRouter(BTXTopKRouter):
    """``switch``: top-1 gated by the full-softmax probability (pre-softmax form) with tokens
    beyond ``capacity_factor * tokens / experts`` per expert dropped (Megatron's "probs" drop
    policy: an over-full expert keeps its most confident tokens). Dropped tokens pass through the
    layer on the residual only; :attr:`last_num_dropped` / :attr:`total_num_dropped` count them."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        # Options are checked in ModelConfig; models.transformer_config maps them to these.
        assert config.moe_router_topk == 1 and config.moe_router_pre_softmax, \
            "switch: build the TransformerConfig with btx_megatron.models.transformer_config"
        assert config.moe_expert_capacity_factor is not None, "switch needs a capacity factor"
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)


class _DenseSelectionRouter(BTXTopKRouter):
    """Shared part of the routers whose expert selection is not Megatron's top-k.

    ``routing`` follows TopKRouter.routing step for step (z-loss on the logits, selection, the
    aux losses computed on the full softmax with Megatron's own functions) and replaces only the
    selection, :meth:`select`.
    """

    router_type = "?"

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        # Options are checked in ModelConfig (one place); these hold for any config built by
        # models.transformer_config.
        balancing = config.moe_router_load_balancing_type
        balancing = balancing if isinstance(balancing, list) else [balancing]
        assert not set(balancing) & set(_SELECTION_BALANCING), f"{self.router_type}: {balancing}"
        assert config.moe_expert_capacity_factor is None, f"{self.router_type} does not drop tokens"
        assert config.moe_router_score_function == "softmax", f"{self.router_type} needs softmax scores"
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)

    def select(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E] in fp32, routing_map [T, E] bool) for ``logits_TE``."""
        raise NotImplementedError

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        seq_length, bsz = logits.shape[:2]
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_mask)

        probs, routing_map = self.select(logits_TE)
        probs = probs.type_as(logits_TE)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            map_for_aux_loss, scores_for_aux_loss = compute_routing_scores_for_aux_loss(
                logits_TE, self.topk, self.score_function, fused=self.config.moe_router_fusion,
                padding_mask=padding_mask,
            )
            with_padding = padding_mask is not None
            probs = self._apply_aux_loss(probs, scores_for_aux_loss, map_for_aux_loss, with_padding_mask=with_padding)
            probs = self._apply_seq_aux_loss(
                probs, scores_for_aux_loss, map_for_aux_loss, seq_length, bsz, with_padding_mask=with_padding
            )
            probs = self._apply_global_aux_loss(
                probs, scores_for_aux_loss, map_for_aux_loss, with_padding_mask=with_padding
            )
        self._record_routing(logits_TE, routing_map, routing_map.shape[0] * self._requested_per_token())
        return probs, routing_map

    def _requested_per_token(self) -> int:
        raise NotImplementedError


def _soft_selection(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    return probs, torch.ones_like(logits_TE, dtype=torch.bool)


class SoftRouter(_DenseSelectionRouter):
    """``soft``: every token goes to every expert, weighted by softmax(W x) over all experts.

    Megatron's config carries ``moe_router_topk = num_experts`` for this router (the dispatchers
    size their buffers from it). With top-N, the aux loss's u_i is 1/N for every expert, so the
    load-balancing loss is the constant alpha: soft routing has no imbalance to correct.
    """

    router_type = "soft"

    def select(self, logits_TE):
        return _soft_selection(logits_TE)

    def _requested_per_token(self) -> int:
        return self.config.num_moe_experts


def first_moe_layer_number(config) -> int:
    """1-based number of the first MoE layer of the model under ``config.moe_layer_freq``."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return 1  # layer i (0-based) is MoE when i % freq == 0
    for index, is_moe in enumerate(freq):
        if is_moe:
            return index + 1
    raise ValueError("moe_layer_freq marks no layer as MoE.")


class SampleTop1Router(_DenseSelectionRouter):
    """``sample-top1``: Gumbel-softmax sample, only the largest kept.

    Training: y = softmax((W x + g) / tau), g ~ Gumbel(0, 1), tau = max(0.5, exp(-r * step));
    the token goes to argmax y with the straight-through gate ``1 + (y_k - stop_grad(y_k))``:
    the forward value is exactly 1 (as at evaluation, so train and eval outputs match for the
    same choice) and the router's gradient is that of the soft sample y_k. (argmax y does not
    depend on tau; tau shapes only the gradient.) Evaluation: argmax of W x, gate 1.
    The first MoE layer routes softly (as :class:`SoftRouter`) in training and evaluation.

    ``step`` is the training iteration; the trainer sets it with :func:`set_router_step`
    (a plain attribute, not saved: a resumed run sets it from its iteration).
    """

    router_type = "sample-top1"

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, temperature_rate: float = 1e-4):
        assert config.moe_router_topk in (1, config.num_moe_experts), config.moe_router_topk
        assert temperature_rate >= 0, temperature_rate
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.temperature_rate = float(temperature_rate)
        self.step = 0
        self._first_moe_layer = first_moe_layer_number(config)

    def set_layer_number(self, layer_number: int) -> None:
        super().set_layer_number(layer_number)
        # Megatron's dispatchers other than allgather size their buffers from the config's
        # moe_router_topk; the soft layer sends every token to all experts, so its MoE layer
        # needs a config saying so (see soft_layer_mlp), and the other layers one saying 1.
        wanted = self.config.num_moe_experts if self.is_soft_layer else 1
        if self.config.moe_router_topk != wanted and (
            not self.is_soft_layer or self.config.moe_token_dispatcher_type != "allgather"
        ):
            raise ValueError(
                f"--moe-router-type sample-top1: MoE layer {layer_number} routes "
                f"{'softly to all experts' if self.is_soft_layer else 'to one expert'} but its "
                f"config has moe_router_topk={self.config.moe_router_topk}; build the first MoE "
                "layer's MLP with btx_megatron.models.routers.soft_layer_mlp (needed by the "
                f"{self.config.moe_token_dispatcher_type} dispatcher)."
            )

    def set_step(self, step: int) -> None:
        self.step = int(step)

    @property
    def temperature(self) -> float:
        return max(0.5, math.exp(-self.temperature_rate * self.step))

    @property
    def is_soft_layer(self) -> bool:
        return not self.is_mtp_layer and self.layer_number == self._first_moe_layer

    def select(self, logits_TE):
        if self.is_soft_layer:
            return _soft_selection(logits_TE)
        if self.training:
            logits32 = logits_TE.float()
            # -log(Exp(1)) is Gumbel(0, 1); drawn from the default generator of the device.
            gumbel = -torch.empty_like(logits32).exponential_().log()
            soft_sample = torch.softmax((logits32 + gumbel) / self.temperature, dim=-1)
            chosen = soft_sample.argmax(dim=-1, keepdim=True)
            hard = torch.zeros_like(soft_sample).scatter(1, chosen, 1.0)
            probs = hard + (soft_sample - soft_sample.detach())
        else:
            chosen = logits_TE.argmax(dim=-1, keepdim=True)
            hard = torch.zeros_like(logits_TE, dtype=torch.float32).scatter(1, chosen, 1.0)
            probs = hard
        return probs, hard.bool()

    def _requested_per_token(self) -> int:
        return self.config.num_moe_experts if self.is_soft_layer else 1


def soft_layer_mlp(mlp_builder):
    """The MoE-layer builder for sample-top1's first MoE layer, wrapping ``mlp_builder`` (the
    ``mlp`` of the MoE layer spec): the layer gets a copy of the config with
    ``moe_router_topk = num_experts``, because the alltoall and flex dispatchers size their
    buffers from it and this layer routes every token to every expert."""
    return functools.partial(_build_soft_layer_mlp, mlp_builder)


def _build_soft_layer_mlp(mlp_builder, *, config, **kwargs):
    soft_config = copy.copy(config)
    soft_config.moe_router_topk = config.num_moe_experts
    return mlp_builder(config=soft_config, **kwargs)


def router_class(router_type: str, *, sample_temperature_rate: float = 1e-4):
    """The router module (a ``MoESubmodules.router`` builder) for ``--moe-router-type``."""
    if router_type == "topk":
        return BTXTopKRouter
    if router_type == "switch":
        return SwitchRouter
    if router_type == "soft":
        return SoftRouter
    if router_type == "sample-top1":
        return functools.partial(SampleTop1Router, temperature_rate=sample_temperature_rate)
    raise ValueError(f"--moe-router-type {router_type!r} is not one of {', '.join(ROUTER_TYPES)}.")


# --- Helpers for the trainer and the routing-analysis tool ---------------------------------


def _modules(model_chunks) -> Iterable[torch.nn.Module]:
    if isinstance(model_chunks, torch.nn.Module):
        return [model_chunks]
    return model_chunks


def btx_routers(model_chunks) -> Iterator[_RoutingStatistics]:
    """The BTX routers in ``model_chunks`` (a module or a list; DDP-wrapped is fine), in order."""
    for chunk in _modules(model_chunks):
        for module in chunk.modules():
            if isinstance(module, _RoutingStatistics):
                yield module


def set_router_step(model_chunks, step: int) -> None:
    """Tell every router the training iteration (sets sample-top1's temperature); call before
    each training step's forward passes."""
    for router in btx_routers(model_chunks):
        if isinstance(router, SampleTop1Router):
            router.set_step(step)


def routing_statistics(model_chunks, *, reduce: bool = True) -> dict[int, dict]:
    """Per-layer routing figures accumulated since the last call, then reset.

    Returns ``{layer_number: {"token_fraction": [E floats], "mean_prob": [E floats],
    "tokens": int, "dropped": int}}`` for this rank's MoE layers (a pipeline stage sees its own
    layers). ``token_fraction[i]`` = assignments kept for expert i / assignments requested
    (tokens x experts per token), the paper's u_i: it sums to 1 minus the dropped share.
    ``mean_prob[i]`` = mean full-softmax router probability of expert i (the paper's p_i).
    ``dropped`` counts (token, expert) assignments dropped beyond capacity (tokens, for top-1).

    With ``reduce`` (default) the counters are summed over the router's tensor+data+context
    parallel group, which together hold all of a layer's tokens: every rank of that group must
    call this (a collective); everyone gets the global figures.
    """
    stats: dict[int, dict] = {}
    for router in btx_routers(model_chunks):
        packed = router._pop_routing_counters()
        num_experts = router.config.num_moe_experts
        group = router.tp_dp_cp_group
        if reduce and torch.distributed.is_initialized() and group is not None and group.size() > 1:
            if packed is None:  # a rank that saw no tokens still joins the collective
                packed = torch.zeros(2 * num_experts + 2, dtype=torch.float64, device=router.weight.device)
            torch.distributed.all_reduce(packed, group=group)
        if packed is None:
            continue
        packed = packed.cpu()
        kept, prob_sum = packed[:num_experts], packed[num_experts : 2 * num_experts]
        num_tokens, dropped = packed[2 * num_experts].item(), packed[2 * num_experts + 1].item()
        requested = kept.sum().item() + dropped
        stats[router.layer_number] = {
            "token_fraction": (kept / requested).tolist() if requested else [0.0] * num_experts,
            "mean_prob": (prob_sum / num_tokens).tolist() if num_tokens else [0.0] * num_experts,
            "tokens": int(round(num_tokens)),
            "dropped": int(round(dropped)),
        }
    return stats


def reset_routing_statistics(model_chunks) -> None:
    """Discard the accumulated routing counters (e.g. before an evaluation pass)."""
    for router in btx_routers(model_chunks):
        router._pop_routing_counters()


__all__ = [
    "BTXTopKRouter",
    "SampleTop1Router",
    "SoftRouter",
    "SwitchRouter",
    "btx_routers",
    "first_moe_layer_number",
    "reset_routing_statistics",
    "router_class",
    "routing_statistics",
    "set_router_step",
    "soft_layer_mlp",
]
