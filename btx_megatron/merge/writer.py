"""Distributed BTX merge: dense branch checkpoints -> one MoE checkpoint ROOT (:func:`run_merge`).

Every process runs :func:`run_merge`. Rank 0 checks the options and sources and builds the job
(:func:`.options.prepare`); the output parts (:mod:`.units`) are dealt to the processes by the
bytes each moves. A process streams its own parts through three stages that overlap:

1. IO threads locate each part's source boxes in the source ``.distcp`` files (:mod:`.storage`):
   a BTX expert is an unchanged byte range of its branch and is only located (its bytes are
   later copied file to file by the kernel); averaged boxes are mapped from the page cache
   without a copy, or read straight into a reused buffer;
2. the calling thread computes the part (float64 averages in cache-sized blocks, expert
   layouts, routers; :mod:`.plan`, :mod:`.router_init`);
3. a writer thread appends it to the process's own ``__<rank>_0.distcp``.

Read-ahead, write-behind and idle buffers share ``MergeOptions.max_inflight_mib``, so a process
holds a few parts at a time, never a whole model: its memory is that bound whatever the model
size, and its work and output file are 1/W of the merge with W processes. Rank 0 then writes the
DCP ``.metadata`` for every chunk: the keys and global shapes Megatron-Core's MoE ``GPTModel``
saves, so the result loads at any TP/PP/EP/expert-TP layout.

No process group is started for one plain process (the merge needs none); under torchrun/srun,
or when centroid routers run the branch models, :func:`~btx_megatron.runtime.distributed.tool_process_group`
provides it. With ``MergeOptions.workers`` = N, one plain process forks N workers after its
imports and they form the group (:func:`~btx_megatron.runtime.distributed.run_forked_group`): the
same merge as N torchrun processes, without their start-up. Megatron-Core is imported only for
centroid routers.

The result is written into ``<output parent>/.staging-<name>-<nonce>/`` and renamed onto the
output only when every process has finished; any failure removes the staging directory.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import __version__
from .. import checkpoint as fmt
from ..checkpoint.dcp_reader import CheckpointReader
from ..checkpoint.dcp_writer import COMMON_STATE_KEY, DistcpWriter, WrittenChunk, common_state_bytes, write_metadata
from ..checkpoint.storage_io import BufferPool
from ..runtime.distributed import broadcast_object, rank_world
from ..runtime.progress import Progress
from . import plan as core
from .options import TOOL, MergeJob, MergeOptions, prepare
from .router_init import compute_centroids, router_weight
from .sources import Source, model_config
from .staged import write_staged
from .units import Unit, assign_units, unit_cost

MIB = float(1 << 20)
# Imported once before ``workers`` are forked instead of in each: every worker reads the DCP
# metadata of the sources (:func:`~btx_megatron.checkpoint.verify.dcp_metadata`).
WORKER_PRELOAD = ("btx_megatron.checkpoint.dcp_metadata",)


# --------------------------------------------------------------------------------------------
# Process group (optional) and collectives that degrade to no-ops for one plain process
# --------------------------------------------------------------------------------------------


def _needs_group(opts: MergeOptions) -> bool:
    from ..runtime.distributed import read_launch_env

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    centroids = opts.router_init == "centroid" and opts.centroids is None
    return centroids or read_launch_env().world_size > 1


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def run_merge(opts: MergeOptions) -> Path:
    """Merge on every process of the (possibly just started) process group, or on
    ``opts.workers`` processes forked from this one; returns the output."""
    if opts.workers > 1:
        from ..runtime.distributed import run_forked_group

        one = dataclasses.replace(opts, workers=1)
        return run_forked_group(lambda: _merge_on_group(one), opts.workers, preload=WORKER_PRELOAD)
    return _merge_on_group(opts)


def _merge_on_group(opts: MergeOptions) -> Path:
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
        job: MergeJob = result[1]
        if opts.router_init == "centroid" and opts.centroids is None:
            centroids, info = compute_centroids(job.sources, opts, model_config)
            opts = dataclasses.replace(opts, centroids=centroids, centroid_info=info)
        return _write_output(job, opts, rank, world)


def _write_output(job: MergeJob, opts: MergeOptions, rank: int, world: int) -> Path:
    """Every process writes its slices into one staging directory that rank 0 completes and
    publishes; a failure on any process removes it and is raised on every process."""
    owner = assign_units(job.units, world, [unit_cost(u, job.weights) for u in job.units])
    mine = [u for u, r in zip(job.units, owner) if r == rank]

    def finish(staging: Path, iter_dir: Path, parts: list) -> None:
        _finish(staging, iter_dir, [c for chunks, _ in parts for c in chunks], job, opts, world,
                [stats for _, stats in parts])

    return write_staged(Path(opts.output), rank, world,
                        lambda iter_dir: _stream_units(mine, job, opts, iter_dir, rank, world), finish)


def _finish(staging: Path, iter_dir: Path, chunks: list[WrittenChunk], job: MergeJob, opts: MergeOptions,
            world: int, stats: list[dict]) -> None:
    write_metadata(iter_dir, chunks)
    _manifest(job, opts, world).write(iter_dir)
    fmt.mark_output(staging, TOOL)
    fmt.write_text_atomic(staging / fmt.TRACKER, "0\n")
    fmt.publish_directory(staging, opts.output, opts.overwrite)
    if opts.progress:
        seconds = max(s["seconds"] for s in stats)
        moved = sum(s["read"] + s["written"] for s in stats)
        print(f"[merge] read {sum(s['read'] for s in stats) / MIB:,.1f} MiB, wrote "
              f"{sum(s['written'] for s in stats) / MIB:,.1f} MiB in {seconds:.2f} s "
              f"({moved / MIB / max(seconds, 1e-9):,.1f} MiB/s) on {world} process(es) -> {opts.output}",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The data phase of one process
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Loaded:
    """A unit's inputs, read by an IO thread: source slices, or the output filled in place."""

    unit: Unit
    sources: list[tuple[int, torch.Tensor]]  # (source index, slice)
    pooled: list[torch.Tensor] = dataclasses.field(default_factory=list)  # buffers to hand back
    out: torch.Tensor | None = None
    ranges: list[tuple[int, int, int]] | None = None  # the output's bytes as source file ranges
    nbytes: int = 0


class _UnitLoader:
    """Reads the source boxes of one unit (runs on an IO thread)."""

    def __init__(self, job: MergeJob, readers: list[CheckpointReader], pool: BufferPool) -> None:
        self.job, self.readers, self.pool = job, readers, pool

    def __call__(self, u: Unit) -> _Loaded:
        loaded = _Loaded(u, [])
        for s_idx, (reader, w) in enumerate(zip(self.readers, self.job.weights)):
            if not u.reads(w, s_idx):
                continue
            src_dtype = reader.tensors[u.src_key][1]
            if u.source is not None and src_dtype == getattr(torch, u.dtype):
                # A BTX expert: its source's slice is the output part ([1, ...] is the layer axis
                # of the source box and the expert axis of the output part). Copied file to file
                # when its bytes lie in whole rows in the source, else read in place.
                loaded.ranges = reader.file_ranges(u.src_key, u.src_offsets(), u.shape)
                if loaded.ranges is not None:
                    loaded.nbytes += sum(length for _, _, length in loaded.ranges)
                    continue
                loaded.out = dest = self.pool.get(u.shape, src_dtype)
            else:
                box = (1, *u.src_shape) if u.layer is not None else u.src_shape
                view = reader.view(u.src_key, u.src_offsets(), box) if u.kind == "avg" else None
                if view is not None:  # averaged straight from the page cache
                    loaded.sources.append((s_idx, view.view(u.src_shape)))
                    loaded.nbytes += view.numel() * view.element_size()
                    continue
                buf = self.pool.get(u.src_shape, src_dtype)
                loaded.sources.append((s_idx, buf))
                loaded.pooled.append(buf)
                dest = buf.unsqueeze(0) if u.layer is not None else buf
            loaded.nbytes += reader.read(u.src_key, u.src_offsets(), dest)
        return loaded


def _compute(loaded: _Loaded, job: MergeJob, opts: MergeOptions, pool: BufferPool) -> torch.Tensor:
    u, dtype = loaded.unit, getattr(torch, loaded.unit.dtype)
    if u.kind == "router":
        num_experts, hidden = u.shape
        return router_weight(opts.router_init, num_experts, hidden, u.layer, std=job.init_method_std,
                             seed=opts.router_seed, plan=job.plan, centroids=opts.centroids, dtype=dtype)
    if u.kind == "avg":
        weights = [job.weights[i] for i, _ in loaded.sources]
        return core.average_into(pool.get(u.shape, dtype), [t for _, t in loaded.sources], weights)
    if loaded.out is not None:
        return loaded.out
    if u.source is not None:  # a BTX expert in another dtype
        return loaded.sources[0][1].to(dtype).unsqueeze(0)
    out = pool.get(u.shape, dtype)
    for s_idx, t in loaded.sources:  # in source order (blend's bias is zeroed by source 0)
        core.fill_experts(job.plan, u.kind, s_idx, t.to(dtype), out, layer=u.layer or 0)
    return out


def _stream_units(mine: list[Unit], job: MergeJob, opts: MergeOptions, iter_dir: Path, rank: int,
                  world: int) -> tuple[list[WrittenChunk], dict]:
    """Read, compute and write this process's units with IO overlapped; returns the written
    chunks and the figures of the data phase (seconds, bytes read, bytes written)."""
    start = time.perf_counter()
    budget = opts.max_inflight_mib << 20
    readers = [CheckpointReader(s.ckpt_dir, _dcp_metadata(s), s.label) for s in job.sources]
    # The budget is shared out: a quarter for slices read ahead, a quarter for slices waiting to
    # be written, half for idle buffers kept for reuse.
    writer = DistcpWriter(iter_dir, rank, max_pending_bytes=budget // 4)
    pool = BufferPool(budget // 2)
    progress = Progress("merge", sum(unit_cost(u, job.weights) for u in mine), enabled=opts.progress and rank == 0)
    stats = {"read": 0, "written": 0, "detail": f"rank 0 of {world}" if world > 1 else ""}
    try:
        if rank == 0:
            writer.add_bytes(COMMON_STATE_KEY, common_state_bytes({"iteration": 0, "consumed_samples": 0}))
        load = _UnitLoader(job, readers, pool)
        with ThreadPoolExecutor(opts.io_threads, thread_name_prefix="merge-read") as executor:
            pending: collections.deque = collections.deque()
            ahead = 0  # bytes of units submitted for reading and not yet handed to the writer
            for u in mine:
                pending.append((executor.submit(load, u), unit_cost(u, job.weights)))
                ahead += pending[-1][1]
                while pending and (ahead >= budget // 4 or len(pending) > 4 * opts.io_threads):
                    ahead -= _drain_one(pending, job, opts, writer, pool, progress, stats)
            while pending:
                ahead -= _drain_one(pending, job, opts, writer, pool, progress, stats)
        fmt.fault_point(f"merge-data-rank{rank}")
        chunks = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        for r in readers:
            r.close()
    progress.finish(stats["detail"])
    return chunks, {"seconds": time.perf_counter() - start, "read": stats["read"], "written": writer.bytes_written}


def _drain_one(pending: collections.deque, job: MergeJob, opts: MergeOptions, writer: DistcpWriter,
               pool: BufferPool, progress: Progress, stats: dict) -> int:
    """Compute the oldest read unit and hand it to the writer; returns its cost."""
    future, cost = pending.popleft()
    loaded = future.result()
    u = loaded.unit
    chunk_shape = (1, *u.shape) if u.layer is not None else u.shape
    if loaded.ranges is not None:
        writer.add_file_ranges(u.out_key, u.offsets(), chunk_shape, getattr(torch, u.dtype), loaded.ranges,
                               u.global_shape)
    else:
        out = _compute(loaded, job, opts, pool)
        for t in loaded.pooled:  # read, used, no longer referenced
            if t is not out:
                pool.put(t)
        writer.add_tensor(u.out_key, u.offsets(), out.view(chunk_shape), u.global_shape, release=pool.put)
    stats["read"] += loaded.nbytes
    progress.update(loaded.nbytes + u.nbytes, detail=stats["detail"])
    return cost


def _dcp_metadata(src: Source):
    from ..checkpoint.verify import dcp_metadata

    return dcp_metadata(src.ckpt_dir)


def _manifest(job: MergeJob, opts: MergeOptions, world: int) -> fmt.Manifest:
    sources, plan = job.sources, job.plan
    dtypes = {u.dtype for u in job.units}
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtypes.pop(), "fp32") \
        if len(dtypes) == 1 else "mixed"
    btx = {
        "method": plan.method,
        "expert_names": plan.expert_names([s.name for s in sources]),
        "sources": [
            {"name": s.name, "flag": s.flag, "path": str(s.path), "checkpoint_dir": s.ckpt_dir,
             "iteration": s.iteration, "content_hash": s.content_hash,
             "consumed_samples": s.manifest.get("consumed_samples")}
            for s in sources
        ],
        "averaging_weights": {s.name: w / sum(job.weights) for s, w in zip(sources, job.weights)},
        "router_init": opts.router_init,
        "router_seed": opts.router_seed,
        "split_experts": plan.split if plan.method == "split" else None,
        "split_scale": plan.split_scale if plan.method == "split" else None,
        "split_scales_applied": list(plan.scales()) if plan.method == "split" else None,
        "upcycle_noise": opts.upcycle_noise if plan.method == "upcycle" else None,
        "recommended_topk": job.recommended_topk,
        "tool": TOOL,
        "tool_version": __version__,
        "merge_world_size": world,
    }
    if opts.router_init == "centroid" and opts.centroid_info:
        btx["centroid"] = opts.centroid_info
    return fmt.Manifest(model=job.model, tool=f"btx_megatron {__version__} {TOOL}", precision=precision,
                        extra={"btx": btx})


__all__ = ["run_merge"]
