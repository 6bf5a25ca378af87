"""Writing an expert edit (:func:`write_edit`, every process of the launch): the job's output
chunks (:class:`~.edit_options.Piece`) are dealt to the processes by the bytes each moves; a
process copies its unchanged slices file to file where their bytes are contiguous, computes the
rest (blended shared weights, the branch's FFN as new experts, the grown router) and writes its
own ``.distcp`` file. Rank 0 then writes the DCP metadata and manifest into the staging
directory and publishes it only when every process has finished.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from .. import __version__
from .. import checkpoint as fmt
from ..checkpoint.dcp_reader import CheckpointReader
from ..checkpoint.dcp_writer import COMMON_STATE_KEY, DistcpWriter, common_state_bytes, write_metadata
from ..runtime.progress import Progress
from . import plan as core
from .edit_options import EXPERT_KINDS, TOOL, AddOptions, EditJob, EditOptions, Piece
from .router_init import centroid_router, random_router
from .staged import write_staged
from .units import assign_units



def write_edit(job: EditJob, opts: EditOptions, centroids, rank: int, world: int) -> Path:
    """Write ``job`` into a staging directory next to ``opts.output`` and publish it (every process)."""
    output = Path(opts.output)
    costs = [p.nbytes * (2 if p.op == "blend" else 1) for p in job.pieces]
    owner = assign_units(job.pieces, world, costs)
    mine = [p for p, r in zip(job.pieces, owner) if r == rank]

    def finish(staging: Path, iter_dir: Path, parts: list) -> None:
        write_metadata(iter_dir, [c for chunks in parts for c in chunks])
        job.btx["edits"][-1]["world_size"] = world
        fmt.Manifest(model=job.model, tool=f"btx_megatron {__version__} {TOOL}", precision=job.precision,
                     extra={"btx": job.btx, "stage": "edit"}).write(iter_dir)
        fmt.mark_output(staging, TOOL, op=job.op)
        fmt.write_text_atomic(staging / fmt.TRACKER, "0\n")
        fmt.publish_directory(staging, output, opts.overwrite)

    write_staged(output, rank, world, lambda iter_dir: _write_pieces(mine, job, opts, centroids, iter_dir, rank),
                 finish)
    if opts.progress and rank == 0:
        print(f"[edit] {job.op}: {len(job.expert_names)} experts ({', '.join(job.expert_names)}) -> {output}",
              file=sys.stderr, flush=True)
    return output


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


__all__ = ["write_edit"]
