"""Per-device memory and throughput plan of a run, from its config alone (nothing is built).

:func:`memory_report` is the text a run prints at start; :func:`plan_report` adds the parameter
split and FLOPs / tokens-per-second expectations and is what ``--dry-run`` prints:

    python -m btx_megatron.pretrain --dry-run --nnodes 1 --nproc-per-node 8 <the run's flags>

Memory per device (bytes), for the pipeline stage that needs the most:

- weights: parameters x their dtype (routers are fp32 in every precision);
- gradients: Megatron-Core DDP keeps one fp32 gradient buffer of every local parameter (with
  or without the distributed optimizer; it only shards what is reduced into);
- optimizer: Adam's two fp32 moments, plus fp32 master weights under bf16/fp16; divided over
  the data-parallel ranks (experts: the expert-data-parallel ranks) with the distributed optimizer;
- activations: the tensors autograd keeps for backward per layer and micro batch (local spec:
  fused SDPA attention keeps Q, K, V and its output, SwiGLU keeps the FC1 output and both halves
  of the product, MoE layers keep the routed tokens of their local experts), times the micro
  batches a pipeline stage holds in flight under the 1F1B (or interleaved) schedule; with full
  recompute only each recompute block's input plus one block being recomputed;
- MoE dispatcher buffers: the gathered (allgather) or permuted and received (alltoall) token
  buffers of one MoE layer, alive while the layer runs;
- workspace: the logits and loss of one micro batch on the last stage and the largest
  parameter's transient ``.grad`` before it is added to the fp32 buffer.

These are estimates: allocator caching and fragmentation (GPU), communication buffers and
library workspaces (NCCL, cuBLAS, Transformer Engine) come on top; keep 10-20% headroom.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Sequence

from ..models.accounting import ParamCount, experts_per_token, flops_per_token, stage_parameters

GIB = 2**30
DEFAULT_MFU = 0.40
H100_BF16_PEAK_TFLOPS = 989.0   # dense bf16 tensor-core peak (vendor figure, no sparsity)
DEFAULT_DEVICE_MEMORY_GIB = 80.0

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device of pipeline stage ``pp_rank``."""

    pp_rank: int
    params: ParamCount
    weights: float
    gradients: float
    optimizer: float                 # as configured (distributed or not)
    optimizer_replicated: float      # every DP rank holds all states
    optimizer_distributed: float     # states sharded over (expert-)data-parallel ranks
    activations: float               # as configured (recompute or not)
    activations_no_recompute: float
    activations_full_recompute: float
    dispatcher_buffers: float
    workspace: float
    in_flight_microbatches: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace + self.dispatcher_buffers

    def total_with(self, *, distributed_optimizer: bool, recompute: bool) -> float:
        opt = self.optimizer_distributed if distributed_optimizer else self.optimizer_replicated
        act = self.activations_full_recompute if recompute else self.activations_no_recompute
        return self.weights + self.gradients + opt + act + self.workspace + self.dispatcher_buffers


@dataclasses.dataclass(frozen=True)
class Layout:
    """Group sizes of a run on ``world_size`` processes."""

    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    vp: int
    dp: int
    expert_dp: int
    num_microbatches: int

    @classmethod
    def of(cls, cfg, world_size: int) -> "Layout":
        p, t = cfg.parallel, cfg.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
        dp = world_size // (tp * pp)
        vp = 1
        if p.num_layers_per_virtual_pipeline_stage:
            vp = cfg.model.num_layers // (pp * p.num_layers_per_virtual_pipeline_stage)
        global_batch = t.global_batch_size or t.micro_batch_size * dp
        return cls(world_size, tp, pp, ep, etp, vp, dp, world_size // (ep * etp * pp),
                   max(global_batch // (t.micro_batch_size * dp), 1))


def _in_flight(layout: Layout, pp_rank: int) -> int:
    """Micro-batch chunks whose activations a stage holds at the peak of 1F1B (interleaved)."""
    if layout.pp == 1:
        return 1
    if layout.vp == 1:
        return min(layout.pp - pp_rank, layout.num_microbatches)
    warmup = (layout.pp - pp_rank - 1) * 2 + (layout.vp - 1) * layout.pp
    return min(warmup + 1, layout.num_microbatches * layout.vp)


def _layer_activation_bytes_per_token(m, layout: Layout, cfg, act: int, fused: bool) -> float:
    """Bytes autograd keeps for one layer, per token of a micro batch, on one rank.

    ``fused``: GPU kernels (fused norms, fused SwiGLU that keeps only its input); otherwise the
    local spec's PyTorch ops on CPU (RMSNorm keeps its input and the normalised input, SwiGLU
    keeps the FC1 output, the SiLU output, the linear half and the product)."""
    tp, etp = layout.tp, layout.etp
    h, d = m.hidden_size, m.head_dim
    nh, ng = m.num_attention_heads, m.num_query_groups
    hidden = h / tp if cfg.parallel.sequence_parallel else h   # SP keeps sequence shards
    norm = hidden * (1 if fused or m.normalization == "LayerNorm" else 2)
    attention = act * (
        norm + hidden                   # input norm; QKV input (the norm output)
        + (nh + 2 * ng) * d / tp        # QKV output (V is a view of it)
        + (nh + ng) * d / tp            # Q and K after the rotary embedding
        + nh * d / tp                   # attention output (also the projection's input)
    )
    if m.attention_backend == "unfused":
        # The score matrix: fp32 softmax output and the probabilities in the activation dtype.
        attention += nh / tp * m.seq_length * (4 + act)

    def mlp(ffn: float) -> float:
        if m.swiglu:
            return (3 if fused else 5) * ffn   # FC1 output 2F, product F (+ SiLU output, linear half)
        return 2 * ffn                          # FC1 output, activation output

    if not m.is_moe:
        return attention + act * (norm + hidden + mlp(m.ffn_hidden_size / tp))
    router_bytes = 4 if m.moe_router_dtype == "fp32" or act == 4 else act
    share = hidden / h   # the router sees this rank's sequence shard
    # Pre-MLP norm, router input, and the router's fp32 logits/probabilities/scores/map (E each).
    moe = act * norm + router_bytes * hidden + 4 * 4 * m.num_experts * share
    # Per routed token: the expert input, its FFN, and the probability-scaled FFN output.
    expert_ffn = m.expert_ffn_hidden_size / etp
    moe += _routed_tokens_per_token(m, layout) * act * (h + mlp(expert_ffn) + (0 if fused else expert_ffn))
    return attention + moe


def _routed_tokens_per_token(m, layout: Layout) -> float:
    """Token copies the local experts of one MoE layer process per token of a micro batch
    (balanced routing; averaged over layers when the first one routes differently)."""
    k = sum(experts_per_token(m, layer) for layer in range(1, m.num_layers + 1)) / m.num_layers
    # Tokens are gathered over the expert-TP x EP ranks from a 1/TP sequence shard each.
    return k * layout.etp / layout.tp


def _dispatcher_bytes(m, layout: Layout, tokens: int, act: int, dispatcher: str) -> float:
    if not m.is_moe:
        return 0.0
    tokens_in = tokens / layout.tp   # MoE with TP needs sequence parallelism
    routed = _routed_tokens_per_token(m, layout) * tokens
    if dispatcher == "allgather":
        gathered = tokens_in * layout.etp * layout.ep   # hidden states and routing probs
        return gathered * (act * m.hidden_size + 4 * m.num_experts)
    k = _routed_tokens_per_token(m, layout) * layout.tp / layout.etp   # experts per token
    return act * (tokens_in * k + routed) * m.hidden_size   # permuted to send, and received


def _largest_parameter(m, layout: Layout) -> int:
    h = m.hidden_size
    sizes = [m.padded_vocab_size // layout.tp * h, (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim // layout.tp * h]
    sizes.append(m.ffn_hidden_size * (2 if m.swiglu else 1) // layout.tp * h)
    if m.is_moe:
        sizes.append(m.expert_ffn_hidden_size * (2 if m.swiglu else 1) // layout.etp * h)
    return max(sizes)


def estimate_memory(cfg, world_size: int, pp_rank: int = 0, *, gpu: bool | None = None) -> MemoryEstimate:
    """Memory of one device of pipeline stage ``pp_rank`` for ``cfg`` on ``world_size`` ranks.

    ``gpu``: estimate for GPU kernels (fused norms and SwiGLU) or for the CPU path; default:
    what this machine has."""
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    m, t, prec = cfg.model, cfg.train, cfg.precision
    layout = Layout.of(cfg, world_size)
    params = stage_parameters(m, cfg.parallel, pp_rank)
    dtype = prec.params_dtype_name
    wbytes = _DTYPE_BYTES[dtype]
    act = wbytes
    num_routers = (m.num_layers // layout.pp) if m.is_moe else 0
    router_params = num_routers * m.num_experts * m.hidden_size if m.is_moe else 0
    weights = (params.total - router_params) * wbytes + router_params * 4
    gradients = params.total * 4.0
    per_param_state = 8 + (4 if dtype != "fp32" else 0)   # Adam moments (+ fp32 master weights)
    replicated = params.total * per_param_state
    distributed = params.dense * per_param_state / layout.dp + params.expert * per_param_state / layout.expert_dp
    optimizer = distributed if cfg.parallel.use_distributed_optimizer else replicated

    tokens = t.micro_batch_size * m.seq_length
    layers_per_chunk = m.num_layers // (layout.pp * layout.vp)
    in_flight = _in_flight(layout, pp_rank)
    per_layer = _layer_activation_bytes_per_token(m, layout, cfg, act, fused=gpu) * tokens
    hidden = m.hidden_size / layout.tp if cfg.parallel.sequence_parallel else m.hidden_size
    last = pp_rank == layout.pp - 1
    vocab_shard = m.padded_vocab_size / layout.tp
    # Last stage: final norm, output-layer input, and the fp32 softmax the loss keeps.
    head = ((2 if gpu else 3) * act * hidden + 4 * vocab_shard) * tokens if last else 0.0
    no_recompute = in_flight * layers_per_chunk * per_layer + head
    n = max(t.recompute_num_layers, 1)
    recompute_blocks = math.ceil(layers_per_chunk / n)
    full_recompute = in_flight * recompute_blocks * act * hidden * tokens + min(n, layers_per_chunk) * per_layer + head
    if t.recompute_granularity == "full":
        activations = full_recompute
    elif t.recompute_granularity == "selective" and m.attention_backend == "unfused":
        score = m.num_attention_heads / layout.tp * m.seq_length * (4 + act) * tokens
        activations = no_recompute - in_flight * layers_per_chunk * score
    else:
        activations = no_recompute
    # Transients: the 16-bit logits before the fp32 loss copy, and the largest weight's .grad.
    logits = (act * vocab_shard * tokens if act != 4 else 0.0) if last else 0.0
    workspace = logits + _largest_parameter(m, layout) * wbytes
    dispatcher = _dispatcher_bytes(m, layout, tokens, act, m.moe_token_dispatcher_type)
    return MemoryEstimate(pp_rank, params, weights, gradients, optimizer, replicated, distributed,
                          activations, no_recompute, full_recompute, dispatcher, workspace, in_flight)


def stage_estimates(cfg, world_size: int, *, gpu: bool | None = None) -> list[MemoryEstimate]:
    return [estimate_memory(cfg, world_size, r, gpu=gpu) for r in range(cfg.parallel.pipeline_model_parallel_size)]


def memory_report(cfg, world_size: int, device_memory_gib: float | None = None, *, gpu: bool | None = None) -> str:
    """The per-device memory table of ``cfg`` on ``world_size`` ranks (every pipeline stage).

    ``gpu``: for GPU kernels (default: what this machine has); ``device_memory_gib``: the
    device size the verdict is for (default: this GPU's, else 80 GiB)."""
    import torch

    if gpu is None:
        gpu = torch.cuda.is_available()
    if device_memory_gib is None:
        device_memory_gib = DEFAULT_DEVICE_MEMORY_GIB
        if torch.cuda.is_available():
            device_memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    estimates = stage_estimates(cfg, world_size, gpu=gpu)
    layout = Layout.of(cfg, world_size)
    p = cfg.parallel
    lines = [
        f"memory per device (estimate), world {world_size}: TP {layout.tp} PP {layout.pp}"
        + (f" (VP {layout.vp})" if layout.vp > 1 else "")
        + f" EP {layout.ep} ETP {layout.etp} DP {layout.dp} (expert DP {layout.expert_dp}), "
        f"{cfg.precision.params_dtype_name}, micro batch {cfg.train.micro_batch_size} x {cfg.model.seq_length}, "
        f"{layout.num_microbatches} micro batches per step; {'GPU' if gpu else 'CPU'} kernels",
    ]
    header = f"  {'':56}" + "".join(f"{'stage ' + str(e.pp_rank):>13}" for e in estimates)
    lines.append(header)

    def row(label, values):
        lines.append(f"  {label:56}" + "".join(f"{v / GIB:9.2f} GiB" for v in values))

    row("weights", [e.weights for e in estimates])
    row("gradients (fp32 buffer)", [e.gradients for e in estimates])
    row("optimizer, replicated", [e.optimizer_replicated for e in estimates])
    shards = f"DP {layout.dp}" + (f", experts over expert DP {layout.expert_dp}" if cfg.model.is_moe else "")
    row(f"optimizer, distributed ({shards})", [e.optimizer_distributed for e in estimates])
    row("activations, no recompute", [e.activations_no_recompute for e in estimates])
    row("activations, full recompute", [e.activations_full_recompute for e in estimates])
    if cfg.model.is_moe:
        row(f"MoE {cfg.model.moe_token_dispatcher_type} dispatcher buffers", [e.dispatcher_buffers for e in estimates])
    row("workspace (logits, weight grad)", [e.workspace for e in estimates])
    recompute = cfg.train.recompute_granularity == "full"
    row(f"total as configured{' (distributed optimizer' if p.use_distributed_optimizer else ' (replicated optimizer'}"
        f"{', recompute)' if recompute else ')'}", [e.total for e in estimates])
    for dist_opt in (False, True):
        for rec in (False, True):
            label = f"total, {'dist-opt' if dist_opt else 'replicated opt'}, {'recompute' if rec else 'no recompute'}"
            row(label, [e.total_with(distributed_optimizer=dist_opt, recompute=rec) for e in estimates])
    worst = max(e.total for e in estimates)
    verdict = "fits" if worst <= device_memory_gib * GIB * 0.9 else "does NOT fit"
    lines.append(f"  peak device as configured: {worst / GIB:.1f} GiB -> {verdict} in {device_memory_gib:.0f} GiB "
                 "(90% usable; allocator and communication buffers need the rest)")
    return "\n".join(lines)


def plan_report(cfg, world_size: int, *, mfu: float = DEFAULT_MFU, peak_tflops: float | None = None,
                device_memory_gib: float = DEFAULT_DEVICE_MEMORY_GIB, nnodes: int | None = None,
                gpu: bool = True) -> str:
    """The ``--dry-run`` report: parameters, memory, FLOPs and expected tokens/s per device
    (for GPU kernels unless ``gpu=False``)."""
    from ..models.accounting import active_parameters, total_parameters

    m, t = cfg.model, cfg.train
    layout = Layout.of(cfg, world_size)
    peak = peak_tflops or H100_BF16_PEAK_TFLOPS
    peak_source = "--peak-tflops" if peak_tflops else "H100 bf16 dense"
    total = total_parameters(m)
    lines = [
        f"plan: {world_size} devices" + (f" ({nnodes} node{'s' if nnodes > 1 else ''} x {world_size // nnodes})" if nnodes else "")
        + " -- config validated; nothing was built or loaded",
        f"model: {total.total / 1e9:.3f} B parameters ({total.dense / 1e9:.3f} B dense, {total.expert / 1e9:.3f} B expert), "
        f"{active_parameters(m) / 1e9:.3f} B active per token",
        "parameters per device:",
    ]
    for e in stage_estimates(cfg, world_size, gpu=gpu):
        lines.append(f"  stage {e.pp_rank}: {e.params.total / 1e6:10.2f} M  "
                     f"(dense {e.params.dense / 1e6:.2f} M, expert {e.params.expert / 1e6:.2f} M)")
    lines.append(memory_report(cfg, world_size, device_memory_gib, gpu=gpu))
    per_token = flops_per_token(m, m.seq_length)
    tokens_per_step = t.global_batch_size * m.seq_length if t.global_batch_size else t.micro_batch_size * layout.dp * m.seq_length
    step_flops = per_token * tokens_per_step
    tokens_per_s = world_size * peak * 1e12 * mfu / per_token
    lines += [
        f"compute: {per_token / 1e9:.2f} GFLOP per token (training, 3x forward, causal attention), "
        f"{step_flops / 1e15:.2f} PFLOP per step of {tokens_per_step:,} tokens",
        f"throughput at {100 * mfu:.0f}% MFU of {peak:.0f} TFLOP/s per device ({peak_source}): "
        f"{tokens_per_s:,.0f} tokens/s ({tokens_per_s / world_size:,.0f} per device), "
        f"{tokens_per_step / tokens_per_s:.2f} s per step",
    ]
    if t.train_iters:
        seconds = t.train_iters * tokens_per_step / tokens_per_s
        tokens = t.train_iters * tokens_per_step
        amount = f"{tokens / 1e9:.1f} B" if tokens >= 1e9 else f"{tokens / 1e6:.1f} M"
        duration = f"{seconds / 3600:.1f} h ({seconds / 86400:.2f} days)" if seconds >= 3600 else f"{seconds / 60:.1f} min"
        lines.append(f"  --train-iters {t.train_iters:,} = {amount} tokens in {duration}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# --dry-run options (entrypoint flags, not run configuration)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DryRun:
    world_size: int
    nnodes: int | None
    mfu: float
    device_memory_gib: float


_PLANNER_FLAGS = ("--world-size", "--nnodes", "--nproc-per-node", "--mfu", "--device-memory-gib")


def wants_dry_run(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for the planner (``--dry-run`` or one of its options)."""
    return any(a.split("=", 1)[0] in ("--dry-run", *_PLANNER_FLAGS) for a in argv)


def split_dry_run_args(argv: Sequence[str]) -> tuple[DryRun | None, list[str]]:
    """``--dry-run`` and its options out of an entrypoint's argv; (None, argv) without it."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--nnodes", type=int)
    parser.add_argument("--nproc-per-node", type=int)
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU)
    parser.add_argument("--device-memory-gib", type=float, default=DEFAULT_DEVICE_MEMORY_GIB)
    ns, rest = parser.parse_known_args(list(argv))
    if not ns.dry_run:
        given = [f for f in _PLANNER_FLAGS if any(a == f or a.startswith(f + "=") for a in argv)]
        if given:
            raise ValueError(f"{', '.join(given)} plan a layout and need --dry-run; add --dry-run or drop them.")
        return None, list(argv)
    if not 0 < ns.mfu <= 1:
        raise ValueError(f"--mfu {ns.mfu} must be a fraction in (0, 1], e.g. 0.4 for 40%.")
    if ns.world_size is not None and (ns.nnodes or ns.nproc_per_node):
        if ns.world_size != (ns.nnodes or 1) * (ns.nproc_per_node or 1):
            raise ValueError(f"--world-size {ns.world_size} disagrees with --nnodes {ns.nnodes} x "
                             f"--nproc-per-node {ns.nproc_per_node}; give one or make them agree.")
    world = ns.world_size
    if world is None and (ns.nnodes or ns.nproc_per_node):
        world = (ns.nnodes or 1) * (ns.nproc_per_node or 8)
    if world is None:
        from ..runtime.distributed import read_launch_env

        world = read_launch_env().world_size
    if world < 1:
        raise ValueError(f"--world-size {world} must be at least 1.")
    return DryRun(world, ns.nnodes, ns.mfu, ns.device_memory_gib), rest


def dry_run(cfg, plan: DryRun) -> str:
    """Validate ``cfg`` for the planned world size and return the plan (prints nothing)."""
    cfg.validate_layout(plan.world_size)
    return plan_report(cfg, plan.world_size, mfu=plan.mfu, peak_tflops=cfg.logging.peak_tflops,
                       device_memory_gib=plan.device_memory_gib, nnodes=plan.nnodes)
