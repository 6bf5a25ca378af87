"""Throughput accounting: model FLOPs per token (active parameters for MoE), device peak, MFU."""

from __future__ import annotations

import functools
import resource
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs (vendor figures, no sparsity).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "B200": 2250.0, "GH200": 989.0}


def flops_per_token(model_cfg, seq_length: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token, counting matmuls.

    MoE layers count only the experts a token is routed to (plus the router), so MFU of a
    top-2 BTX model is comparable with that of a dense model of the same active size.
    Attention scores are counted with the causal half of the score matrix.
    """
    m = model_cfg
    h, hd = m.hidden_size, m.head_dim
    q_out = m.num_attention_heads * hd
    kv_out = 2 * m.num_query_groups * hd
    attn_proj = 2 * h * (q_out + kv_out) + 2 * q_out * h
    attn_scores = 2 * 2 * seq_length * q_out * 0.5
    ffn_mult = 3 if m.swiglu else 2
    if m.is_moe:
        if m.moe_router_type == "soft":
            active = m.num_experts
        elif m.moe_router_type in ("switch", "sample-top1"):
            active = 1
        else:
            active = m.moe_router_topk
        mlp = active * 2 * h * m.expert_ffn_hidden_size * ffn_mult + 2 * h * m.num_experts
    else:
        mlp = 2 * h * m.ffn_hidden_size * ffn_mult
    logits = 2 * h * m.padded_vocab_size
    forward = m.num_layers * (attn_proj + attn_scores + mlp) + logits
    return 3.0 * forward


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
