"""Work units of a merge: the output slices, what each is made of, and which process makes it.

A unit is one part of one (output key, layer) slice of the MoE checkpoint (non-layer tensors
such as the embedding count as one slice), and becomes one chunk of the output:

* averaged slices are cut into row blocks of at most :data:`PART_BYTES`, each read from the
  same rows of every weighted source;
* a BTX expert slice is one unit per expert, read from its one source straight into the output
  buffer (other expert methods need every source and stay one unit per slice);
* each router is one unit.

Megatron-Core loads a tensor from any set of chunks that covers it (a TP/EP-sharded save has
such chunks too), so the cut is invisible to readers; it bounds what a process holds at once
and lets W processes share the work evenly. Key mapping (dense -> MoE), per layer:
``mlp.linear_fc1.layer_norm_{weight,bias}`` -> ``pre_mlp_layernorm.{weight,bias}`` (averaged),
``mlp.linear_fc1/fc2.{weight,bias}`` -> ``mlp.experts.experts.linear_fc1/fc2.*`` [E, ...]
(see :mod:`.plan`), a new ``mlp.router.weight`` [E, H]; every other model tensor is averaged.
``_extra_state`` objects (TE FP8 metadata) are not written: they hold no weights, a merged
model must recalibrate FP8 scales anyway, and ``load_model_weights`` skips them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import plan as core

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
LAYER_PREFIX = "decoder.layers."
DENSE_FC = {
    "decoder.layers.mlp.linear_fc1.weight": ("decoder.layers.mlp.experts.experts.linear_fc1.weight", core.FC1_WEIGHT),
    "decoder.layers.mlp.linear_fc1.bias": ("decoder.layers.mlp.experts.experts.linear_fc1.bias", core.FC1_BIAS),
    "decoder.layers.mlp.linear_fc2.weight": ("decoder.layers.mlp.experts.experts.linear_fc2.weight", core.FC2_WEIGHT),
    "decoder.layers.mlp.linear_fc2.bias": ("decoder.layers.mlp.experts.experts.linear_fc2.bias", core.FC2_BIAS),
}
DENSE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_"
ROUTER_KEY = "decoder.layers.mlp.router.weight"
PART_BYTES = 16 << 20
"""Largest output part of an averaged slice (bounds a unit's memory: its sources and output)."""


@dataclasses.dataclass
class Unit:
    """One output part: ``out_key`` at ``layer`` (None: a non-layer tensor), the box of shape
    ``shape`` at ``offset`` in the per-layer output tensor of shape ``full_shape``."""

    out_key: str
    layer: int | None
    kind: str  # "avg" | expert kind | "router"
    src_key: str | None
    shape: tuple[int, ...]  # this part's shape (layer axis removed)
    src_shape: tuple[int, ...] | None  # the box read from each source (layer axis removed)
    dtype: str
    num_layers: int
    offset: tuple[int, ...] = ()  # where the part starts in the per-layer tensor (empty: at 0)
    full_shape: tuple[int, ...] = ()  # the per-layer output tensor (empty: ``shape``)
    source: int | None = None  # a BTX expert part: the one source (= expert) it copies

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize

    @property
    def global_shape(self) -> tuple[int, ...]:
        full = self.full_shape or self.shape
        return full if self.layer is None else (self.num_layers, *full)

    def offsets(self) -> tuple[int, ...]:
        """Global offsets of the output part (layer axis first for layer tensors)."""
        off = self.offset or (0,) * len(self.shape)
        return off if self.layer is None else (self.layer, *off)

    def src_offsets(self) -> tuple[int, ...]:
        """Global offsets of the box read from a source: the same rows for averages, the whole
        per-layer slice for experts."""
        off = self.offset if self.kind == "avg" and self.offset else (0,) * len(self.src_shape)
        return off if self.layer is None else (self.layer, *off)

    def reads(self, weight: float, source: int | None = None) -> bool:
        """Whether the source with averaging ``weight`` (index ``source``) contributes."""
        if self.src_key is None:
            return False
        if self.kind == "avg":
            return weight != 0.0
        return self.source is None or source is None or source == self.source


def out_key(src_key: str) -> str:
    if src_key.startswith(DENSE_NORM):
        return "decoder.layers.pre_mlp_layernorm." + src_key[len(DENSE_NORM):]
    return src_key


def build_units(ref, plan: core.ExpertPlan, num_layers: int, num_experts: int, hidden: int,
                dtype: str | None = None) -> list[Unit]:
    """Every output part of the merge, from the tensors of the reference source ``ref``."""
    units = []
    router_dtype = dtype
    for key, (shape, src_dtype) in sorted(ref.tensors.items()):
        out_dtype = dtype or src_dtype
        router_dtype = router_dtype or src_dtype
        layered = key.startswith(LAYER_PREFIX)
        if layered and shape[0] != num_layers:
            raise ValueError(f"{ref.label}: {key} has {shape[0]} layers, the manifest says {num_layers}.")
        per = tuple(shape[1:] if layered else shape)
        if key in DENSE_FC:
            okey, kind = DENSE_FC[key]
            parts = _expert_parts(plan, kind, per)
        elif key.startswith("decoder.layers.mlp.") and not key.startswith(DENSE_NORM):
            raise ValueError(f"{ref.label}: unexpected FFN tensor {key}; only dense MLPs can be merged.")
        else:
            okey, kind = out_key(key), "avg"
            parts = _row_parts(per, getattr(torch, out_dtype).itemsize)
        for layer in range(num_layers) if layered else [None]:
            for offset, part_shape, src_shape, full, source in parts:
                units.append(Unit(okey, layer, kind, key, part_shape, src_shape, out_dtype, num_layers, offset,
                                  full, source))
    for layer in range(num_layers):
        units.append(Unit(ROUTER_KEY, layer, "router", None, (num_experts, hidden), None, router_dtype, num_layers))
    return units


def _row_parts(shape: tuple[int, ...], itemsize: int):
    """(offset, part shape, source box, full shape, source) of an averaged tensor's row blocks."""
    if len(shape) < 2:
        return [((), shape, shape, (), None)]
    row = math.prod(shape[1:]) * itemsize
    rows = max(1, PART_BYTES // row)
    return [((r, *(0,) * (len(shape) - 1)), (min(rows, shape[0] - r), *shape[1:]),
             (min(rows, shape[0] - r), *shape[1:]), shape, None) for r in range(0, shape[0], rows)]


def _expert_parts(plan: core.ExpertPlan, kind: str, per: tuple[int, ...]):
    """BTX: one part per expert (copied from its source); other methods: the whole [E, ...] slice."""
    full = core.expert_shape(plan, kind, per)
    if plan.method != "btx":
        return [((), full, per, (), None)]
    return [((e, *(0,) * len(per)), (1, *per), per, full, e) for e in range(plan.num_experts)]


def unit_cost(unit: Unit, weights: list[float]) -> int:
    """Bytes a unit moves: its output plus every source box it reads."""
    src = math.prod(unit.src_shape) * getattr(torch, unit.dtype).itemsize if unit.src_shape else 0
    return unit.nbytes + src * sum(unit.reads(w, i) for i, w in enumerate(weights))


def assign_units(units: list[Unit], world: int, costs: list[int] | None = None) -> list[int]:
    """Owner rank of each unit: costliest first onto the least loaded rank (deterministic).
    ``costs`` default to the output bytes."""
    costs = [u.nbytes for u in units] if costs is None else costs
    load = [0] * world
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


__all__ = ["DENSE_FC", "DENSE_NORM", "LAYER_PREFIX", "MODEL_PREFIXES", "PART_BYTES", "ROUTER_KEY", "Unit", "assign_units",
           "build_units", "out_key", "unit_cost"]
