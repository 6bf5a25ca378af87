"""Run a function on N CPU processes with gloo.

Each rank gets RANK/WORLD_SIZE/MASTER_* like torchrun, so the code under test reads its launch
environment exactly as it does in production. Return values of every rank come back as a list;
an exception on any rank fails the call with that rank's traceback.

Ranks start through a fork server that has imported torch and Megatron-Core once (about 8 s of
CPU per process on this machine's cores, most of a short test's cost). The server is a fresh
interpreter with no threads, so its forks are as clean as a spawn; each rank still gets the
caller's environment of the moment (the server's own is from when it started).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from btx_megatron.runtime.distributed import free_port


# What the fork server imports once. There is one server per test process (multiprocessing's
# forkserver is process-wide and reads its preload list when it starts), shared with the fault
# tests' runs (tests/training/faultlib.py), so the list covers both.
PRELOAD = [
    "torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
    "megatron.core.pipeline_parallel", "megatron.core.transformer.moe.moe_layer",
    "megatron.core.dist_checkpointing", "btx_megatron.runtime.cpu_compat",
    "btx_megatron.training.trainer", "btx_megatron.pretrain", "btx_megatron.pretrain_mix",
    "torch.distributed.checkpoint",
]
_context = None


def forkserver_context():
    """The multiprocessing context whose processes fork from the preloaded server."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _worker(rank, world_size, port, fn, args, kwargs, out_dir, environ):
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        from btx_megatron.runtime.distributed import destroy

        try:
            destroy()
        except Exception:
            pass
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, world_size: int, *args, **kwargs) -> list:
    """``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; returns each rank's result."""
    forkserver_context()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, kwargs, out_dir, dict(os.environ)),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(value)
            results.append(value)
        return results
