"""BTX merge arithmetic: from dense source tensors to the tensors of one MoE model.

Pure functions on in-memory tensors; :mod:`btx_megatron.merge.writer` feeds them one
(checkpoint key, layer) slice at a time. Shapes are per layer (the on-disk layer axis removed):

* dense ``linear_fc1.weight`` [2F, H] for SwiGLU (gate rows then up rows) or [F, H];
  ``linear_fc2.weight`` [H, F]; biases [2F] / [F] and [H].
* MoE expert tensors are the same per expert; the merge fills ``out[e]`` of an [E, ...] slice.

Expert methods (``ExpertPlan.method``):

``btx``      expert i = source i's FFN (Branch-Train-MiX).
``split``    each source FFN cut into C chunks along F; expert i*C+c = chunk c of source i.
             For SwiGLU the gate and up halves are chunked alike (chunk c holds gate rows
             c*F/C.. and the matching up rows), so each chunk is a complete small SwiGLU and
             the sum of the C chunks' outputs is exactly the dense FFN output.
``blend``    N sources, each cut into N chunks; expert n = chunk n of every source,
             concatenated along F (same expert size as the dense FFN).
``upcycle``  one source; every expert a copy of its FFN, optionally plus Gaussian noise.

Split scale (``split_scale``): the router gives each selected expert a weight (top-k softmax,
weights sum to 1), so with the C chunks of one source selected at equal weight 1/C the MoE
layer returns (1/C) x dense FFN. Modes:

``exact``     (default) multiply fc2 (linear in the output) by C: equal-weight routing over
              the C chunks reproduces the dense FFN output exactly, for any activation.
``megatron``  Megatron-Core's granular upcycling (``moe/upcycling_utils.py``): activation
              scale G = C (or E*C/k for pre-softmax routing), applied as s = G^(1/3) on fc1
              and fc2 for gated units (G^(1/2) otherwise). Variance-preserving, not exact:
              silu(s*x) != s*silu(x).
``none``      chunks copied unscaled.

Averages (:func:`average_into`) accumulate in float64 and round once to the output dtype. That
precision is what keeps the result independent of the summation order's rounding: a float32
sum of bfloat16 weights already loses bits when a large value and its near-negation straddle a
small one (1 + 2**-30 - 1). Computed block by block (cache-sized), the float64 sum costs about
what a copy does, so there is nothing to gain from a narrower accumulator.
"""

from __future__ import annotations

import dataclasses
import math

import torch

METHODS = ("btx", "split", "blend", "upcycle")
SPLIT_SCALES = ("exact", "megatron", "none")

# Per-layer tensor kinds of the dense FFN that become expert tensors.
FC1_WEIGHT, FC1_BIAS, FC2_WEIGHT, FC2_BIAS = "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"


# Elements per averaging block: 256 KiB of float64, cache-resident, and at most TensorIterator's
# grain size (32768), so each block runs on one thread with the same vector/scalar split of the
# elements whatever the thread count.
AVERAGE_BLOCK = 32768


def average_into(out: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``out = (sum_i w_i * t_i) / sum_i w_i``, accumulated in float64, rounded once to ``out``'s dtype.

    Bit for bit the result of a whole-tensor float64 running sum started at +0.0
    (``acc.add_(t, alpha=w)`` in source order, sources with weight 0 skipped, one division by the
    weight sum unless it is 1, one rounding), computed block by block so the float64 temporaries
    stay in cache. The sum starts from the first weighted source instead of +0.0, which changes
    nothing but the sign of an all-zero sum (-0.0 + -0.0 stays -0.0, +0.0 + -0.0 does not): one
    ``+ 0.0`` restores it. ``tensors`` may have any floating dtype; all have ``out``'s shape.
    """
    if not tensors:
        raise ValueError("average_into() needs at least one tensor")
    weight_sum = float(sum(weights))
    if len(weights) != len(tensors) or not weight_sum > 0:
        raise ValueError(f"averaging weights {list(weights)} must match the tensors and have a positive sum")
    for t in tensors:
        if t.shape != out.shape:
            raise ValueError(f"cannot average shape {tuple(t.shape)} into {tuple(out.shape)}")
    flat_out = out.view(-1)
    flat_in = [(t.reshape(-1), float(w)) for t, w in zip(tensors, weights) if w != 0.0]
    n = flat_out.numel()
    acc_buf = torch.empty(min(n, AVERAGE_BLOCK), dtype=torch.float64)
    wide_buf = torch.empty_like(acc_buf)
    for start in range(0, n, AVERAGE_BLOCK):
        stop = min(start + AVERAGE_BLOCK, n)
        acc, wide = acc_buf[: stop - start], wide_buf[: stop - start]
        (t, w), rest = flat_in[0], flat_in[1:]
        if w == 1.0:
            acc.copy_(t[start:stop])  # widening to float64 is exact
        else:
            torch.mul(wide.copy_(t[start:stop]), w, out=acc)
        for t, w in rest:
            wide.copy_(t[start:stop])
            if w == 1.0:
                acc.add_(wide)
            else:
                acc.add_(wide, alpha=w)
        acc.add_(0.0)  # the sign of an all-zero sum, as from +0.0
        if weight_sum != 1.0:
            acc.div_(weight_sum)
        flat_out[start:stop].copy_(acc)
    return out


def average(tensors: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """Weighted element-wise mean in the dtype of the first tensor (see :func:`average_into`)."""
    if not tensors:
        raise ValueError("average() needs at least one tensor")
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    return average_into(torch.empty_like(tensors[0]), tensors, weights)


def normalized_weights(names: list[str], given: dict[str, float] | None, flag: str = "--weights") -> list[float]:
    """Averaging weights in source order; unnamed sources get 0 when ``given`` is set."""
    if not given:
        return [1.0 / len(names)] * len(names)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{flag} names {unknown}, which are not sources ({names}).")
    for name, w in given.items():
        if not (w >= 0.0 and math.isfinite(w)):
            raise ValueError(f"{flag} {name}={w}: weights must be finite and >= 0.")
    total = sum(given.values())
    if total <= 0:
        raise ValueError(f"{flag}: the weights sum to {total}; at least one must be positive.")
    return [given.get(n, 0.0) / total for n in names]


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """How the sources' FFNs become experts."""

    method: str = "btx"
    num_sources: int = 1
    split: int = 1  # C for "split"
    num_experts_upcycle: int | None = None  # E for "upcycle"
    split_scale: str = "exact"
    gated: bool = True  # SwiGLU: fc1 rows are [gate; up]
    pre_softmax: bool = False
    topk: int = 2
    upcycle_noise: float = 0.0
    noise_seed: int = 1234

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; choose one of {METHODS}.")
        if self.split_scale not in SPLIT_SCALES:
            raise ValueError(f"--split-scale {self.split_scale!r}: choose one of {SPLIT_SCALES}.")
        if self.method == "split" and self.split < 1:
            raise ValueError(f"--split-experts {self.split} must be >= 1.")
        if self.method == "upcycle":
            if self.num_sources != 1:
                raise ValueError("upcycling takes exactly one dense source (--upcycle-from).")
            if not self.num_experts_upcycle or self.num_experts_upcycle < 1:
                raise ValueError("--upcycle-from needs --num-experts >= 1.")

    @property
    def num_experts(self) -> int:
        if self.method == "split":
            return self.num_sources * self.split
        if self.method == "upcycle":
            return self.num_experts_upcycle
        return self.num_sources

    def expert_ffn_size(self, ffn: int) -> int:
        chunks = self.chunks
        if ffn % chunks:
            what = "--split-experts" if self.method == "split" else "the number of sources (--blend-experts)"
            raise ValueError(f"FFN hidden size {ffn} is not divisible by {what} ({chunks}).")
        return ffn if self.method in ("btx", "upcycle", "blend") else ffn // chunks

    @property
    def chunks(self) -> int:
        if self.method == "split":
            return self.split
        if self.method == "blend":
            return self.num_sources
        return 1

    def scales(self) -> tuple[float, float]:
        """(fc1 scale, fc2 scale) applied to split chunks (see the module docstring)."""
        if self.method != "split" or self.split == 1 or self.split_scale == "none":
            return 1.0, 1.0
        c = self.split
        if self.split_scale == "exact":
            return 1.0, float(c)
        # Megatron-Core granular upcycling (granularity G = C, expansion rate = sources).
        if self.pre_softmax:
            activation = self.num_sources * c * c / self.topk
        else:
            activation = c
        s = activation ** (1.0 / 3.0) if self.gated else activation ** 0.5
        return s, s

    def recommended_topk(self, base_topk: int) -> int:
        return base_topk * self.split if self.method == "split" else base_topk

    def expert_names(self, source_names: list[str]) -> list[str]:
        if self.method == "split":
            return [f"{n}.{c}" for n in source_names for c in range(self.split)]
        if self.method == "blend":
            return [f"blend.{i}" for i in range(self.num_sources)]
        if self.method == "upcycle":
            return [f"{source_names[0]}.{i}" for i in range(self.num_experts)]
        return list(source_names)


def _chunk_rows(t: torch.Tensor, chunks: int, gated: bool, kind: str) -> list[torch.Tensor]:
    """Split an FFN tensor into ``chunks`` pieces along F (gate/up consistently)."""
    if kind in (FC1_WEIGHT, FC1_BIAS):
        if gated:
            gate, up = torch.chunk(t, 2, dim=0)
            return [torch.cat([g, u], dim=0) for g, u in zip(torch.chunk(gate, chunks, 0), torch.chunk(up, chunks, 0))]
        return list(torch.chunk(t, chunks, dim=0))
    if kind == FC2_WEIGHT:
        return list(torch.chunk(t, chunks, dim=1))
    raise ValueError(kind)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return t
    # Scale in float32 at least so bf16 chunks round once.
    return (t.to(torch.promote_types(t.dtype, torch.float32)) * scale).to(t.dtype)


def fill_experts(plan: ExpertPlan, kind: str, source_index: int, dense: torch.Tensor, out: torch.Tensor,
                 layer: int = 0) -> None:
    """Write source ``source_index``'s dense FFN slice ``dense`` into the experts ``out`` [E, ...]."""
    if plan.method == "btx":
        out[source_index].copy_(dense)
        return
    if plan.method == "upcycle":
        for e in range(plan.num_experts):
            out[e].copy_(dense)
            if plan.upcycle_noise > 0 and kind in (FC1_WEIGHT, FC2_WEIGHT):
                out[e].add_(upcycle_noise(dense, plan.upcycle_noise, plan.noise_seed, layer, e, kind).to(dense.dtype))
        return
    if plan.method == "split":
        c = plan.split
        fc1_scale, fc2_scale = plan.scales()
        if kind == FC2_BIAS:
            # Output bias is added once per selected chunk; with weights 1/C it sums to b.
            for j in range(c):
                out[source_index * c + j].copy_(dense)
            return
        scale = fc2_scale if kind == FC2_WEIGHT else fc1_scale if kind == FC1_WEIGHT else 1.0
        for j, piece in enumerate(_chunk_rows(dense, c, plan.gated, kind)):
            out[source_index * c + j].copy_(_scaled(piece, scale))
        return
    if plan.method == "blend":
        n = plan.num_sources
        d = source_index
        if kind == FC2_BIAS:
            # Every blended expert mixes all domains; its output bias is the mean bias.
            if d == 0:
                out.zero_()
            out.add_(dense / n)
            return
        pieces = _chunk_rows(dense, n, plan.gated, kind)
        for e, piece in enumerate(pieces):
            # Expert e holds chunk e of every domain, domain d's at position d along F.
            if kind == FC2_WEIGHT:
                w = piece.shape[1]
                out[e][:, d * w:(d + 1) * w].copy_(piece)
            elif plan.gated:
                w = piece.shape[0] // 2
                half = out.shape[1] // 2
                out[e][d * w:(d + 1) * w].copy_(piece[:w])
                out[e][half + d * w:half + (d + 1) * w].copy_(piece[w:])
            else:
                w = piece.shape[0]
                out[e][d * w:(d + 1) * w].copy_(piece)
        return
    raise ValueError(plan.method)


def expert_shape(plan: ExpertPlan, kind: str, dense_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-layer [E, ...] shape of the expert tensor made from a dense slice of ``dense_shape``."""
    shape = list(dense_shape)
    if plan.method == "split":
        if kind in (FC1_WEIGHT, FC1_BIAS):
            shape[0] //= plan.split
        elif kind == FC2_WEIGHT:
            shape[1] //= plan.split
    return (plan.num_experts, *shape)


def upcycle_noise(t: torch.Tensor, std: float, seed: int, layer: int, expert: int, kind: str) -> torch.Tensor:
    """Seeded Gaussian noise, ``std`` relative to the tensor's own standard deviation."""
    g = torch.Generator().manual_seed(mix_seed(seed, layer, expert, 1 if kind == FC1_WEIGHT else 2))
    scale = float(t.float().std()) * std
    return torch.randn(t.shape, generator=g, dtype=torch.float32) * scale


def mix_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


__all__ = [
    "AVERAGE_BLOCK", "ExpertPlan", "FC1_BIAS", "FC1_WEIGHT", "FC2_BIAS", "FC2_WEIGHT", "METHODS", "SPLIT_SCALES",
    "average", "average_into", "expert_shape", "fill_experts", "mix_seed", "normalized_weights", "upcycle_noise",
]
