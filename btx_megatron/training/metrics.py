"""Throughput accounting: tokens/s, TFLOP/s per device, device peak, MFU.

The FLOPs per token come from :mod:`btx_megatron.models.accounting` (the one home of the
formula: active parameters for MoE, causal attention, 3x forward for training).
"""

from __future__ import annotations

import functools
import resource
import time

import torch

from ..models.accounting import flops_per_token

__all__ = ["Throughput", "device_peak_tflops", "flops_per_token", "measured_matmul_tflops", "peak_memory_gib"]

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs (vendor figures, no sparsity).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0, "GH200": 989.0}


@functools.lru_cache(maxsize=1)
def measured_matmul_tflops(size: int = 1024, repeats: int = 8) -> float:
    """Achievable matmul TFLOP/s of this device in the run's dtype (used as CPU peak)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if dev == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return 2 * size**3 * repeats / elapsed / 1e12


def device_peak_tflops(override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the figure comes from)."""
    if override:
        return override, "--peak-tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{key} bf16 dense spec"
        return measured_matmul_tflops(8192, 10), "measured bf16 matmul"
    return measured_matmul_tflops(), "measured fp32 matmul (CPU)"


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is KiB on Linux: the process high-water mark.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the last logging window."""

    def __init__(self, model_cfg, seq_length: int, world_size: int, peak_override: float | None = None):
        self.flops_per_token = flops_per_token(model_cfg, seq_length)
        self.world_size = world_size
        self.peak, self.peak_source = device_peak_tflops(peak_override)

    def report(self, tokens: int, seconds: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        tflops_per_device = self.flops_per_token * tokens / seconds / self.world_size / 1e12
        return {
            "tokens_per_s": tokens / seconds,
            "tflops_per_device": tflops_per_device,
            "mfu": tflops_per_device / self.peak,
        }
