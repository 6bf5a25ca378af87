"""Model, wrapping, optimizer, scheduler and schedule for one run, read top to bottom."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from ..models import build_model_chunks, transformer_config, virtual_pipeline_size
from .freezing import FROZEN_ATTR, apply_freezing


@dataclasses.dataclass
class TrainingSetup:
    tconfig: TransformerConfig
    model: list[torch.nn.Module]           # DDP-wrapped chunks (one per virtual stage)
    optimizer: object | None
    scheduler: OptimizerParamScheduler | None
    forward_backward: Callable
    num_microbatches: int
    data_parallel_size: int


def setup_training(cfg, *, with_optimizer: bool = True) -> TrainingSetup:
    """Build this rank's model chunks, wrap them in DDP, and create optimizer and scheduler.

    The whole parallel set-up reads top to bottom here in numbered steps (model, mixed
    precision, DDP, optimizer, schedule, schedule hooks), as in torchtitan's parallelize step;
    only the option mappings onto Megatron-Core's DDP, optimizer and LR-schedule classes live in
    the helpers below."""
    p, t, prec = cfg.parallel, cfg.train, cfg.precision
    dp = parallel_state.get_data_parallel_world_size()
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)

    # 1. Model chunks from Megatron-Core specs.
    tconfig = transformer_config(cfg)
    chunks = build_model_chunks(cfg, tconfig)
    apply_freezing(chunks, t, cfg.model.num_experts)
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)

    # 2. Mixed precision: bf16/fp16 module with fp32 master weights in the optimizer.
    if prec.bf16 or prec.fp16:
        chunks = [Float16Module(tconfig, chunk) for chunk in chunks]

    # 3. Data-parallel wrapping (gradient buckets, reduce-scatter for the distributed optimizer).
    model = _wrap_ddp(cfg, tconfig, chunks)
    for chunk in model:
        chunk.broadcast_params()

    optimizer = scheduler = None
    if with_optimizer:
        # 4. Adam(W) through Megatron-Core (distributed optimizer shards fp32 state over DP).
        optimizer = _build_optimizer(cfg, tconfig, model)
        # 5. LR schedule in iterations: linear warmup, then decay to --min-lr.
        scheduler = _build_scheduler(t, optimizer)

    # 6. Schedule hooks: loss scaling, gradient sync, grad finalisation (per-token loss).
    tconfig.grad_scale_func = optimizer.scale_loss if optimizer is not None else None
    if p.overlap_grad_reduce:
        tconfig.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
        tconfig.grad_sync_func = [c.start_grad_sync for c in model] if len(model) > 1 else model[0].start_grad_sync
    if p.overlap_param_gather:
        tconfig.param_sync_func = [c.start_param_sync for c in model] if len(model) > 1 else model[0].start_param_sync
    tconfig.finalize_model_grads_func = finalize_model_grads

    forward_backward = get_forward_backward_func(
        pp_size=p.pipeline_model_parallel_size, vp_size=virtual_pipeline_size(cfg)
    )
    return TrainingSetup(tconfig, model, optimizer, scheduler, forward_backward, num_microbatches, dp)


def _wrap_ddp(cfg, tconfig: TransformerConfig, chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    """Megatron-Core DDP around each chunk; only the first chunk buckets its gradients."""
    p, t, prec = cfg.parallel, cfg.train, cfg.precision
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=prec.bf16 or prec.fp16,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=t.check_for_nan_in_loss_and_grad,
        bucket_size=None if not p.overlap_grad_reduce else 40_000_000,
    )
    return [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def _build_optimizer(cfg, tconfig: TransformerConfig, model: list[torch.nn.Module]):
    """Megatron-Core's Adam(W) over the DDP-wrapped chunks; biases, 1-D weights and frozen weights do not decay."""
    p, t, prec = cfg.parallel, cfg.train, cfg.precision
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=prec.bf16,
        fp16=prec.fp16,
        params_dtype=tconfig.params_dtype,
        loss_scale=prec.loss_scale,
        initial_loss_scale=prec.initial_loss_scale,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
    )
    overrides = get_standard_config_overrides(opt_config)
    # Weights frozen by a zero gradient (--train-experts) must not decay either.
    overrides[ParamKey(attr=FROZEN_ATTR)] = ParamGroupOverride(wd_mult=0.0)
    return get_megatron_optimizer(opt_config, model, config_overrides=overrides)


def _build_scheduler(t, optimizer) -> OptimizerParamScheduler:
    """The LR/weight-decay schedule of ``t`` (the train section), stepped once per iteration."""
    decay_iters = t.lr_decay_iters or max(t.train_iters, 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, t.lr_warmup_iters + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.train_iters, 1),
        wd_incr_style="constant",
        wsd_decay_steps=max(decay_iters // 10, 1) if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if t.lr_decay_style == "WSD" else None,
    )
