"""Distributed start-up: rank/world/master from torchrun or srun, process groups, seeds.

Every tool imports this module, including ones that never build a model; ``megatron.core`` is
therefore imported only inside the functions that set up its model-parallel state."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import warnings
from typing import Callable, TypeVar

import numpy as np
import torch

from . import cpu_compat


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "srun" or "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``node[003-005,007],gpu12``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; srun sets SLURM_PROCID/SLURM_NTASKS.

    With srun the master is the first node of the job and the port is derived from the job
    id (so concurrent jobs on one node do not collide) unless MASTER_ADDR/PORT are set.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))),
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="srun",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def free_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free TCP port on this host for a rendezvous, not in ``taken``.

    Drawn from 20000-32000, below the kernel's ephemeral range (32768+ on Linux) where ports
    handed out to outgoing connections and ``bind(0)`` calls of other programs would soon
    collide with ours: a trainer binds its port only after its imports, seconds later."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port in 20000-32000 for a rendezvous")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_distributed(
    parallel, seed: int, *, virtual_pipeline_size: int | None = None, launch: LaunchEnv | None = None
) -> LaunchEnv:
    """Start torch.distributed and Megatron-Core's model-parallel groups for ``parallel``.

    ``parallel`` is a :class:`btx_megatron.config.ParallelConfig`. Idempotent for the
    process group; the model-parallel groups are rebuilt if they exist.
    """
    from megatron.core import parallel_state, tensor_parallel

    launch = launch or read_launch_env()
    init_process_group(launch, backend=parallel.distributed_backend,
                       timeout_minutes=parallel.distributed_timeout_minutes)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return launch


def init_process_group(launch: LaunchEnv | None = None, *, backend: str | None = None,
                       timeout_minutes: int = 10, megatron_on_cpu: bool = True) -> bool:
    """Start ``torch.distributed`` from the launch environment (nccl with CUDA, gloo without).
    Returns False when a process group already exists (nothing is started).

    ``megatron_on_cpu``: switch on the CPU compatibility layer for Megatron-Core (a no-op with
    CUDA); tools that never run Megatron-Core code leave it off and do not import it."""
    if megatron_on_cpu:
        cpu_compat.enable()
    if torch.distributed.is_initialized():
        return False
    launch = launch or read_launch_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    # The launch environment is authoritative; an inherited MASTER_PORT (e.g. from a parent
    # process that ran its own single-process group) must not override the port chosen here.
    os.environ["MASTER_ADDR"] = launch.master_addr
    os.environ["MASTER_PORT"] = str(launch.master_port)
    torch.distributed.init_process_group(
        backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return True


@contextlib.contextmanager
def tool_process_group(backend: str | None = "gloo"):
    """The process group of an offline tool (merge, expert edits): every process of a
    torchrun/srun launch, or a world of one when run plainly. Tensors stay on the CPU, hence
    gloo; Megatron-Core is not set up (a tool that builds a model calls
    :func:`initialize_distributed`). A group this call started is destroyed on exit; an
    existing one (the caller's) is used as it is."""
    started = init_process_group(backend=backend, megatron_on_cpu=False)
    try:
        yield
    finally:
        if started:
            destroy()


T = TypeVar("T")


def run_forked_group(body: Callable[[], T], workers: int, *, preload: tuple[str, ...] = (),
                     timeout_minutes: int = 10) -> T:
    """``body()`` on ``workers`` processes forked from this one, joined in one gloo process group:
    the group :func:`tool_process_group` gives a torchrun launch, without its start-up (torchrun
    imports torch, the tool and PyTorch's DCP again in every process; a forked worker inherits
    them). ``preload``: modules every worker will import, imported here once before the fork.
    Returns rank 0's result; a failure on any process is raised here, and the workers never
    outlive this process (:func:`.processes.fork_workers`). For one plain process: ValueError
    under torchrun/srun or inside an existing process group. ``workers == 1`` runs ``body`` here."""
    from .processes import fork_workers

    launch = read_launch_env()
    if launch.world_size > 1:
        size = "WORLD_SIZE" if launch.launcher == "torchrun" else "SLURM_NTASKS"
        raise ValueError(f"--workers {workers} forks worker processes on this machine and cannot be combined with "
                         f"{launch.launcher} ({size}={launch.world_size}): launch one process with --workers N, "
                         "or N processes with --workers 1.")
    if torch.distributed.is_initialized():
        raise ValueError(f"--workers {workers} forks worker processes with a process group of their own; this "
                         "process already belongs to one.")
    if workers == 1:
        return body()
    for name in preload:
        importlib.import_module(name)
    store_dir = tempfile.mkdtemp(prefix="btx-group-")

    def member(rank: int) -> T:
        # What torchrun would set, so that the launch environment reads the same in a worker.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(workers), LOCAL_RANK=str(rank))
        # A file rendezvous: no port to find, and nothing to clean up but the directory.
        store = torch.distributed.FileStore(os.path.join(store_dir, "store"), workers)
        torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=workers,
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
        try:
            return body()
        finally:
            destroy()

    try:
        return fork_workers(member, workers)[0]
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def set_seed(seed: int) -> None:
    """Same seed on every rank: weights are identical across DP, data order comes from the
    sampler. Pipeline stages draw different initial weights anyway (different layers)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast_object(obj, world: int):
    """Rank 0's ``obj`` on every rank (as it is in a world of one)."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def destroy() -> None:
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # not imported: nothing to tear down
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class RunStopped(RuntimeError):
    """A run stopped on purpose (divergence, a failed save): the message says why and what to
    do next. Entrypoints print it as one line and exit 1."""


def run_entrypoint(body) -> int:
    """Run an entrypoint body: user mistakes (ValueError) print one line and exit 2, a
    :class:`RunStopped` one line and exit 1; the process groups are always torn down."""
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        body()
    except ValueError as exc:  # includes checkpoint.CheckpointError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy()
    return 0
