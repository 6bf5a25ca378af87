"""Save and load training checkpoints with Megatron-Core distributed checkpointing (torch_dist).

A checkpoint holds the model, optimizer, LR scheduler, per-rank RNG states, iteration and
consumed samples. Model weights reshard on load to any TP/PP/EP/DP layout; optimizer state does
too when saved with ``--dist-ckpt-optim-fully-reshardable`` (or with the non-distributed
optimizer, whose state follows the model's sharding). See :mod:`btx_megatron.checkpoint`
for the directory layout and the atomic publish.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from .. import __version__
from .. import checkpoint as fmt
from ..models import virtual_pipeline_size
from ..runtime.distributed import device

log = logging.getLogger(__name__)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """DDP(Float16Module(GPTModel)) -> GPTModel."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def layout(cfg) -> dict[str, Any]:
    world = torch.distributed.get_world_size()
    p = cfg.parallel
    return {
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "virtual_pipeline_size": virtual_pipeline_size(cfg),
        "expert_model_parallel_size": p.expert_model_parallel_size,
        "expert_tensor_parallel_size": p.expert_tensor_parallel_size,
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "world_size": world,
        "use_distributed_optimizer": p.use_distributed_optimizer,
    }


def _sharding_metadata(cfg) -> dict[str, Any]:
    if not cfg.parallel.use_distributed_optimizer:
        return {}
    kind = "fully_reshardable" if cfg.checkpoint.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
    return {"distrib_optim_sharding_type": kind, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def _model_sharded_state_dict(model_chunks, metadata=None) -> dict[str, Any]:
    sd = {}
    for i, chunk in enumerate(model_chunks):
        sd[f"model{i}" if len(model_chunks) > 1 else "model"] = unwrap(chunk).sharded_state_dict(metadata=metadata)
    return sd


def _rng_state_object() -> ShardedObject:
    """This rank's RNG states, keyed by its global rank (restored only at the same world size)."""
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_checkpoint(cfg, iteration: int, model_chunks, optimizer=None, scheduler=None,
                    consumed_samples: int = 0, extra_manifest: dict | None = None,
                    save_dir: str | None = None, async_queue=None) -> Path:
    """Write ``iter_{iteration}`` under ``save_dir`` (default ``--save``), atomically.

    With ``async_queue`` (a Megatron-Core ``AsyncCallsQueue``, ``--async-save``) only the state
    dict and the write plan are made here; a forked process writes the files while training
    goes on, and the manifest, the rename into place and the tracker happen in the request's
    finalize step, which the queue runs on every rank once every rank's writer has finished
    (:class:`~btx_megatron.training.checkpointer.Checkpointer` drives it). Either way a save
    becomes the latest only when it is complete."""
    root = Path(save_dir or cfg.checkpoint.save)
    rank = torch.distributed.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    # Every rank must write into the same staging directory: rank 0 picks the nonce.
    nonce = [uuid.uuid4().hex[:10] if rank == 0 else None]
    torch.distributed.broadcast_object_list(nonce, src=0)
    staging = fmt.new_staging_dir(root, iteration, nonce[0])
    if rank == 0:
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    fmt.fault_point("save-start", iteration)

    metadata = _sharding_metadata(cfg)
    state = _model_sharded_state_dict(model_chunks, metadata=metadata)
    save_optim = optimizer is not None and not cfg.checkpoint.no_save_optim
    if save_optim:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=metadata)
        state["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["rng_state"] = _rng_state_object()
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    manifest = fmt.Manifest(
        model=dataclasses.asdict(cfg.model), tool=f"btx_megatron {__version__}", iteration=iteration,
        consumed_samples=consumed_samples, layout=layout(cfg),
        optimizer={"saved": save_optim, "distributed": cfg.parallel.use_distributed_optimizer,
                   "sharding_type": metadata.get("distrib_optim_sharding_type")},
        precision=cfg.precision.params_dtype_name, extra=dict(extra_manifest or {}),
    )

    def publish() -> None:  # every rank, after every rank's files are written
        torch.distributed.barrier()
        fmt.fault_point("save-written", iteration)
        error = None
        if rank == 0:
            try:
                manifest.write(staging)
                fmt.publish(staging, root, iteration)
            except OSError as exc:
                error = exc
        # Every rank learns whether rank 0 published (no rank may wait in a barrier for a rank
        # that failed), and fails with it.
        failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed.item():
            raise OSError(f"rank 0 could not publish {staging}")

    _results_queue_dies_with_trainer()
    if async_queue is None:
        dist_checkpointing.save(state, str(staging), content_metadata=metadata or None)
        publish()
    else:
        # "mcore": Megatron-Core's own async writer (the default, "nvrx", needs
        # nvidia-resiliency-ext). It forks a writer per save, so on CPU the child writes a
        # copy-on-write snapshot of the tensors as they are now, while training goes on.
        request = dist_checkpointing.save(state, str(staging), content_metadata=metadata or None,
                                          async_sharded_save=True, async_strategy="mcore")
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(_writer_dies_with_trainer(request, iteration))
    return fmt.iteration_dir(root, iteration)


def _writer_dies_with_trainer(request, iteration: int):
    """The forked writer of an async save gets PDEATHSIG=SIGKILL: a killed trainer never leaves
    a writer behind that could still be writing while the next start cleans the staging debris."""
    if request.async_fn is None:
        return request
    write = request.async_fn

    def write_in_child(*args, **kwargs):
        import signal

        from ..runtime.processes import exit_with_parent

        exit_with_parent(signal.SIGKILL)
        fmt.fault_point("async-write", iteration)
        return write(*args, **kwargs)

    return request._replace(async_fn=write_in_child)


def _results_queue_dies_with_trainer() -> None:
    """Megatron-Core's torch_dist writer (sync and async) reports results through a queue of a
    multiprocessing Manager, a spawned server process that is stopped only at a clean exit: a
    SIGKILLed trainer would leave it running for ever. Start that Manager ourselves, with
    PDEATHSIG, before Megatron-Core starts its own."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    import multiprocessing
    import signal
    from multiprocessing.managers import SyncManager

    from ..runtime.processes import exit_with_parent

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=exit_with_parent, initargs=(signal.SIGKILL,))
    filesystem_async._results_queue = manager.Queue()


def _drop_missing_objects(sharded_sd: dict, ckpt_dir: Path) -> None:
    """``_extra_state`` objects (TE FP8 metadata) may be absent from checkpoints written by the
    local spec or by offline tools; they carry no weights, so skip them when missing."""
    present = _object_keys(ckpt_dir)

    def visit(d):
        for k in list(d.keys()):
            v = d[k]
            if isinstance(v, dict):
                visit(v)
            elif isinstance(v, ShardedObject) and v.key.endswith("_extra_state") and v.key not in present:
                del d[k]

    visit(sharded_sd)


def _object_keys(ckpt_dir: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    keys = set()
    for name in metadata.state_dict_metadata:
        # Sharded objects are stored as "<key>/shard_<offsets>_<world>".
        keys.add(name.split("/shard_")[0])
    return keys


def load_model_weights(model_chunks, path: str | os.PathLike, flag: str = "--load") -> dict:
    """Load only the weights of a checkpoint (any saved layout) into ``model_chunks``."""
    ckpt_dir, _ = fmt.resolve(path, flag)
    manifest = fmt.read_manifest(ckpt_dir)
    sharded = _model_sharded_state_dict(model_chunks)
    _drop_missing_objects(sharded, ckpt_dir)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    _assign_model(model_chunks, loaded)
    return manifest


def _assign_model(model_chunks, loaded: dict) -> None:
    for i, chunk in enumerate(model_chunks):
        key = f"model{i}" if len(model_chunks) > 1 else "model"
        unwrap(chunk).load_state_dict(loaded[key], strict=True)


def check_compatible(cfg, manifest: dict, source: str) -> None:
    """Refuse a checkpoint whose architecture differs from the configured model."""
    saved = manifest.get("model", {})
    want = cfg.model.architecture()
    for key, value in want.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"{source} was saved with {key}={saved[key]!r} but this run has {key}={value!r}; "
                f"set --{key.replace('_', '-')} {saved[key]} or load a matching checkpoint."
            )
    if saved.get("num_experts") != cfg.model.num_experts:
        raise ValueError(
            f"{source} has num_experts={saved.get('num_experts')!r} but this run has "
            f"--num-experts {cfg.model.num_experts!r}."
        )
    saved_expert_ffn = saved.get("moe_ffn_hidden_size") or saved.get("ffn_hidden_size")
    if saved.get("num_experts") and saved_expert_ffn != cfg.model.expert_ffn_hidden_size:
        raise ValueError(
            f"{source} has experts of FFN size {saved_expert_ffn} but this run has "
            f"{cfg.model.expert_ffn_hidden_size}; "
            + (f"set --moe-ffn-hidden-size {saved['moe_ffn_hidden_size']} (split experts are smaller than the "
               "dense FFN) or drop the flag where it is read from the checkpoint."
               if saved.get("moe_ffn_hidden_size") else "drop --moe-ffn-hidden-size.")
        )


def load_checkpoint(cfg, model_chunks, optimizer=None, scheduler=None) -> tuple[int, int]:
    """Resume (or, with ``--finetune``, start from) ``--load``. Returns (iteration, consumed)."""
    ck = cfg.checkpoint
    ckpt_dir, iteration = fmt.resolve(ck.load, "--load")
    manifest = fmt.read_manifest(ckpt_dir)
    check_compatible(cfg, manifest, f"--load {ck.load}")
    metadata = _sharding_metadata(cfg)
    state = _model_sharded_state_dict(model_chunks, metadata=metadata)

    load_optim = (
        optimizer is not None and not ck.finetune and not ck.no_load_optim
        and manifest.get("optimizer", {}).get("saved", False)
    )
    if load_optim:
        _check_optimizer_reshardable(cfg, manifest)
        _prime_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
        state["opt_param_scheduler"] = None  # common state: loaded as saved
    same_world = manifest.get("layout", {}).get("world_size") == torch.distributed.get_world_size()
    load_rng = not ck.finetune and not ck.no_load_rng and same_world
    if load_rng:
        state["rng_state"] = _rng_state_object()
    _drop_missing_objects(state, ckpt_dir)
    loaded = dist_checkpointing.load(state, str(ckpt_dir), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    _assign_model(model_chunks, loaded)
    if load_optim:
        with torch.no_grad():  # copies into fp32 main-param views of leaf parameters
            if cfg.parallel.use_distributed_optimizer:
                _load_distributed_optimizer_state(optimizer, loaded["optimizer"])
            else:
                optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and loaded.get("opt_param_scheduler") is not None:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        from megatron.core import tensor_parallel

        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if ck.finetune:
        return 0, 0
    return int(loaded.get("iteration", iteration)), int(loaded.get("consumed_samples", 0))


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prime_optimizer_state(optimizer) -> None:
    """Create zero Adam state (moments and a per-parameter ``step``) so that a sharded state dict
    can be built to load into.

    Without Apex/TE, Megatron's ``DistributedOptimizer.state_dict()`` reads torch Adam's
    per-parameter ``step`` tensors, which do not exist before the first step (its
    ``init_state_fn`` creates only the moments).
    """
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                    state["step"] = torch.zeros((), dtype=torch.float32)


def _load_distributed_optimizer_state(optimizer, loaded: Any) -> None:
    """Restore each ``DistributedOptimizer`` (one per chained optimizer) from its loaded state.

    ``DistributedOptimizer.load_state_dict`` alone is wrong with torch's Adam (no Apex/TE):
    it gives every parameter the SAME ``step`` tensor (so Adam's per-parameter ``step += 1``
    advances it once per parameter), the dp_reshardable loader then overwrites that step with
    the placeholder captured when the sharded state dict was built (0 here: bias correction
    restarts), and the fully_reshardable loader never supplies ``step`` at all and fails with
    ``KeyError: 'step'``. So the common state (param groups incl. the saved step, grad scaler)
    is loaded first, the per-parameter tensors (fp32 main params, moments) are loaded with
    ``step`` taken out of the inner state, and each parameter then gets its own step tensor
    holding the saved value.
    """
    opts = _inner_optimizers(optimizer)
    if len(opts) == 1:
        per_opt = [loaded]
    else:
        if len(loaded) != len(opts):
            raise ValueError(f"checkpoint holds {len(loaded)} optimizer states; this run has {len(opts)}")
        per_opt = [v for _, v in sorted(loaded.items())]
    for opt, state in zip(opts, per_opt):
        state = dict(state)
        param_state = state.pop("param_state", None)
        sharding_type = state.pop("param_state_sharding_type", None)
        opt.load_state_dict(state)
        inner = opt.optimizer
        steps = {float(s["step"]) for s in inner.state.values() if isinstance(s.get("step"), torch.Tensor)}
        if len(steps) > 1:
            raise RuntimeError(f"inconsistent Adam steps after loading the optimizer: {sorted(steps)}")
        for s in inner.state.values():
            s.pop("step", None)
        if param_state is not None:
            if sharding_type == "dp_reshardable":
                opt.load_parameter_state_from_dp_reshardable(param_state)
            elif sharding_type == "fully_reshardable":
                opt.load_parameter_state_from_fully_reshardable(param_state)
            else:
                raise NotImplementedError(f"distributed optimizer sharding type {sharding_type!r}")
        if steps:
            step = steps.pop()
            for s in inner.state.values():
                s["step"] = torch.tensor(step, dtype=torch.float32)
    if len(opts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        # Same as ChainedOptimizer.load_state_dict does (TE/Apex keep the step in param groups).
        optimizer._synchronize_steps()


def _check_optimizer_reshardable(cfg, manifest: dict) -> None:
    saved_layout = manifest.get("layout", {})
    opt = manifest.get("optimizer", {})
    current = layout(cfg)
    fields = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
              "expert_tensor_parallel_size", "data_parallel_size", "virtual_pipeline_size")
    changed = [f for f in fields if saved_layout.get(f) != current.get(f)]
    if opt.get("distributed") != cfg.parallel.use_distributed_optimizer:
        raise ValueError(
            f"--load {cfg.checkpoint.load}: optimizer state was saved "
            f"{'with' if opt.get('distributed') else 'without'} --use-distributed-optimizer; "
            "match that flag or pass --no-load-optim to start a fresh optimizer."
        )
    if changed and opt.get("sharding_type") == "dp_reshardable":
        detail = ", ".join(f"{f} {saved_layout.get(f)} -> {current.get(f)}" for f in changed)
        raise ValueError(
            f"--load {cfg.checkpoint.load}: the parallel layout changed ({detail}) but the "
            "distributed-optimizer state was saved in the dp_reshardable format, which cannot "
            "change model parallelism. Pass --no-load-optim (weights, iteration and scheduler "
            "still load), or re-save with --dist-ckpt-optim-fully-reshardable."
        )
