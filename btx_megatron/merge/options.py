"""What a merge is asked to do (:class:`MergeOptions`) and the checked plan it becomes
(:func:`prepare` -> :class:`MergeJob`): sources inspected, expert plan, averaging weights, the
output slices and the merged model's config. Cheap (metadata and fingerprints only), run by
one process; every user mistake is a ValueError naming the flag and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import checkpoint as fmt
from . import plan as core
from .router_init import ROUTER_INITS, replicate_centroids
from .sources import Source, check_sources, inspect_source, model_config
from .units import Unit, build_units

TOOL = "tools/merge_branches.py"


@dataclasses.dataclass
class MergeOptions:
    branches: list[tuple[str, str]]  # (name, path) in expert order
    output: str
    seed_expert: str | None = None
    upcycle_from: str | None = None
    num_experts: int | None = None  # upcycling
    method: str = "btx"  # btx | split | blend | upcycle
    split: int = 1
    split_scale: str = "exact"
    upcycle_noise: float = 0.0
    weights: dict[str, float] | None = None
    router_init: str = "random"
    router_seed: int = 1234
    centroids: Any = None  # tensor [num_sources, L, H] for router_init == "centroid"
    centroid_info: dict | None = None
    centroid_data: dict[str, list[str]] | None = None  # source name -> data prefixes (equal blend)
    centroid_samples: int = 16
    centroid_seq_length: int | None = None
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    topk: int | None = None  # the mix phase's top-k (default: the branches' moe_router_topk)
    router_type: str | None = None  # the mix phase's router type (default: the branches' moe_router_type)
    overwrite: bool = False
    full_hash: bool = False
    allow_duplicates: bool = False  # the same checkpoint as several experts (tests, ablations)
    progress: bool = True
    dtype: str | None = None  # output dtype (default: the sources')
    io_threads: int = 2
    """Threads reading source slices ahead of the arithmetic (the output is written by one more)."""
    max_inflight_mib: int = 256
    """Bound on the source slices read ahead plus the output slices waiting to be written (per process)."""
    workers: int = 1
    """Processes forked by one plain process after its imports, each merging 1/N of the output
    (as N torchrun processes would, without their start-up); 1: merge in this process."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}.")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}.")
        if self.max_inflight_mib < 1:
            raise ValueError(f"max_inflight_mib must be >= 1, got {self.max_inflight_mib}.")


@dataclasses.dataclass
class MergeJob:
    """The checked merge: what every process needs (picklable; rank 0 builds it)."""

    sources: list[Source]
    plan: core.ExpertPlan
    units: list[Unit]
    weights: list[float]  # raw averaging weights per source (divided by their sum once)
    model: dict  # the merged model's ModelConfig fields
    recommended_topk: int
    num_layers: int
    init_method_std: float


def _sources(opts: MergeOptions) -> tuple[list[Source], str]:
    if opts.upcycle_from:
        if opts.branches or opts.seed_expert:
            raise ValueError("--upcycle-from makes every expert from one dense model; drop --branch/--seed-expert.")
        return [inspect_source("upcycle", opts.upcycle_from, "--upcycle-from", opts.full_hash)], "upcycle"
    if not opts.branches:
        raise ValueError("give at least one --branch NAME=DIR (or --upcycle-from DIR).")
    names = [n for n, _ in opts.branches]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--branch names {dup} more than once; each branch needs its own name.")
    if opts.seed_expert and "seed" in names:
        raise ValueError("--seed-expert adds an expert named 'seed'; rename the --branch called seed.")
    sources = [inspect_source(n, p, "--branch", opts.full_hash) for n, p in opts.branches]
    if opts.seed_expert:
        sources.append(inspect_source("seed", opts.seed_expert, "--seed-expert", opts.full_hash))
    return sources, opts.method


def _weights(opts: MergeOptions, sources: list[Source], method: str) -> list[float]:
    # Raw weights: the average divides by their sum once at the end, so uniform weights give
    # exactly sum/N (the element-wise mean), not a sum of pre-scaled terms.
    if method == "upcycle":
        return [1.0]
    if opts.weights:
        core.normalized_weights([s.name for s in sources], opts.weights)  # validates
        return [float(opts.weights.get(s.name, 0.0)) for s in sources]
    # Uniform over the branches (the paper); the seed expert contributes only its FFN.
    return [1.0 if s.flag == "--branch" else 0.0 for s in sources]


def _check_router_options(opts: MergeOptions, sources: list[Source], plan: core.ExpertPlan, mcfg) -> None:
    names = [s.name for s in sources]
    if opts.router_init not in ROUTER_INITS:
        raise ValueError(f"--router-init {opts.router_init!r}: choose one of {ROUTER_INITS}.")
    if opts.router_init != "centroid":
        return
    if plan.method == "blend":
        raise ValueError("--router-init centroid has no meaning for --blend-experts (every expert mixes all domains).")
    if opts.centroids is not None:
        want = (len(sources), mcfg.num_layers, mcfg.hidden_size)
        if tuple(opts.centroids.shape) != want:
            raise ValueError(f"centroids have shape {tuple(opts.centroids.shape)}, expected "
                             f"[sources, layers, hidden] = {want}.")
        replicate_centroids(opts.centroids[:, 0], plan)
        return
    data = opts.centroid_data or {}
    missing = [n for n in names if n not in data]
    if missing:
        raise ValueError(f"--router-init centroid needs --centroid-data NAME=PREFIX for {missing} (or --centroid-file).")
    extra = sorted(set(data) - set(names))
    if extra:
        raise ValueError(f"--centroid-data names {extra}, which are not sources ({names}).")
    if not opts.tokenizer_type:
        raise ValueError("--centroid-data needs --tokenizer-type (and --tokenizer-model) of the branches' data.")


def prepare(opts: MergeOptions) -> MergeJob:
    """Validate everything and build the job (one process; cheap: metadata and fingerprints only)."""
    sources, method = _sources(opts)
    fmt.check_output(opts.output, [s.path for s in sources] + [s.ckpt_dir for s in sources], tool=TOOL,
                     overwrite=opts.overwrite)
    check_sources(sources, opts.allow_duplicates)
    mcfg = model_config(sources[0])
    weights = _weights(opts, sources, method)
    base_topk = opts.topk or mcfg.moe_router_topk
    router_type = opts.router_type or mcfg.moe_router_type
    plan = core.ExpertPlan(
        method=method, num_sources=len(sources), split=opts.split,
        num_experts_upcycle=opts.num_experts, split_scale=opts.split_scale, gated=mcfg.swiglu,
        pre_softmax=router_type == "switch", topk=base_topk, upcycle_noise=opts.upcycle_noise,
        noise_seed=opts.router_seed,
    )
    ffn = plan.expert_ffn_size(mcfg.ffn_hidden_size)
    _check_router_options(opts, sources, plan, mcfg)
    units = build_units(sources[0], plan, mcfg.num_layers, plan.num_experts, mcfg.hidden_size, opts.dtype)
    recommended = plan.recommended_topk(base_topk)
    model = dataclasses.asdict(mcfg)
    model.update(
        num_experts=plan.num_experts,
        moe_ffn_hidden_size=ffn if ffn != mcfg.ffn_hidden_size else None,
        moe_router_topk=min(recommended, plan.num_experts),
        # The merged model is what the mix phase starts from, and is evaluated before it: recorded
        # with the mix's router (a top-k router at top-1 is not a model Megatron-Core builds).
        moe_router_type=router_type,
    )
    return MergeJob(sources=sources, plan=plan, units=units, weights=weights, model=model,
                    recommended_topk=recommended, num_layers=mcfg.num_layers,
                    init_method_std=float(sources[0].manifest["model"].get("init_method_std", 0.02)))


__all__ = ["MergeJob", "MergeOptions", "TOOL", "prepare"]
