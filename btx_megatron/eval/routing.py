"""Routing analysis of a BTX MoE (paper Section 4.3.2): per evaluation domain and per MoE layer,
the fraction of tokens each expert receives (u_i) and its mean router probability (p_i).

:func:`analyze` loads a checkpoint at any TP/PP/EP/DP layout (one process, or every process of a
torchrun/srun launch), runs ``num_batches`` evaluation batches per domain through the model in
eval mode (sample-top1 routes by argmax, as at inference) and reads the counters the BTX routers
keep (:func:`btx_megatron.models.routers.routing_statistics`). :func:`write_report` writes
``routing.json`` and one heatmap per domain (layers x experts, expert names from the manifest).

Unlike the merge core this module runs a model: it is loaded by :func:`.loading.load_for_eval`
and run by the training step (:func:`btx_megatron.training.step.forward_step`); the aggregation
and plotting functions are pure.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as fmt
from ..training.step import forward_step, microbatches
from .loading import ModelLoadOptions, load_for_eval


@dataclasses.dataclass(kw_only=True)
class RoutingAnalysisOptions(ModelLoadOptions):
    load: str
    domains: dict[str, list[str]]          # NAME -> data prefixes (held-out text of that domain)
    output: str
    num_batches: int = 8                   # micro batches per domain per data-parallel rank
    overwrite: bool = False
    plots: bool = True


def _gather_layers(stats: dict[int, dict]) -> dict[int, dict]:
    """Union of every rank's per-layer figures (pipeline stages hold different layers)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return stats
    gathered: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, stats)
    merged: dict[int, dict] = {}
    for part in gathered:
        for layer, figures in part.items():
            merged.setdefault(layer, figures)  # DP/TP/EP peers hold identical reduced figures
    return dict(sorted(merged.items()))


def analyze(opts: RoutingAnalysisOptions) -> dict[str, Any]:
    """Run the analysis on every process of the launch; returns the report (same on all ranks)."""
    from megatron.core import parallel_state

    from ..data import build_domain_eval_datasets
    from ..models import routers
    from ..runtime.distributed import device

    if not opts.domains:
        raise ValueError("--data NAME=PREFIX is required (one per evaluation domain).")
    if opts.num_batches < 1 or opts.micro_batch_size < 1:
        raise ValueError("--num-batches and --micro-batch-size must be at least 1.")
    ckpt_dir, iteration = fmt.resolve(opts.load, "--load")
    manifest = fmt.read_manifest(ckpt_dir)
    if manifest.get("kind") != "moe" or not manifest.get("model", {}).get("num_experts"):
        raise ValueError(
            f"--load {opts.load} is a dense checkpoint; routing analysis needs an MoE "
            "(the output of tools/merge_branches.py or of btx_megatron.pretrain_mix)."
        )
    output = Path(opts.output)
    if output.exists() and any(output.iterdir()) and not opts.overwrite:
        raise ValueError(f"--output {output} exists and is not empty; pass --overwrite to replace it.")

    loaded = load_for_eval(opts.load, opts, domains=opts.domains, eval_iters=opts.num_batches)
    cfg, s, tokenizer = loaded.cfg, loaded.setup, loaded.tokenizer
    names = loaded.expert_names()
    dp_rank, dp = parallel_state.get_data_parallel_rank(), s.data_parallel_size
    rank = torch.distributed.get_rank()
    reads_data = parallel_state.is_pipeline_first_stage(ignore_virtual=True) or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    datasets = build_domain_eval_datasets(
        cfg.data, tokenizer, seq_length=cfg.model.seq_length, seed=cfg.train.seed,
        num_samples=opts.num_batches * opts.micro_batch_size * dp,
    )
    report: dict[str, Any] = {
        "checkpoint": str(ckpt_dir), "iteration": iteration, "expert_names": names,
        "router_type": cfg.model.moe_router_type, "router_topk": cfg.model.moe_router_topk,
        "num_batches": opts.num_batches, "micro_batch_size": opts.micro_batch_size,
        "seq_length": cfg.model.seq_length, "data_parallel_size": dp,
        "domains_data": {name: list(prefixes) for name, prefixes in opts.domains.items()}, "domains": {},
    }
    for name, dataset in datasets.items():
        started = time.perf_counter()
        routers.reset_routing_statistics(s.model)
        iterator = microbatches(dataset, 0, opts.micro_batch_size, dp_rank, dp) if reads_data else None
        total = torch.zeros(2, dtype=torch.float64, device=device())
        with torch.no_grad():
            losses = s.forward_backward(
                forward_step_func=forward_step, data_iterator=iterator, model=s.model,
                num_microbatches=opts.num_batches, seq_length=cfg.model.seq_length,
                micro_batch_size=opts.micro_batch_size, forward_only=True,
            )
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
            for item in losses:
                total += item["lm loss"].to(torch.float64)
        torch.distributed.all_reduce(total)
        layers = _gather_layers(routers.routing_statistics(s.model))
        loss = (total[0] / total[1].clamp(min=1)).item()
        report["domains"][name] = domain_summary(layers, names, loss)
        if rank == 0:
            tokens = opts.num_batches * opts.micro_batch_size * dp * cfg.model.seq_length
            elapsed = time.perf_counter() - started
            print(f"[routing] {name}: {tokens:,} tokens, {len(layers)} MoE layers, loss {loss:.4f}, "
                  f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s", flush=True)
    if rank == 0:
        write_report(report, output, plots=opts.plots, overwrite=opts.overwrite)
    torch.distributed.barrier()
    return report


def domain_summary(layers: dict[int, dict], names: list[str], loss: float) -> dict[str, Any]:
    """Per-layer figures of one domain plus the top expert per layer and the layer average."""
    summary: dict[str, Any] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "layers": {}}
    for layer, fig in sorted(layers.items()):
        fractions = fig["token_fraction"]
        summary["layers"][str(layer)] = {**fig, "top_expert": names[max(range(len(fractions)), key=fractions.__getitem__)]}
    if layers:
        n = len(layers)
        summary["mean_token_fraction"] = [sum(f["token_fraction"][i] for f in layers.values()) / n for i in range(len(names))]
        summary["mean_prob"] = [sum(f["mean_prob"][i] for f in layers.values()) / n for i in range(len(names))]
    return summary


def heatmap(domain: str, summary: dict[str, Any], names: list[str], path: Path) -> None:
    """Layers (rows) x experts (columns) of token fraction and mean probability, annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(summary["layers"])
    panels = (("token_fraction", "fraction of tokens"), ("mean_prob", "mean router probability"))
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.6 * len(names) * 2, 1.2 + 0.45 * len(layers)), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        values = [[summary["layers"][layer][key][e] for e in range(len(names))] for layer in layers]
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, max(max(r) for r in values)))
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set_title(f"{domain}: {title}")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 * image.get_clim()[1] else "white")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], output: str | Path, plots: bool = True, overwrite: bool = False) -> Path:
    """``routing.json`` and ``routing_<domain>.png`` into ``output``, written aside then moved in."""
    output = Path(output)
    staging = output.parent / f".staging-{output.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        fmt.write_json_atomic(staging / "routing.json", report)
        if plots:
            for domain, summary in report["domains"].items():
                if summary["layers"]:
                    heatmap(domain, summary, report["expert_names"], staging / f"routing_{domain}.png")
        fmt.publish_directory(staging, output, overwrite=overwrite or (output.exists() and not any(output.iterdir())))
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


__all__ = ["RoutingAnalysisOptions", "analyze", "domain_summary", "heatmap", "write_report"]
