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

This module runs an edit on every process (:func:`add_expert`, :func:`remove_expert`); the
options and the checked job are :mod:`.edit_options`, the distributed write :mod:`.edit_writer`,
``list`` :mod:`.edit_list`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from ..runtime.distributed import broadcast_object, rank_world
from .edit_options import AddOptions, EditJob, EditOptions, RemoveOptions, prepare_add, prepare_remove
from .edit_writer import write_edit
from .router_init import compute_centroids
from .sources import model_config


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
    if opts.workers > 1:  # forked workers form the group (as in run_merge)
        from ..runtime.distributed import run_forked_group
        from .writer import WORKER_PRELOAD

        one = dataclasses.replace(opts, workers=1)
        return run_forked_group(lambda: _run(one, prepare), opts.workers, preload=WORKER_PRELOAD)
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
        return write_edit(job, opts, centroids, rank, world)


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


__all__ = ["add_expert", "remove_expert"]
