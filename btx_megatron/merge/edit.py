"""Grow and prune a trained BTX model: add a domain expert, remove one, list the experts.

    python tools/edit_experts.py add --load BTX --branch NAME=DIR --output OUT [--router-init centroid ...]
    python tools/edit_experts.py remove --load BTX --expert NAME --output OUT
    python tools/edit_experts.py list --load CKPT

BTX's modularity (Branch-Train-MiX; Nexus and FlexOlmo for the later work): a domain branch is
an ordinary dense run from the seed, so a new one can arrive after the MoE exists, and a domain
whose data is withdrawn can leave.

``add``     expert E (the last, 0-based) is the dense branch's FFN, bit for bit (split-expert
            models get the branch cut into C experts exactly as the merge cuts it). Every
            other weight is the BTX model's, or with ``blend_shared`` W the blend
            ``(1 - W) * BTX + W * branch`` (float64, rounded once). The new router row is the BTX
            model's own mean hidden state entering the MoE layer on the new domain's data
            (``centroid``; with ``contrast_data`` minus the mean of other domains' centroids, so
            that it separates the new domain from the old ones), scaled to the mean norm of the
            layer's existing rows so its logits start at the scale the trained rows have; or
            ``N(0, init_method_std)`` (``random``).
``remove``  drops one expert (or every split chunk of one source) and its router rows; the rest
            is copied bit for bit. ``add`` followed by ``remove`` of the same name gives back the
            original tensors exactly.
``list``    the experts, the checkpoint each came from (iteration, content hash) and the edit
            history.

Both edits read torch_dist checkpoints at any saved layout (the chunks of a TP/EP-sharded
training save, optimizer state ignored) and write whole per-layer / per-expert chunks with the
global shapes Megatron-Core's MoE ``GPTModel`` saves, so the result loads at any TP/PP/EP. Work
and memory are split over the processes of a torchrun/srun launch like the merge's
(:mod:`.writer`): each process writes its own ``.distcp`` file; unchanged slices are copied file
to file where their bytes are contiguous. Output goes to a staging directory published only when
every process has finished; a bad input is refused before anything is written. The result is a
model-only checkpoint at iteration 0 (the mix phase starts it with a fresh optimizer), and its
manifest appends the edit to ``btx.edits``: operation, names, sources with content hashes, time
and git revision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .. import checkpoint as fmt
from ..checkpoint.provenance import git_revision
from ..checkpoint.storage import COMMON_STATE_KEY, CheckpointReader, DistcpWriter, common_state_bytes, write_metadata
from ..runtime.distributed import all_gather_objects, broadcast_object, rank_world
from ..runtime.progress import Progress
from . import plan as core
from .router_init import ROUTER_INITS, centroid_router, compute_centroids, random_router
from .sources import Source, inspect_source, model_config
from .units import DENSE_FC, LAYER_PREFIX, PART_BYTES, ROUTER_KEY, assign_units, out_key

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
    # Architecture: the branch must be a dense model of the BTX model's seed shape.
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
    if opts.centroids is not None and tuple(opts.centroids.shape) != (base_cfg.num_layers, base_cfg.hidden_size):
        raise ValueError(f"centroids have shape {list(opts.centroids.shape)}, expected [layers, hidden] = "
                         f"{[base_cfg.num_layers, base_cfg.hidden_size]}.")
    num_experts = len(names) + len(new_names)
    topk = opts.topk or _current_topk(base, btx)
    _check_counts(opts, num_experts, topk, f"after adding {name}", opts.topk is not None)

    kept = list(range(len(names)))
    pieces: list[Piece] = []
    for key, (shape, dtype) in sorted(base.tensors.items()):
        if key in EXPERT_KINDS:
            dense = DENSE_OF_EXPERT[key]
            pieces += _expert_pieces(key, shape, dtype, kept, len(new_names), dense, branch.tensors[dense][0][1:])
        elif key == ROUTER_KEY:
            pieces += _router_pieces(shape, dtype, num_experts)
        else:
            pieces += _shared_pieces(key, shape, dtype, base_cfg.num_layers, "blend" if opts.blend_shared else "copy")
    for p in pieces:
        if p.op == "blend":
            p.src_key = dense_keys[p.out_key]  # read the branch's key; the BTX model's is out_key
    model = dict(base.manifest["model"], num_experts=num_experts, moe_router_topk=min(topk, num_experts))
    record = _edit_record("add", opts, base, new_names, source=_source_record(branch), router_init=opts.router_init,
                          router_seed=opts.router_seed, blend_shared=opts.blend_shared,
                          num_experts=[len(names), num_experts])
    sources = list(btx.get("sources", [])) + [dict(_source_record(branch), added_by_edit=True)]
    out_btx = _output_btx(btx, names + new_names, topk, sources, record)
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


# --------------------------------------------------------------------------------------------
# Running an edit (every process)
# --------------------------------------------------------------------------------------------


def _needs_group(opts: EditOptions) -> bool:
    from ..runtime.distributed import read_launch_env

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    centroids = isinstance(opts, AddOptions) and opts.router_init == "centroid" and opts.centroids is None
    return centroids or read_launch_env().world_size > 1


def add_expert(opts: AddOptions) -> Path:
    """Add the branch's FFN as a new expert (every process of the launch calls this)."""
    return _run(opts, prepare_add)


def remove_expert(opts: RemoveOptions) -> Path:
    """Remove experts and their router rows (every process of the launch calls this)."""
    return _run(opts, prepare_remove)


def _run(opts: EditOptions, prepare) -> Path:
    group = contextlib.nullcontext()
    if _needs_group(opts):
        from ..runtime.distributed import tool_process_group

        group = tool_process_group()
    with group:
        rank, world = rank_world()
        result = None
        if rank == 0:
            try:
                result = ("ok", prepare(opts))
            except ValueError as exc:
                result = ("error", str(exc))
        result = broadcast_object(result, world)
        if result[0] == "error":
            raise ValueError(result[1])
        job: EditJob = result[1]
        centroids = None
        if job.op == "add" and opts.router_init == "centroid":
            centroids = opts.centroids
            if centroids is None:
                centroids, info = _btx_centroid(job, opts)
                job.btx["edits"][-1]["centroid"] = info
        return _write(job, opts, centroids, rank, world)


def _btx_centroid(job: EditJob, opts: AddOptions):
    """The new row's direction [L, H]: the BTX model's own mean hidden state entering each MoE
    layer on the new domain's data, minus the mean over the contrast domains' centroids if given.
    (Every source of compute_centroids is the --load model, named like a domain so that it finds
    that domain's data.)"""
    contrast = dict(opts.contrast_data or {})
    names = [job.branch.name, *contrast]
    sources = [dataclasses.replace(job.base, name=n, flag="--load") for n in names]
    merged = dataclasses.replace(opts, centroid_data={**opts.centroid_data, **contrast})
    stacked, info = compute_centroids(sources, merged, model_config)
    info["hidden_state"] = "pre-MLP-norm output of the --load model (the router's input)"
    if not contrast:
        return stacked[0], info
    info["contrast"] = sorted(contrast)
    return stacked[0] - stacked[1:].mean(0), info


def _write(job: EditJob, opts: EditOptions, centroids, rank: int, world: int) -> Path:
    output = Path(opts.output)
    made = None
    if rank == 0:
        try:
            made = ("ok", str(fmt.staging_dir_for(output)))
        except OSError as exc:
            made = ("error", f"cannot create a staging directory next to --output {output}: {exc}")
    made = broadcast_object(made, world)
    if made[0] == "error":
        raise ValueError(made[1])
    staging = Path(made[1])
    iter_dir = fmt.iteration_dir(staging, 0)
    costs = [p.nbytes * (2 if p.op == "blend" else 1) for p in job.pieces]
    owner = assign_units(job.pieces, world, costs)
    mine = [p for p, r in zip(job.pieces, owner) if r == rank]
    published = False
    try:
        if rank == 0:
            iter_dir.mkdir()
        broadcast_object(None, world)
        chunks, error = [], None
        try:
            chunks = _write_pieces(mine, job, opts, centroids, iter_dir, rank)
        except (OSError, ValueError) as exc:
            error = ("user", f"rank {rank}: {exc}" if world > 1 else str(exc))
        except Exception as exc:  # a bug: every process must still reach the exchange below
            if world == 1:
                raise
            error = ("bug", f"rank {rank}: {type(exc).__name__}: {exc}")
        outcomes = all_gather_objects((chunks, error), world)
        errors = [e for _, e in outcomes if e]
        status = ("ok", "")
        if errors:
            status = ("bug" if any(k == "bug" for k, _ in errors) else "user", "; ".join(m for _, m in errors))
        elif rank == 0:
            try:
                write_metadata(iter_dir, [c for cs, _ in outcomes for c in cs])
                job.btx["edits"][-1]["world_size"] = world
                fmt.Manifest(model=job.model, tool=f"btx_megatron {__version__} {TOOL}", precision=job.precision,
                             extra={"btx": job.btx, "stage": "edit"}).write(iter_dir)
                fmt.mark_output(staging, TOOL, op=job.op)
                fmt.write_text_atomic(staging / fmt.TRACKER, "0\n")
                fmt.publish_directory(staging, output, opts.overwrite)
                published = True
            except (OSError, ValueError) as exc:
                status = ("user", f"could not publish {output}: {exc}")
        kind, message = broadcast_object(status, world)
        if kind != "ok":
            raise (RuntimeError if kind == "bug" else ValueError)(message)
        if opts.progress and rank == 0:
            print(f"[edit] {job.op}: {len(job.expert_names)} experts ({', '.join(job.expert_names)}) -> {output}",
                  file=sys.stderr, flush=True)
        return output
    finally:
        if rank == 0 and not published:
            shutil.rmtree(staging, ignore_errors=True)


def _write_pieces(mine: list[Piece], job: EditJob, opts: EditOptions, centroids, iter_dir: Path, rank: int):
    from ..checkpoint.verify import dcp_metadata

    base = CheckpointReader(job.base.ckpt_dir, dcp_metadata(job.base.ckpt_dir), job.base.label)
    branch = (CheckpointReader(job.branch.ckpt_dir, dcp_metadata(job.branch.ckpt_dir), job.branch.label)
              if job.branch is not None else None)
    writer = DistcpWriter(iter_dir, rank, max_pending_bytes=64 << 20)
    progress = Progress("edit", sum(p.nbytes for p in mine), enabled=opts.progress and rank == 0)
    try:
        if rank == 0:
            writer.add_bytes(COMMON_STATE_KEY, common_state_bytes({"iteration": 0, "consumed_samples": 0}))
        for p in mine:
            dtype = getattr(torch, p.dtype)
            if p.op == "copy":
                ranges = base.file_ranges(p.src_key, p.src_offsets, p.src_shape)
                if ranges is not None:
                    writer.add_file_ranges(p.out_key, p.offsets, p.shape, dtype, ranges, p.global_shape)
                else:
                    out = torch.empty(p.shape, dtype=dtype)
                    base.read(p.src_key, p.src_offsets, out)
                    writer.add_tensor(p.out_key, p.offsets, out, p.global_shape)
            else:
                writer.add_tensor(p.out_key, p.offsets, _compute(p, job, opts, centroids, base, branch), p.global_shape)
            progress.update(p.nbytes)
        chunks = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        base.close()
        if branch is not None:
            branch.close()
    progress.finish()
    return chunks


def _read(reader: CheckpointReader, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.empty(shape, dtype=reader.tensors[key][1])
    reader.read(key, offsets, out)
    return out


def _compute(p: Piece, job: EditJob, opts: EditOptions, centroids, base: CheckpointReader,
             branch: CheckpointReader | None) -> torch.Tensor:
    dtype = getattr(torch, p.dtype)
    if p.op == "blend":
        w = opts.blend_shared
        mine = _read(base, p.out_key, p.offsets, p.shape)
        theirs = _read(branch, p.src_key, p.src_offsets, p.src_shape)
        return core.average_into(torch.empty(p.shape, dtype=dtype), [mine, theirs], [1.0 - w, w])
    if p.op == "new_experts":
        dense = _read(branch, p.src_key, p.src_offsets, p.src_shape)[0].to(dtype)
        out = torch.empty(p.shape, dtype=dtype)
        core.fill_experts(job.new_plan, EXPERT_KINDS[p.out_key], 0, dense, out[0], layer=p.layer)
        return out
    if p.op == "router":
        rows = _read(base, p.src_key, p.src_offsets, p.src_shape)[0]  # [E, H]
        kept = rows[job.kept]
        if not job.num_new:
            return kept.unsqueeze(0)
        return torch.cat([kept, _new_router_rows(job, opts, centroids, rows, p.layer).to(dtype)]).unsqueeze(0)
    raise AssertionError(p.op)


def _new_router_rows(job: EditJob, opts: AddOptions, centroids, rows: torch.Tensor, layer: int) -> torch.Tensor:
    """[C, H] rows of the new expert(s) at ``layer``."""
    hidden = rows.shape[1]
    if opts.router_init == "random":
        # Seeded by the position of the new expert too, so that it is not the merge's first row.
        seed = core.mix_seed(opts.router_seed, len(job.kept), 0xADD)
        return random_router(job.num_new, hidden, job.init_method_std, seed, layer, rows.dtype)
    # Scaled like the layer's existing rows: their mean norm (trained rows grow or shrink from the
    # init scale that centroid_router aims at on its own).
    target = float(rows.double().norm(dim=-1).mean())
    c = centroids[layer].reshape(1, hidden).expand(job.num_new, hidden)
    return centroid_router(c, target / math.sqrt(hidden), rows.dtype)


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------


def describe(path: str, full_hash: bool = False) -> dict:
    """The experts of a checkpoint, where each came from, and the edit history."""
    ckpt_dir, iteration = fmt.resolve(path, "--load")
    manifest = fmt.read_manifest(ckpt_dir)
    model = manifest.get("model", {})
    btx = manifest.get("btx") or {}
    num = model.get("num_experts") or 0
    names = list(btx.get("expert_names") or [f"expert_{i}" for i in range(num)])
    sources = {s.get("name"): s for s in btx.get("sources", [])}
    experts = []
    for i, name in enumerate(names):
        src = sources.get(source_of(name)) or sources.get(name) or {}
        experts.append({"index": i, "name": name, "source": src.get("name"), "path": src.get("checkpoint_dir")
                        or src.get("path"), "iteration": src.get("iteration"),
                        "content_hash": src.get("content_hash"), "added_by_edit": bool(src.get("added_by_edit"))})
    from ..checkpoint.verify import fingerprint

    return {"checkpoint": str(ckpt_dir), "iteration": iteration, "kind": manifest.get("kind"),
            "stage": manifest.get("stage"), "content_hash": fingerprint(ckpt_dir, full_hash),
            "num_experts": num, "router_topk": btx.get("recommended_topk") or model.get("moe_router_topk"),
            "method": btx.get("method"), "experts": experts, "edits": list(btx.get("edits", [])),
            "mix": list(btx.get("mix_history", [])) + ([btx["mix"]] if btx.get("mix") else []),
            "expert_training": btx.get("expert_training", [])}


def _short(h: str | None) -> str:
    if not h:
        return "-"
    kind, _, digest = h.partition(":")
    return f"{kind.replace('sha256-', '')}:{digest[:12]}"


def format_description(info: dict) -> str:
    lines = [f"{info['checkpoint']}  (iteration {info['iteration']}, {info['kind']}"
             + (f", stage {info['stage']}" if info.get("stage") else "") + f", {_short(info['content_hash'])})"]
    if info["kind"] != "moe":
        return "\n".join(lines + ["dense checkpoint: no experts"])
    lines.append(f"{info['num_experts']} experts, top-{info['router_topk']}, method {info['method'] or '-'}")
    lines.append("")
    lines.append(f"{'#':>2}  {'expert':<14} {'iteration':>9}  {'content hash':<22} source")
    for e in info["experts"]:
        it = "-" if e["iteration"] is None else str(e["iteration"])
        lines.append(f"{e['index']:>2}  {e['name']:<14} {it:>9}  {_short(e['content_hash']):<22} {e['path'] or '-'}"
                     + ("  (added)" if e["added_by_edit"] else ""))
    lines += ["", "mix phases:"] + ([f"  - from {m.get('started_from')} (router {m.get('router_type')} "
                                     f"top-{m.get('router_topk')})" for m in info["mix"]] or ["  none"])
    lines += ["expert training against frozen shared weights:"] + (
        [f"  - {', '.join(t.get('experts', []))}" + (" with their router rows" if t.get("router_rows") else "")
         + f", from {t.get('started_from')}" for t in info["expert_training"]] or ["  none"])
    lines.append("edits, oldest first:")
    for i, ed in enumerate(info["edits"]):
        what = f"{ed['op']} {', '.join(ed.get('names', []))}"
        if ed["op"] == "add":
            src = ed.get("source", {})
            what += (f" from {src.get('checkpoint_dir')} (iteration {src.get('iteration')}, "
                     f"{_short(src.get('content_hash'))}), router {ed.get('router_init')}"
                     + (f", shared weights blended at {ed['blend_shared']}" if ed.get("blend_shared") else ""))
        base = ed.get("base", {})
        lines.append(f"  {i + 1}. {what}; base {base.get('checkpoint_dir')} ({_short(base.get('content_hash'))}); "
                     f"{ed.get('time')}, git {str(ed.get('git_revision'))[:12]}")
    if not info["edits"]:
        lines.append("  none")
    return "\n".join(lines)


__all__ = ["AddOptions", "EditJob", "EditOptions", "Piece", "RemoveOptions", "TOOL", "add_expert", "describe",
           "format_description", "prepare_add", "prepare_remove", "remove_expert", "resolve_removed", "source_of"]
