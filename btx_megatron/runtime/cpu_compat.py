"""Run Megatron-Core on a machine without CUDA (tests, the built-in example).

Megatron-Core assumes CUDA in a few places that have nothing to do with the maths: it asks for
the current CUDA device and streams, saves CUDA RNG states in the tensor-parallel RNG tracker,
creates tensors with ``device="cuda"`` in the pipeline p2p code, checks parameter types by
their CUDA type names in the optimizer, and expects the alltoall MoE dispatcher's split sizes to
have been copied from the device to the host. gloo implements every collective the parallel layouts
use, so answering those assumptions is enough to run TP, PP (incl. interleaved), EP, DP and the
distributed optimizer on CPU processes.

This is the project's only patch of upstream behaviour. :func:`enable` is a no-op when CUDA is
available, so GPU runs never see it. Everything here is process-global and idempotent.
"""

from __future__ import annotations

import contextlib
import functools
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


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for tensors that already live on the host.

    Upstream assumption answered: the alltoall token dispatcher computes its all-to-all split
    sizes on the GPU and copies them device-to-host with ``as_numpy=True``; the upstream helper
    converts only CUDA tensors, so on CPU the splits stay tensors, and gloo's
    ``all_to_all_single`` refuses tensors as split sizes (it takes int sequences, which a numpy
    array is). Converting host tensors the same way gives the dispatcher the types it gets on a
    GPU. The token counts themselves are untouched.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _uneven_gather_along_first_dim(original):
    """``mappings._gather_along_first_dim`` that also gathers shards of different lengths.

    Upstream assumption answered: with sequence parallelism the alltoall dispatcher gathers a
    different number of tokens from each tensor-parallel rank (``output_split_sizes``) through
    ``torch.distributed.all_gather`` on a list of differently sized tensors, which NCCL accepts
    and gloo refuses ("invalid tensor size"). Here each shard is padded to the longest, gathered
    with the equal-size collective, and the padding is cut away: the same result, bit for bit.
    Equal splits and no splits go to the upstream function unchanged.
    """

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        sizes = None if output_split_sizes is None else [int(n) for n in output_split_sizes]
        if sizes is None or len(set(sizes)) == 1 or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        return torch.cat([gathered[i * longest : i * longest + n] for i, n in enumerate(sizes)])

    return gather


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import token_dispatcher

    tp_random._get_cuda_rng_state = _cpu_rng_get
    tp_random._set_cuda_rng_state = _cpu_rng_set
    # The dispatcher imported the helper by name: replace it where it is looked up.
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    from megatron.core.tensor_parallel import mappings

    # The sequence-parallel autograd functions look the helper up in their module at call time.
    mappings._gather_along_first_dim = _uneven_gather_along_first_dim(mappings._gather_along_first_dim)


def eager_megatron_fusions() -> bool:
    """Leave Megatron-Core's ``jit_fuser`` functions eager when CUDA is absent.

    Upstream assumption: a GPU, where ``jit_fuser`` (``torch.compile``, applied as a decorator
    while ``megatron.core`` is imported) fuses small elementwise kernels. Without CUDA the
    decorators only cost the import of TorchDynamo and Inductor, 2-3 s of every process's
    start-up, and a C++ compile at a helper's first call. Megatron-Core's own functions are
    returned as they are (the same maths, unfused); ``torch.compile`` of anything else is
    untouched. Must run before ``megatron.core`` is imported, so ``btx_megatron/__init__.py``
    calls it. Returns whether it is active."""
    if torch.cuda.is_available():
        return False
    real = torch.compile
    if getattr(real, "_btx_eager_megatron", False):
        return True

    @functools.wraps(real)
    def compile(model=None, **kwargs):
        if model is None:  # the decorator-with-options form
            return lambda fn: compile(fn, **kwargs)
        if getattr(model, "__module__", "").startswith("megatron."):
            return model
        return real(model, **kwargs)

    compile._btx_eager_megatron = True
    torch.compile = compile
    return True


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
