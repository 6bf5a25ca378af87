"""Run Megatron-Core on a machine without CUDA (tests, the built-in example).

Megatron-Core assumes CUDA in a few places that have nothing to do with the maths: it asks for
the current CUDA device and streams, saves CUDA RNG states in the tensor-parallel RNG tracker,
creates tensors with ``device="cuda"`` in the pipeline p2p code, and checks parameter types by
their CUDA type names in the optimizer. gloo implements every collective the parallel layouts
use, so answering those assumptions is enough to run TP, PP (incl. interleaved), EP, DP and the
distributed optimizer on CPU processes.

This is the project's only patch of upstream behaviour. :func:`enable` is a no-op when CUDA is
available, so GPU runs never see it. Everything here is process-global and idempotent.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
from torch.overrides import TorchFunctionMode

_enabled = False
_lock = threading.Lock()

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and reports CUDA type names for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers test `param.type() == 'torch.cuda.FloatTensor'`.
            return _CUDA_TYPE_NAMES.get(args[0].dtype, "torch.cuda.FloatTensor")
        elif func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: ordering is trivial on one CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def wait(self, *args, **kwargs):
        pass


def _cpu_rng_get(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device *string* works as a `device=` argument everywhere, including inside autograd
    # backward functions, where the TorchFunctionMode below is not active.
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The "CUDA" generator is the CPU default generator (torch.manual_seed calls
    # manual_seed_all, which must not recurse).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.is_current_stream_capturing = lambda: False
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    cuda.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                      range=lambda *a, **k: contextlib.nullcontext())


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = _cpu_rng_get
    tp_random._set_cuda_rng_state = _cpu_rng_set


def enable() -> bool:
    """Switch the compatibility layer on when CUDA is absent. Returns whether it is active."""
    global _enabled
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _enabled:
            _patch_torch_cuda()
            _patch_megatron()
            # Stays pushed for the life of the process (it is how upstream's literal
            # device="cuda" tensors land on CPU).
            _CudaToCpuMode().__enter__()
            _enabled = True
    return True


def is_enabled() -> bool:
    return _enabled
