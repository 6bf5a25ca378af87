"""Distributed BTX merge: dense branch checkpoints -> one MoE checkpoint ROOT.

Every process runs :func:`run_merge`. The output tensors are cut into work units, one per
(checkpoint key, layer) (non-layer tensors such as the embedding are one unit each), and the
units are dealt to the processes by size. A process reads from each source only the slices
of the units it owns (``ShardedTensor.from_rank_offsets`` requests through
``dist_checkpointing.load``, which reads just the overlapping byte ranges), so with W
processes each one holds about 1/W of the output plus 1/W of one source at a time; no process
holds a whole branch model when W > 1. The output is written with one collective
``dist_checkpointing.save`` of global ShardedTensors (layer axis prepended, expert axis part
of the tensor), i.e. exactly the keys and global shapes Megatron-Core's MoE ``GPTModel``
produces, so it loads at any TP/PP/EP/expert-TP layout.

Key mapping (dense -> MoE), per layer:
``mlp.linear_fc1.layer_norm_{weight,bias}`` -> ``pre_mlp_layernorm.{weight,bias}`` (averaged),
``mlp.linear_fc1/fc2.{weight,bias}`` -> ``mlp.experts.experts.linear_fc1/fc2.*`` [E, ...]
(see :mod:`btx_megatron.btx.merge`), new ``mlp.router.weight`` [E, H]; every other model tensor
is averaged. ``_extra_state`` objects (TE FP8 metadata) are not written: they hold no weights,
a merged model must recalibrate FP8 scales anyway, and ``load_model_weights`` skips them.

Source fingerprint (``content_hash``): sha256 over the DCP ``.metadata`` file, ``metadata.json``,
the name and size of every ``.distcp`` file and three 1 MiB samples (head, middle, tail) of
each, so it is cheap for a 100 GB checkpoint yet differs between branches (different weights)
and matches for a copy of the same branch. ``--full-hash`` hashes every byte instead.

The result is written into ``<output parent>/.staging-<name>-<nonce>/`` and renamed onto the
output only when every process has finished; any failure removes the staging directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .. import checkpoint_format as fmt
from . import merge as core

TOOL = "tools/merge_branches.py"
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
SAMPLE_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    name: str
    path: str  # as given
    flag: str  # the flag that named it, for messages
    ckpt_dir: str = ""
    iteration: int = 0
    manifest: dict = dataclasses.field(default_factory=dict)
    tensors: dict = dataclasses.field(default_factory=dict)  # key -> (shape tuple, dtype str)
    content_hash: str = ""
    nbytes: int = 0

    @property
    def label(self) -> str:
        return f"{self.flag} {self.name}={self.path}" if self.flag == "--branch" else f"{self.flag} {self.path}"


def _dcp_metadata(ckpt_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(ckpt_dir)).read_metadata()


def verify_files(ckpt_dir: Path, label: str):
    """Every .distcp file the DCP metadata points into exists and is long enough."""
    try:
        metadata = _dcp_metadata(ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same user error
        raise ValueError(f"{label}: cannot read the checkpoint metadata in {ckpt_dir} ({exc}).") from exc
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(need.items()):
        f = ckpt_dir / rel
        if not f.is_file():
            raise ValueError(f"{label}: {f} is missing (the checkpoint metadata references it).")
        size = f.stat().st_size
        if size < end:
            raise ValueError(
                f"{label}: {f} is truncated ({size} bytes, the metadata needs at least {end}); "
                "the checkpoint was not written completely."
            )
    return metadata


def fingerprint(ckpt_dir: Path, full: bool = False) -> str:
    h = hashlib.sha256()
    for name in (".metadata", "metadata.json"):
        p = ckpt_dir / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    for f in sorted(ckpt_dir.glob("*.distcp")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if full:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
                continue
            for start in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                fh.seek(start)
                h.update(fh.read(SAMPLE_BYTES))
    return ("sha256-full:" if full else "sha256-sampled:") + h.hexdigest()


def inspect_source(name: str, path: str, flag: str, full_hash: bool = False, allow_moe: bool = False) -> Source:
    src = Source(name=name, path=str(path), flag=flag)
    try:
        ckpt_dir, iteration = fmt.resolve(path, flag)
    except fmt.CheckpointError as exc:
        raise ValueError(f"{src.label}: {exc}") from exc
    src.ckpt_dir, src.iteration = str(ckpt_dir.resolve()), iteration
    try:
        src.manifest = fmt.read_manifest(ckpt_dir)
    except fmt.CheckpointError as exc:
        raise ValueError(f"{src.label}: {exc}") from exc
    model = src.manifest.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{src.label}: the manifest {ckpt_dir / fmt.MANIFEST} has no 'model' section.")
    if (src.manifest.get("kind") == "moe" or model.get("num_experts")) and not allow_moe:
        raise ValueError(
            f"{src.label} is already an MoE checkpoint (num_experts={model.get('num_experts')}); "
            "BTX merges dense branches. Give the dense branch checkpoints."
        )
    metadata = verify_files(ckpt_dir, src.label)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and key.startswith(MODEL_PREFIXES):
            src.tensors[key] = (tuple(md.size), str(md.properties.dtype).replace("torch.", ""))
            src.nbytes += math.prod(md.size) * md.properties.dtype.itemsize
    if not any(k.startswith(LAYER_PREFIX) for k in src.tensors):
        raise ValueError(f"{src.label}: no model tensors found in {ckpt_dir}; is it a model checkpoint?")
    if any(k.startswith("decoder.layers.mlp.experts.") or k == ROUTER_KEY for k in src.tensors):
        if not allow_moe:
            raise ValueError(f"{src.label} holds MoE expert tensors; BTX merges dense branches.")
    src.content_hash = fingerprint(ckpt_dir, full_hash)
    return src


def check_sources(sources: list[Source], allow_duplicates: bool = False) -> None:
    """Same architecture, same tensors, no source twice."""
    ref = sources[0]
    ref_arch = _model_config(ref).architecture()
    seen_dirs: dict[str, Source] = {}
    seen_hash: dict[str, Source] = {}
    for s in sources:
        arch = _model_config(s).architecture()
        for key, value in ref_arch.items():
            if arch.get(key) != value:
                raise ValueError(
                    f"{s.label} has {key}={arch.get(key)!r} but {ref.label} has {key}={value!r}; "
                    "branches must share the seed's architecture."
                )
        if s.ckpt_dir in seen_dirs and not allow_duplicates:
            raise ValueError(f"{s.label} is the same checkpoint as {seen_dirs[s.ckpt_dir].label}.")
        if s.content_hash in seen_hash and not allow_duplicates:
            raise ValueError(
                f"{s.label} has the same content ({s.content_hash}) as {seen_hash[s.content_hash].label}; "
                "the same branch is given twice."
            )
        seen_dirs[s.ckpt_dir] = s
        seen_hash[s.content_hash] = s
        if s.tensors != ref.tensors:
            diff = sorted(set(s.tensors.items()) ^ set(ref.tensors.items()))[:3]
            raise ValueError(
                f"{s.label} and {ref.label} hold different tensors (first differences: {diff})."
            )


def _model_config(src: Source):
    from ..config.schema import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in src.manifest["model"].items() if k in known})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{src.label}: the manifest's model section is invalid ({exc}).") from exc


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


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
    overwrite: bool = False
    full_hash: bool = False
    allow_duplicates: bool = False  # the same checkpoint as several experts (tests, ablations)
    progress: bool = True
    dtype: str | None = None  # output dtype (default: the sources')


@dataclasses.dataclass
class Unit:
    """One output slice: ``out_key`` at ``layer`` (None: the whole non-layer tensor)."""

    out_key: str
    layer: int | None
    kind: str  # "avg" | expert kind | "router"
    src_key: str | None
    shape: tuple[int, ...]  # per-unit shape (layer axis removed)
    src_shape: tuple[int, ...] | None
    dtype: str
    num_layers: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


def _out_key(src_key: str) -> str:
    if src_key.startswith(DENSE_NORM):
        return "decoder.layers.pre_mlp_layernorm." + src_key[len(DENSE_NORM):]
    return src_key


def build_units(ref: Source, plan: core.ExpertPlan, num_layers: int, num_experts: int, hidden: int,
                dtype: str | None = None) -> list[Unit]:
    units = []
    router_dtype = dtype
    for key, (shape, src_dtype) in sorted(ref.tensors.items()):
        out_dtype = dtype or src_dtype
        router_dtype = router_dtype or src_dtype
        layered = key.startswith(LAYER_PREFIX)
        if layered and shape[0] != num_layers:
            raise ValueError(f"{ref.label}: {key} has {shape[0]} layers, the manifest says {num_layers}.")
        per = shape[1:] if layered else shape
        if key in DENSE_FC:
            out_key, kind = DENSE_FC[key]
            out_shape = core.expert_shape(plan, kind, per)
        elif key.startswith("decoder.layers.mlp.") and not key.startswith(DENSE_NORM):
            raise ValueError(f"{ref.label}: unexpected FFN tensor {key}; only dense MLPs can be merged.")
        else:
            out_key, kind, out_shape = _out_key(key), "avg", per
        for layer in range(num_layers) if layered else [None]:
            units.append(Unit(out_key, layer, kind, key, tuple(out_shape), tuple(per), out_dtype, num_layers))
    for layer in range(num_layers):
        units.append(Unit(ROUTER_KEY, layer, "router", None, (num_experts, hidden), None, router_dtype, num_layers))
    return units


def assign_units(units: list[Unit], world: int) -> list[int]:
    """Owner rank of each unit: largest first onto the least loaded rank (deterministic)."""
    load = [0] * world
    owner = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: (-units[i].nbytes, i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += units[i].nbytes
    return owner


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, enabled: bool, total_bytes: int) -> None:
        self.enabled = enabled
        self.total = total_bytes
        self.done = 0
        self.t0 = time.perf_counter()

    def update(self, nbytes: int, what: str) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        print(f"[merge] {what}: {self.done / 2**20:,.1f}/{self.total / 2**20:,.1f} MiB "
              f"({pct:5.1f}%) {self.done / 2**20 / dt:,.1f} MiB/s", file=sys.stderr, flush=True)


def _ensure_process_group() -> bool:
    """Start a gloo group from the torchrun/srun environment (world size 1 when run plainly)."""
    from ..runtime import cpu_compat
    from ..runtime.distributed import read_launch_env

    # dist_checkpointing asks for the CUDA device in places; a no-op where CUDA exists.
    cpu_compat.enable()
    if torch.distributed.is_initialized():
        return False

    launch = read_launch_env()
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    torch.distributed.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size)
    return True


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def prepare(opts: MergeOptions) -> dict:
    """Validate everything and build the plan (rank 0; cheap: metadata and fingerprints only)."""
    out = Path(opts.output)
    if out.exists() and not opts.overwrite:
        raise ValueError(f"--output {out} exists; pass --overwrite to replace it (replaced only at the end).")
    if opts.upcycle_from:
        if opts.branches or opts.seed_expert:
            raise ValueError("--upcycle-from makes every expert from one dense model; drop --branch/--seed-expert.")
        sources = [inspect_source("upcycle", opts.upcycle_from, "--upcycle-from", opts.full_hash)]
        method = "upcycle"
    else:
        if not opts.branches:
            raise ValueError("give at least one --branch NAME=DIR (or --upcycle-from DIR).")
        names = [n for n, _ in opts.branches]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"--branch names {dup} more than once; each branch needs its own name.")
        sources = [inspect_source(n, p, "--branch", opts.full_hash) for n, p in opts.branches]
        if opts.seed_expert:
            if "seed" in names:
                raise ValueError("--seed-expert adds an expert named 'seed'; rename the --branch called seed.")
            sources.append(inspect_source("seed", opts.seed_expert, "--seed-expert", opts.full_hash))
        method = opts.method
    if Path(opts.output).resolve() in {Path(s.ckpt_dir).resolve() for s in sources} | {
            Path(s.path).resolve() for s in sources}:
        raise ValueError(f"--output {opts.output} is one of the sources.")
    check_sources(sources, opts.allow_duplicates)
    mcfg = _model_config(sources[0])
    names = [s.name for s in sources]
    # Raw weights: the accumulator divides by their sum once at the end, so uniform weights
    # give exactly sum/N (the element-wise mean), not a sum of pre-scaled terms.
    if method == "upcycle":
        weights = [1.0]
    elif opts.weights:
        core.normalized_weights(names, opts.weights)  # validates
        weights = [float(opts.weights.get(n, 0.0)) for n in names]
    else:
        # Uniform over the branches (the paper); the seed expert contributes only its FFN.
        weights = [1.0 if s.flag == "--branch" else 0.0 for s in sources]
    base_topk = opts.topk or mcfg.moe_router_topk
    plan = core.ExpertPlan(
        method=method, num_sources=len(sources), split=opts.split,
        num_experts_upcycle=opts.num_experts, split_scale=opts.split_scale, gated=mcfg.swiglu,
        pre_softmax=mcfg.moe_router_type == "switch", topk=base_topk, upcycle_noise=opts.upcycle_noise,
        noise_seed=opts.router_seed,
    )
    ffn = plan.expert_ffn_size(mcfg.ffn_hidden_size)
    num_experts = plan.num_experts
    if opts.router_init not in core.ROUTER_INITS:
        raise ValueError(f"--router-init {opts.router_init!r}: choose one of {core.ROUTER_INITS}.")
    if opts.router_init == "centroid" and opts.centroids is None:
        data = opts.centroid_data or {}
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"--router-init centroid needs --centroid-data NAME=PREFIX for {missing} "
                             "(or --centroid-file).")
        extra = sorted(set(data) - set(names))
        if extra:
            raise ValueError(f"--centroid-data names {extra}, which are not sources ({names}).")
        if not opts.tokenizer_type:
            raise ValueError("--centroid-data needs --tokenizer-type (and --tokenizer-model) of the branches' data.")
        if method == "blend":
            raise ValueError("--router-init centroid has no meaning for --blend-experts (every expert mixes all domains).")
    elif opts.router_init == "centroid":
        c = opts.centroids
        want = (len(sources), mcfg.num_layers, mcfg.hidden_size)
        if tuple(c.shape) != want:
            raise ValueError(f"centroids have shape {tuple(c.shape)}, expected [sources, layers, hidden] = {want}.")
        core.replicate_centroids(c[:, 0], plan)  # raises for blend
        if c.shape[0] != len(sources):
            raise ValueError("one centroid set per source is needed.")
    units = build_units(sources[0], plan, mcfg.num_layers, num_experts, mcfg.hidden_size, opts.dtype)
    recommended = plan.recommended_topk(base_topk)
    model = dataclasses.asdict(mcfg)
    model.update(
        num_experts=num_experts,
        moe_ffn_hidden_size=ffn if ffn != mcfg.ffn_hidden_size else None,
        moe_router_topk=min(recommended, num_experts),
    )
    return {
        "sources": sources, "plan": plan, "units": units, "weights": weights, "model": model,
        "recommended_topk": recommended, "num_layers": mcfg.num_layers,
    }


def run_merge(opts: MergeOptions) -> Path:
    """Merge on every process of the (possibly just started) process group; returns the output."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    started = _ensure_process_group()
    try:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        result = None
        if rank == 0:
            try:
                result = ("ok", prepare(opts))
            except ValueError as exc:
                result = ("error", str(exc))
        result = _broadcast(result)
        if result[0] == "error":
            raise ValueError(result[1])
        info = result[1]
        sources: list[Source] = info["sources"]
        plan: core.ExpertPlan = info["plan"]
        units: list[Unit] = info["units"]
        weights: list[float] = info["weights"]
        owner = assign_units(units, world)
        if opts.router_init == "centroid" and opts.centroids is None:
            opts = dataclasses.replace(opts)
            opts.centroids, opts.centroid_info = compute_centroids(sources, opts)
        mine = [u for u, r in zip(units, owner) if r == rank]

        output = Path(opts.output)
        nonce = _broadcast(uuid.uuid4().hex[:10] if rank == 0 else None)
        staging = output.parent / f".staging-{output.name}-{nonce}"
        iter_dir = fmt.iteration_dir(staging, 0)
        ok = False
        try:
            if rank == 0:
                iter_dir.mkdir(parents=True)
            torch.distributed.barrier()
            read_total = sum(
                math.prod(u.src_shape) * getattr(torch, s.tensors[u.src_key][1]).itemsize
                for s, w in zip(sources, weights) for u in units
                if u.src_key is not None and (u.kind != "avg" or w != 0.0))
            progress = _Progress(opts.progress and rank == 0, read_total)
            t_start = time.perf_counter()
            outputs = _merge_units(mine, sources, plan, weights, opts, progress, world)
            read_s = time.perf_counter() - t_start

            state = {}
            for u, tensor in zip(mine, outputs):
                if u.layer is None:
                    st = ShardedTensor.from_rank_offsets(u.out_key, tensor, replica_id=0)
                else:
                    st = ShardedTensor.from_rank_offsets(
                        u.out_key, tensor, (0, u.layer, u.num_layers), replica_id=0, prepend_axis_num=1)
                state[f"{u.out_key}@{u.layer}"] = st
            t_save = time.perf_counter()
            # The mix phase resumes from this directory at iteration 0 (common state).
            dist_checkpointing.save({"model": state, "iteration": 0, "consumed_samples": 0}, str(iter_dir))
            del state, outputs
            torch.distributed.barrier()
            written = _dir_bytes(iter_dir) if rank == 0 else 0
            save_s = time.perf_counter() - t_save
            status = "ok"
            if rank == 0:
                if opts.progress:
                    print(f"[merge] wrote {written / 2**20:,.1f} MiB in {save_s:.2f}s "
                          f"({written / 2**20 / max(save_s, 1e-9):,.1f} MiB/s); read phase {read_s:.2f}s",
                          file=sys.stderr, flush=True)
                try:
                    fmt.write_json_atomic(iter_dir / fmt.MANIFEST, _manifest(info, opts, world))
                    fmt.write_text_atomic(staging / fmt.TRACKER, "0\n")
                    fmt.publish_directory(staging, output, opts.overwrite)
                except (OSError, ValueError) as exc:
                    status = f"could not publish {output}: {exc}"
            # Every rank learns the outcome, so none waits in a barrier for a failed rank 0.
            status = _broadcast(status)
            if status != "ok":
                raise ValueError(status)
            ok = True
        finally:
            # Every rank reaches here; rank 0 removes a staging directory left by a failure.
            if not ok and rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
        torch.distributed.barrier()
        return output
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _merge_units(mine: list[Unit], sources: list[Source], plan: core.ExpertPlan, weights: list[float],
                 opts: MergeOptions, progress: _Progress, world: int) -> list[torch.Tensor]:
    """Read this rank's slices source by source and build its output tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    outputs: list[torch.Tensor | None] = [None] * len(mine)
    accs: dict[int, core.Accumulator] = {}
    for i, u in enumerate(mine):
        if u.kind == "avg":
            accs[i] = core.Accumulator(u.shape, sum(weights))
        elif u.kind != "router":
            # Every element is written by fill_experts (blend's bias zeroes its own).
            outputs[i] = torch.empty(u.shape, dtype=getattr(torch, u.dtype))
    for s_idx, src in enumerate(sources):
        request, targets = {}, []
        for i, u in enumerate(mine):
            if u.src_key is None or (u.kind == "avg" and weights[s_idx] == 0.0):
                continue
            src_dtype = getattr(torch, src.tensors[u.src_key][1])
            if plan.method == "btx" and u.kind not in ("avg", "router") and outputs[i].dtype == src_dtype:
                # BTX experts are read straight into their slot of the output (no extra copy).
                buf = outputs[i][s_idx]
            else:
                buf = torch.empty(u.src_shape, dtype=src_dtype)
            if u.layer is None:
                st = ShardedTensor.from_rank_offsets(u.src_key, buf, replica_id=0)
            else:
                st = ShardedTensor.from_rank_offsets(
                    u.src_key, buf, (0, u.layer, u.num_layers), replica_id=0, prepend_axis_num=1)
            name = f"{u.src_key}@{u.layer}"
            request[name] = st
            targets.append((i, name))
        # Collective: every rank joins each source's load, with its own (maybe empty) request.
        loaded = dist_checkpointing.load(request, src.ckpt_dir, validate_access_integrity=False)
        nbytes = 0
        for i, name in targets:
            t = loaded[name]
            u = mine[i]
            nbytes += t.numel() * t.element_size()
            if u.kind == "avg":
                accs[i].add(t, weights[s_idx])
            elif plan.method == "btx" and t.data_ptr() == outputs[i][s_idx].data_ptr():
                pass  # loaded in place
            else:
                core.fill_experts(plan, u.kind, s_idx, t.to(outputs[i].dtype), outputs[i], layer=u.layer or 0)
        del loaded, request
        total = torch.tensor([nbytes], dtype=torch.int64)
        torch.distributed.all_reduce(total)
        progress.update(int(total.item()), f"source {s_idx + 1}/{len(sources)} {src.name}")
    for i, acc in accs.items():
        outputs[i] = acc.result(getattr(torch, mine[i].dtype))
    accs.clear()
    for i, u in enumerate(mine):
        if u.kind == "router":
            outputs[i] = _router(u, plan, opts, sources)
    return outputs


def _as_prefixes(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def compute_centroids(sources: list[Source], opts: MergeOptions) -> tuple[torch.Tensor, dict]:
    """Per source, per layer: the mean hidden state entering the FFN of that branch's own model
    on its own data (``--centroid-data NAME=PREFIX``). Returns ([N, L, H] float32, info).

    The *branch* model is used (not the averaged trunk): it is what produced each domain's
    representation and needs no extra merge pass. The hidden state is the pre-MLP-norm output
    (the router's input in the MoE layer). Every process builds the branch model in turn (one
    whole branch model at a time: the one phase where a process holds a full model) and runs
    1/W of the samples; sums are all-reduced.
    """
    from megatron.core.transformer.identity_op import IdentityOp

    from ..config.schema import Config, DataConfig, ParallelConfig
    from ..data.datasets import build_domain_eval_datasets
    from ..data.tokenizers import build_tokenizer
    from ..models import build_model_chunks, transformer_config
    from ..runtime.distributed import initialize_distributed
    from ..training.checkpointing import load_model_weights

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    initialize_distributed(ParallelConfig(distributed_backend="gloo"), seed=opts.router_seed)
    mcfg = _model_config(sources[0])
    seq = opts.centroid_seq_length or mcfg.seq_length
    per_source, counts = [], []
    for src in sources:
        cfg = Config(model=_model_config(src), data=DataConfig(
            eval_domains={src.name: _as_prefixes(opts.centroid_data[src.name])},
            tokenizer_type=opts.tokenizer_type, tokenizer_model=opts.tokenizer_model))
        tokenizer = build_tokenizer(opts.tokenizer_type, opts.tokenizer_model, mcfg.vocab_size)
        ds = build_domain_eval_datasets(cfg.data, tokenizer, seq_length=seq, seed=opts.router_seed,
                                        num_samples=opts.centroid_samples, flag="--centroid-data")[src.name]
        model = build_model_chunks(cfg, transformer_config(cfg))[0]
        load_model_weights([model], src.ckpt_dir, flag=src.flag)
        model.eval()
        sums = torch.zeros(mcfg.num_layers, mcfg.hidden_size, dtype=torch.float64)
        count = torch.zeros(1, dtype=torch.float64)
        hooks = []
        for l, layer in enumerate(model.decoder.layers):
            def hook(module, args, l=l, layer=layer):
                x = args[0]
                if isinstance(layer.pre_mlp_layernorm, IdentityOp):  # TE: norm fused into fc1
                    fc1 = layer.mlp.linear_fc1
                    shape = (x.shape[-1],)
                    if mcfg.normalization == "RMSNorm":
                        x = torch.nn.functional.rms_norm(x, shape, fc1.layer_norm_weight, mcfg.norm_epsilon)
                    else:
                        x = torch.nn.functional.layer_norm(x, shape, fc1.layer_norm_weight, fc1.layer_norm_bias,
                                                           mcfg.norm_epsilon)
                sums[l] += x.detach().double().reshape(-1, x.shape[-1]).sum(0).cpu()
            hooks.append(layer.mlp.register_forward_pre_hook(hook))
        n = min(len(ds), opts.centroid_samples)
        device = next(model.parameters()).device
        with torch.no_grad():
            for idx in range(rank, n, world):
                tok = torch.as_tensor(ds[idx]["tokens"], dtype=torch.long, device=device).unsqueeze(0)
                pos = torch.arange(tok.shape[1], device=device).unsqueeze(0)
                model(tok, pos, None)
                count += tok.numel()
        for h in hooks:
            h.remove()
        del model
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(count)
        if count.item() == 0:
            raise ValueError(f"--centroid-data {src.name}={opts.centroid_data[src.name]} gave no tokens.")
        per_source.append((sums / count).float())
        counts.append(int(count.item()))
    info = {"hidden_state": "pre-MLP-norm output of each branch's own model",
            "data": dict(opts.centroid_data), "tokens": dict(zip([s.name for s in sources], counts)),
            "seq_length": seq, "samples": opts.centroid_samples}
    return torch.stack(per_source), info


def _router(u: Unit, plan: core.ExpertPlan, opts: MergeOptions, sources: list[Source]) -> torch.Tensor:
    dtype = getattr(torch, u.dtype)
    num_experts, hidden = u.shape
    std = float(sources[0].manifest["model"].get("init_method_std", 0.02))
    if opts.router_init == "random":
        return core.random_router(num_experts, hidden, std, opts.router_seed, u.layer, dtype)
    per_source = opts.centroids[:, u.layer]
    return core.centroid_router(core.replicate_centroids(per_source, plan), std, dtype)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _manifest(info: dict, opts: MergeOptions, world: int) -> dict:
    from ..training.checkpointing import git_revision

    sources: list[Source] = info["sources"]
    plan: core.ExpertPlan = info["plan"]
    dtypes = {u.dtype for u in info["units"]}
    precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "mixed"
    btx = {
        "method": plan.method,
        "expert_names": plan.expert_names([s.name for s in sources]),
        "sources": [
            {"name": s.name, "flag": s.flag, "path": str(s.path), "checkpoint_dir": s.ckpt_dir,
             "iteration": s.iteration, "content_hash": s.content_hash,
             "consumed_samples": s.manifest.get("consumed_samples")}
            for s in sources
        ],
        "averaging_weights": {s.name: w / sum(info["weights"]) for s, w in zip(sources, info["weights"])},
        "router_init": opts.router_init,
        "router_seed": opts.router_seed,
        "split_experts": plan.split if plan.method == "split" else None,
        "split_scale": plan.split_scale if plan.method == "split" else None,
        "split_scales_applied": list(plan.scales()) if plan.method == "split" else None,
        "upcycle_noise": opts.upcycle_noise if plan.method == "upcycle" else None,
        "recommended_topk": info["recommended_topk"],
        "tool": TOOL,
        "tool_version": __version__,
        "merge_world_size": world,
    }
    if opts.router_init == "centroid" and opts.centroid_info:
        btx["centroid"] = opts.centroid_info
    return {
        "format_version": fmt.FORMAT_VERSION,
        "iteration": 0,
        "consumed_samples": 0,
        "kind": "moe",
        "model": info["model"],
        # Whole global tensors, no per-rank state (RNG, optimizer): no layout to match. The
        # world size is None so a resume never looks for per-rank RNG states.
        "layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                   "virtual_pipeline_size": None, "expert_model_parallel_size": 1,
                   "expert_tensor_parallel_size": 1, "data_parallel_size": None, "world_size": None,
                   "use_distributed_optimizer": False},
        "optimizer": {"saved": False, "distributed": False, "sharding_type": None},
        "precision": precision,
        "tool": f"btx_megatron {__version__} {TOOL}",
        "git_revision": git_revision(),
        "btx": btx,
    }


__all__ = ["MergeOptions", "Source", "Unit", "assign_units", "build_units", "check_sources", "fingerprint",
           "inspect_source", "prepare", "run_merge", "verify_files"]
