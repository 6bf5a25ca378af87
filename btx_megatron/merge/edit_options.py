"""What an expert edit is asked to do (:class:`AddOptions`, :class:`RemoveOptions`) and the checked
job it becomes (:func:`prepare_add` / :func:`prepare_remove` -> :class:`EditJob`): the BTX model
and the new branch inspected, expert and top-k counts checked, the output chunks
(:class:`Piece`) laid out, and the provenance the result's manifest records. Cheap (metadata and
fingerprints only), run by one process; every user mistake is a ValueError naming the flag and
the fix.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any

import torch

from .. import __version__
from .. import checkpoint as fmt
from ..checkpoint.provenance import git_revision
from . import plan as core
from .router_init import ROUTER_INITS
from .sources import Source, inspect_source, model_config
from .units import DENSE_FC, LAYER_PREFIX, PART_BYTES, ROUTER_KEY, out_key


TOOL = "tools/edit_experts.py"
EXPERT_KINDS = {moe: kind for moe, kind in DENSE_FC.values()}  # MoE expert key -> plan kind
DENSE_OF_EXPERT = {moe: dense for dense, (moe, _) in DENSE_FC.items()}  # MoE expert key -> dense key
MOE_MLP_PREFIX = "decoder.layers.mlp."


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EditOptions:
    """Options shared by ``add`` and ``remove``."""

    load: str
    """The BTX MoE checkpoint (ROOT or iteration directory, any saved layout)."""
    output: str
    """New checkpoint ROOT (iteration 0, model weights only)."""
    topk: int | None = None
    """Top-k recommended to the result's mix phase (default: the loaded model's)."""
    expert_model_parallel_size: int | None = None
    """Check that the result's expert count divides over this EP size."""
    overwrite: bool = False
    full_hash: bool = False
    progress: bool = True
    workers: int = 1
    """Processes forked by one plain process after its imports, each writing 1/N of the result
    (as N torchrun processes would, without their start-up); 1: edit in this process."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}.")


@dataclasses.dataclass
class AddOptions(EditOptions):
    branch: tuple[str, str] = ("", "")
    """(NAME, DIR): the dense branch whose FFN becomes the new expert."""
    router_init: str = "random"
    router_seed: int = 1234
    centroids: Any = None
    """Precomputed [L, H] mean hidden states of the BTX model on the new domain (else computed)."""
    centroid_data: dict[str, list[str]] | None = None
    """NAME -> data prefixes of the new domain for ``router_init="centroid"``."""
    contrast_data: dict[str, list[str]] | None = None
    """Other domains' data (name -> prefixes): the row points from the mean of their centroids to
    the new domain's instead of at the new domain's alone (negative examples, as in mergekit's
    hidden-state gates), so it tells the new domain apart from the model's old ones."""
    centroid_samples: int = 16
    centroid_seq_length: int | None = None
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    blend_shared: float = 0.0
    """W: shared weights = (1 - W) * BTX + W * branch (0: the BTX model's, unchanged)."""


@dataclasses.dataclass
class RemoveOptions(EditOptions):
    experts: list[str] = dataclasses.field(default_factory=list)
    """Expert names (or indices) to drop; a source name drops all its split chunks."""


# --------------------------------------------------------------------------------------------
# The checked edit
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Piece:
    """One output chunk: ``shape`` at ``offsets`` of ``out_key`` (global dims, layer axis first)."""

    out_key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: str
    op: str  # copy | blend | new_experts | router
    src_key: str  # the BTX model's key (new_experts: the branch's dense key)
    src_offsets: tuple[int, ...]
    src_shape: tuple[int, ...]
    layer: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclasses.dataclass
class EditJob:
    """What every process needs (picklable; rank 0 builds it)."""

    op: str  # add | remove
    base: Source
    branch: Source | None
    pieces: list[Piece]
    kept: list[int]  # the BTX model's experts kept, in output order
    num_new: int  # experts appended (add: C, the split factor; remove: 0)
    new_plan: core.ExpertPlan | None  # how the branch's FFN becomes the new experts
    expert_names: list[str]
    model: dict
    btx: dict  # the output manifest's ``btx`` section
    precision: str
    init_method_std: float


def _inspect_base(opts: EditOptions) -> tuple[Source, dict, list[str]]:
    """The BTX MoE checkpoint: source, its ``btx`` section and its expert names."""
    base = inspect_source("btx", opts.load, "--load", opts.full_hash, allow_moe=True)
    model = base.manifest["model"]
    num_experts = model.get("num_experts")
    if not num_experts or base.manifest.get("kind") != "moe":
        raise ValueError(f"--load {opts.load} is a dense checkpoint; edit_experts works on a BTX MoE. Merge dense "
                         "branches into one with tools/merge_branches.py first.")
    missing = [k for k in EXPERT_KINDS if k.endswith(".weight") and k not in base.tensors] + \
        ([ROUTER_KEY] if ROUTER_KEY not in base.tensors else [])
    if missing:
        raise ValueError(f"--load {opts.load} has no {missing[0]}; it is not a Megatron-Core MoE checkpoint.")
    for key, (shape, _) in base.tensors.items():
        if key in EXPERT_KINDS or key == ROUTER_KEY:
            if len(shape) < 2 or shape[1] != num_experts:
                raise ValueError(f"--load {opts.load}: {key} has shape {list(shape)}, but the manifest says "
                                 f"{num_experts} experts; the checkpoint is inconsistent.")
        elif key.startswith(MOE_MLP_PREFIX):
            raise ValueError(f"--load {opts.load}: unexpected MoE tensor {key} (only routed experts and the router "
                             "can be edited; shared experts and expert biases are not supported).")
    btx = dict(base.manifest.get("btx") or {})
    names = list(btx.get("expert_names") or [f"expert_{i}" for i in range(num_experts)])
    if len(names) != num_experts:
        raise ValueError(f"--load {opts.load}: the manifest names {len(names)} experts but the model has "
                         f"{num_experts}; the checkpoint is inconsistent.")
    return base, btx, names


def _current_topk(base: Source, btx: dict) -> int:
    return int(btx.get("recommended_topk") or base.manifest["model"].get("moe_router_topk") or 2)


def _check_counts(opts: EditOptions, num_experts: int, topk: int, what: str, topk_given: bool) -> None:
    if topk < 1:
        raise ValueError(f"--moe-router-topk {topk} must be >= 1.")
    if topk > num_experts:
        if topk_given:
            raise ValueError(f"--moe-router-topk {topk} is larger than the {num_experts} experts {what}.")
        raise ValueError(f"{what} the model has {num_experts} expert(s), fewer than its top-k {topk} (the manifest's "
                         f"recommended_topk / moe_router_topk); pass --moe-router-topk K with K <= {num_experts} "
                         "for the result.")
    ep = opts.expert_model_parallel_size
    if ep is not None:
        if ep < 1:
            raise ValueError(f"--expert-model-parallel-size {ep} must be >= 1.")
        if num_experts % ep:
            raise ValueError(f"{what} the model has {num_experts} experts, which do not divide over "
                             f"--expert-model-parallel-size {ep}; choose an EP size that divides {num_experts}.")


def _row_parts(per: tuple[int, ...], itemsize: int) -> list[tuple[int, int]]:
    """(first row, rows) blocks of at most PART_BYTES of a per-layer (or whole) tensor."""
    if len(per) < 2:
        return [(0, per[0] if per else 1)]
    rows = max(1, PART_BYTES // (math.prod(per[1:]) * itemsize))
    return [(r, min(rows, per[0] - r)) for r in range(0, per[0], rows)]


def _shared_pieces(key: str, shape: tuple[int, ...], dtype: str, num_layers: int, op: str) -> list[Piece]:
    layered = key.startswith(LAYER_PREFIX)
    per = shape[1:] if layered else shape
    pieces = []
    for layer in range(num_layers) if layered else [None]:
        for r, rows in _row_parts(per, getattr(torch, dtype).itemsize):
            tail = (0,) * max(len(per) - 1, 0)
            off = ((layer,) if layered else ()) + ((r, *tail) if per else ())
            box = ((1,) if layered else ()) + ((rows, *per[1:]) if per else ())
            pieces.append(Piece(key, off, box, shape, dtype, op, key, off, box, layer))
    return pieces


def _expert_pieces(key: str, shape: tuple[int, ...], dtype: str, kept: list[int], num_new: int,
                   new_dense_key: str | None, dense_per: tuple[int, ...] | None) -> list[Piece]:
    num_layers, per = shape[0], shape[2:]
    out_shape = (num_layers, len(kept) + num_new, *per)
    zeros = (0,) * len(per)
    pieces = []
    for layer in range(num_layers):
        for j, e in enumerate(kept):
            pieces.append(Piece(key, (layer, j, *zeros), (1, 1, *per), out_shape, dtype, "copy", key,
                                (layer, e, *zeros), (1, 1, *per), layer))
        if num_new:
            pieces.append(Piece(key, (layer, len(kept), *zeros), (1, num_new, *per), out_shape, dtype, "new_experts",
                                new_dense_key, (layer, *(0,) * len(dense_per)), (1, *dense_per), layer))
    return pieces


def _router_pieces(shape: tuple[int, ...], dtype: str, num_out: int) -> list[Piece]:
    num_layers, num_experts, hidden = shape
    return [Piece(ROUTER_KEY, (layer, 0, 0), (1, num_out, hidden), (num_layers, num_out, hidden), dtype, "router",
                  ROUTER_KEY, (layer, 0, 0), (1, num_experts, hidden), layer) for layer in range(num_layers)]


def _precision(base: Source) -> str:
    return str(base.manifest.get("precision") or "fp32")


def _source_record(s: Source) -> dict:
    return {"name": s.name, "flag": s.flag, "path": str(s.path), "checkpoint_dir": s.ckpt_dir,
            "iteration": s.iteration, "content_hash": s.content_hash,
            "consumed_samples": s.manifest.get("consumed_samples"), "stage": s.manifest.get("stage")}


def _edit_record(op: str, opts: EditOptions, base: Source, names: list[str], **extra) -> dict:
    return {"op": op, "names": names, "base": _source_record(base),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_revision": git_revision(), "tool": TOOL, "tool_version": __version__, **extra}


def _output_btx(btx: dict, names: list[str], topk: int, sources: list[dict], record: dict) -> dict:
    """The result's ``btx`` section: the loaded model's, with the new experts, sources and edit.

    The loaded model's mix phase (``mix``) moves to ``mix_history``, so the mix phase that
    continues the edited model records its own start (pretrain_mix writes ``mix`` only once)."""
    out = {k: v for k, v in btx.items() if k != "mix"}
    out.update(expert_names=names, recommended_topk=topk, sources=sources,
               mix_history=list(btx.get("mix_history", [])) + ([btx["mix"]] if btx.get("mix") else []),
               edits=list(btx.get("edits", [])) + [record])
    return out


def _output_sources(opts: EditOptions, base: Source, branch: Source | None = None) -> list[str]:
    paths = [opts.load, base.ckpt_dir]
    if branch is not None:
        paths += [branch.path, branch.ckpt_dir]
    return paths


def _split_factor(btx: dict, opts: EditOptions) -> tuple[int, str]:
    method = btx.get("method") or "btx"
    if method == "blend":
        raise ValueError(f"--load {opts.load} has blended experts (each mixes every domain's FFN); a domain "
                         "expert cannot be added to or removed from it.")
    if method == "split":
        return int(btx.get("split_experts") or 1), str(btx.get("split_scale") or "exact")
    return 1, "exact"


def _check_branch_architecture(opts: AddOptions, base: Source, base_cfg, branch: Source,
                               plan: core.ExpertPlan) -> dict[str, str]:
    """The branch must be a dense model of the BTX model's seed shape; returns the branch's
    non-FFN keys by the MoE key each becomes."""
    name, path = opts.branch
    arch, want = model_config(branch).architecture(), base_cfg.architecture()
    for key, value in want.items():
        if arch.get(key) != value:
            raise ValueError(f"architecture mismatch: --branch {name}={path} has {key}={arch.get(key)!r} but --load "
                             f"{opts.load} has {key}={value!r}; the new branch must share the BTX model's seed "
                             "architecture.")
    dense_keys = {out_key(k): k for k in branch.tensors if k not in DENSE_FC}
    for key, (shape, _) in base.tensors.items():
        if key in EXPERT_KINDS:
            dense = DENSE_OF_EXPERT[key]
            if dense not in branch.tensors:
                raise ValueError(f"architecture mismatch: --branch {name}={path} has no {dense} for the experts' {key}.")
            dense_per = branch.tensors[dense][0][1:]
            if core.expert_shape(plan, EXPERT_KINDS[key], dense_per)[1:] != shape[2:]:
                raise ValueError(f"architecture mismatch: --branch {name}={path}'s {dense} has per-layer shape "
                                 f"{list(dense_per)}, which does not give the experts' {list(shape[2:])} of --load "
                                 f"{opts.load}.")
        elif key != ROUTER_KEY:
            dense = dense_keys.get(key)
            if dense is None or branch.tensors[dense][0] != shape:
                got = list(branch.tensors[dense][0]) if dense else "nothing"
                raise ValueError(f"architecture mismatch: --load {opts.load} has {key} {list(shape)}, --branch "
                                 f"{name}={path} has {got}.")
    return dense_keys


def _check_centroid_options(opts: AddOptions, num_layers: int, hidden_size: int) -> None:
    name = opts.branch[0]
    if opts.router_init == "centroid" and opts.centroids is None:
        data = opts.centroid_data or {}
        if set(data) != {name}:
            raise ValueError(f"--router-init centroid needs --centroid-data {name}=PREFIX (the new domain's data), "
                             f"got {sorted(data) or 'none'}.")
        if not opts.tokenizer_type:
            raise ValueError("--centroid-data needs --tokenizer-type (and --tokenizer-model): the BTX model's tokenizer.")
        if opts.contrast_data is not None and (not opts.contrast_data or name in opts.contrast_data):
            raise ValueError(f"--centroid-contrast takes other domains' data (NAME=PREFIX, not {name}), got "
                             f"{sorted(opts.contrast_data)}.")
    elif opts.contrast_data:
        raise ValueError("--centroid-contrast needs --router-init centroid with --centroid-data.")
    if opts.centroids is not None and tuple(opts.centroids.shape) != (num_layers, hidden_size):
        raise ValueError(f"centroids have shape {list(opts.centroids.shape)}, expected [layers, hidden] = "
                         f"{[num_layers, hidden_size]}.")


def _add_pieces(opts: AddOptions, base: Source, branch: Source, dense_keys: dict[str, str], kept: list[int],
                num_new: int, num_layers: int) -> list[Piece]:
    """The output chunks of an ``add``: kept experts copied, the branch's FFN as the new ones, the
    router grown by ``num_new`` rows, shared weights copied or blended with the branch's."""
    pieces: list[Piece] = []
    for key, (shape, dtype) in sorted(base.tensors.items()):
        if key in EXPERT_KINDS:
            dense = DENSE_OF_EXPERT[key]
            pieces += _expert_pieces(key, shape, dtype, kept, num_new, dense, branch.tensors[dense][0][1:])
        elif key == ROUTER_KEY:
            pieces += _router_pieces(shape, dtype, len(kept) + num_new)
        else:
            pieces += _shared_pieces(key, shape, dtype, num_layers, "blend" if opts.blend_shared else "copy")
    for p in pieces:
        if p.op == "blend":
            p.src_key = dense_keys[p.out_key]  # read the branch's key; the BTX model's is out_key
    return pieces


def prepare_add(opts: AddOptions) -> EditJob:
    """Validate an ``add`` and build the job (one process; metadata and fingerprints only)."""
    name, path = opts.branch
    if not name or not path:
        raise ValueError("add needs --branch NAME=DIR (the dense branch of the new domain).")
    base, btx, names = _inspect_base(opts)
    split, split_scale = _split_factor(btx, opts)
    base_cfg = model_config(base)
    plan = core.ExpertPlan(method="split" if split > 1 else "btx", num_sources=1, split=split,
                           split_scale=split_scale, gated=base_cfg.swiglu,
                           pre_softmax=base_cfg.moe_router_type == "switch", topk=base_cfg.moe_router_topk)
    new_names = plan.expert_names([name])
    taken = sorted(set(new_names + [name]) & (set(names) | {s.get("name") for s in btx.get("sources", [])}))
    if taken:
        raise ValueError(f"--branch {name}={path}: the model already has an expert or source named {taken[0]} "
                         f"(experts: {', '.join(names)}); choose another name, or remove that expert first.")
    if not 0.0 <= opts.blend_shared <= 1.0 or not math.isfinite(opts.blend_shared):
        raise ValueError(f"--blend-shared {opts.blend_shared} must be between 0 (keep the BTX model's shared weights) "
                         "and 1 (take the branch's).")
    if opts.router_init not in ROUTER_INITS:
        raise ValueError(f"--router-init {opts.router_init!r}: choose one of {ROUTER_INITS}.")
    try:
        branch = inspect_source(name, path, "--branch", opts.full_hash)
    except ValueError as exc:
        raise ValueError(f"{exc} (add takes the new domain's dense branch, trained from the same seed.)") from None
    fmt.check_output(opts.output, _output_sources(opts, base, branch), tool=TOOL, overwrite=opts.overwrite)
    dense_keys = _check_branch_architecture(opts, base, base_cfg, branch, plan)
    _check_centroid_options(opts, base_cfg.num_layers, base_cfg.hidden_size)
    num_experts = len(names) + len(new_names)
    topk = opts.topk or _current_topk(base, btx)
    _check_counts(opts, num_experts, topk, f"after adding {name}", opts.topk is not None)

    kept = list(range(len(names)))
    pieces = _add_pieces(opts, base, branch, dense_keys, kept, len(new_names), base_cfg.num_layers)
    model = dict(base.manifest["model"], num_experts=num_experts, moe_router_topk=min(topk, num_experts))
    record = _edit_record("add", opts, base, new_names, source=_source_record(branch), router_init=opts.router_init,
                          router_seed=opts.router_seed, blend_shared=opts.blend_shared,
                          num_experts=[len(names), num_experts])
    sources = list(btx.get("sources", [])) + [dict(_source_record(branch), added_by_edit=True)]
    out_btx = _output_btx(btx, names + new_names, topk, sources, record)
    return EditJob("add", base, branch, pieces, kept, len(new_names), plan, names + new_names, model, out_btx,
                   _precision(base), float(base.manifest["model"].get("init_method_std", 0.02)))
    return EditJob("add", base, branch, pieces, kept, len(new_names), plan, names + new_names, model, out_btx,
                   _precision(base), float(base.manifest["model"].get("init_method_std", 0.02)))


def resolve_removed(requested: list[str], names: list[str], load: str) -> list[int]:
    """``--expert`` names (exact, a source whose split chunks are NAME.c, or indices) -> indices."""
    if not requested:
        raise ValueError("remove needs --expert NAME (one of the model's experts).")
    out: set[int] = set()
    for name in requested:
        exact = [i for i, n in enumerate(names) if n == name]
        group = [i for i, n in enumerate(names) if n.rsplit(".", 1)[0] == name and n.rsplit(".", 1)[-1].isdigit()]
        if exact or group:
            out.update(exact or group)
        elif name.isdigit() and int(name) < len(names):
            out.add(int(name))
        else:
            raise ValueError(f"--expert {name}: --load {load} has no such expert; its experts are {', '.join(names)} "
                             f"(or indices 0..{len(names) - 1}).")
    return sorted(out)


def prepare_remove(opts: RemoveOptions) -> EditJob:
    """Validate a ``remove`` and build the job."""
    base, btx, names = _inspect_base(opts)
    _split_factor(btx, opts)
    removed = resolve_removed(opts.experts, names, opts.load)
    kept = [i for i in range(len(names)) if i not in removed]
    gone = [names[i] for i in removed]
    if not kept:
        raise ValueError(f"--expert {' '.join(opts.experts)} would remove the last expert(s) of --load {opts.load} "
                         f"({', '.join(names)}); an MoE needs at least one expert.")
    topk = opts.topk or _current_topk(base, btx)
    _check_counts(opts, len(kept), topk, f"after removing {', '.join(gone)}", opts.topk is not None)
    fmt.check_output(opts.output, _output_sources(opts, base), tool=TOOL, overwrite=opts.overwrite)
    base_cfg = model_config(base)
    pieces: list[Piece] = []
    for key, (shape, dtype) in sorted(base.tensors.items()):
        if key in EXPERT_KINDS:
            pieces += _expert_pieces(key, shape, dtype, kept, 0, None, None)
        elif key == ROUTER_KEY:
            pieces += _router_pieces(shape, dtype, len(kept))
        else:
            pieces += _shared_pieces(key, shape, dtype, base_cfg.num_layers, "copy")
    out_names = [names[i] for i in kept]
    model = dict(base.manifest["model"], num_experts=len(kept), moe_router_topk=min(topk, len(kept)))
    remaining = {source_of(n) for n in out_names}
    removed_sources = [s for s in btx.get("sources", []) if s.get("name") not in remaining]
    record = _edit_record("remove", opts, base, gone, removed_sources=removed_sources,
                          num_experts=[len(names), len(kept)])
    out_btx = _output_btx(btx, out_names, topk,
                          [s for s in btx.get("sources", []) if s.get("name") in remaining], record)
    return EditJob("remove", base, None, pieces, kept, 0, None, out_names, model, out_btx, _precision(base),
                   float(base.manifest["model"].get("init_method_std", 0.02)))


def source_of(expert_name: str) -> str:
    """The source an expert came from: ``math`` for ``math`` and for split chunks ``math.0``."""
    head, _, tail = expert_name.rpartition(".")
    return head if head and tail.isdigit() else expert_name

__all__ = ["AddOptions", "DENSE_OF_EXPERT", "EXPERT_KINDS", "EditJob", "EditOptions", "Piece", "RemoveOptions", "TOOL",
           "prepare_add", "prepare_remove", "resolve_removed", "source_of"]
