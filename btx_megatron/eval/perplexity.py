"""Per-domain validation loss and perplexity of a checkpoint (dense or MoE).

:func:`evaluate_checkpoint` builds the model from the checkpoint's manifest (architecture,
expert count, router type), loads the weights from any saved layout, and runs the model's own
loss (``model(tokens, position_ids, None, labels=labels)``: Megatron-Core's per-token cross
entropy) over the first ``num_samples`` sequences of every domain's validation dataset
(``build_domain_eval_datasets``: the whole prefix, shuffled deterministically by ``seed``).

Properties the comparisons in the results table rely on:

* Every domain is scored on the same number of sequences (``num_samples``; by default the
  smallest domain's one-pass size), so each domain's perplexity rests on the same token count.
* Every model sees exactly the same sequences (same prefixes, seed and sequence length).
* The figure is ``sum(loss * loss_mask) / sum(loss_mask)`` over those sequences, a token
  average (not an average of per-batch means).
* The softmax runs over the *padded* vocabulary (``--make-vocab-size-divisible-by``), as in
  Megatron training; the padded ids never occur as targets, so they only take a little
  probability mass. This is the same for every model of one experiment (one tokenizer, one
  padding), so the comparison is unaffected.

:func:`per_token_losses` returns the per-token figures themselves; :mod:`.btm` mixes them
across branch models. The model is loaded by :func:`.loading.load_for_eval` and run by the
training step (:func:`btx_megatron.training.step.forward_step`): the same forward pass and the
same per-token loss as in training. Works in one process (the usual case) and under torchrun/srun at
TP/PP/EP > 1 (Megatron's forward-only schedule; every rank returns the same result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..training.step import forward_step, indexed_microbatches
from .loading import LoadedModel, ModelLoadOptions, load_for_eval, rank

_PPL_CAP = 50.0  # exp(50) ~ 5e21: an untrained model's perplexity is still printable


@dataclasses.dataclass(kw_only=True)
class EvalOptions(ModelLoadOptions):
    """What to evaluate and how; one set of options serves every checkpoint of a comparison.

    ``seed`` orders the validation samples (the same for every model)."""

    domains: dict[str, list[str]]           # NAME -> indexed-dataset prefixes (held-out text)
    num_samples: int | None = None          # sequences per domain; None: the smallest domain's one pass
    progress: bool = True
    # MoE only: route every token of a domain to one expert, by expert name (the merge manifest's
    # expert_names). "*" applies to every domain. An "oracle" routing of a merged BTX model
    # ({"math": "math", ...}) measures how much of each branch the merge keeps before any
    # router is trained.
    force_expert: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.domains:
            raise ValueError("No evaluation domains: pass --eval-domain NAME=PREFIX (one per domain).")
        self.domains = {k: [v] if isinstance(v, str) else list(v) for k, v in self.domains.items()}
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}.")


@dataclasses.dataclass
class TokenLosses:
    """One domain's evaluation sequences and the model's per-token loss on them."""

    tokens: torch.Tensor     # [n, s] int64 model inputs
    labels: torch.Tensor     # [n, s] int64 targets (tokens shifted by one)
    loss: torch.Tensor       # [n, s] float64 -log p(label | tokens[:t+1]); 0 where mask is 0
    mask: torch.Tensor       # [n, s] float64 loss mask

    def mean(self) -> float:
        return float((self.loss * self.mask).sum() / self.mask.sum().clamp(min=1))

    def summary(self) -> dict[str, Any]:
        loss = self.mean()
        return {"loss": loss, "ppl": perplexity(loss), "tokens": int(self.mask.sum().item()),
                "samples": int(self.tokens.shape[0])}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, _PPL_CAP))


def summarize(domain_results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Average over domains (unweighted: each domain counts once, as in the BTX paper's tables).

    ``average_ppl`` is the mean of the domain perplexities; ``average_loss`` the mean loss."""
    losses = [r["loss"] for r in domain_results.values()]
    ppls = [r["ppl"] for r in domain_results.values()]
    return {"average_loss": sum(losses) / len(losses), "average_ppl": sum(ppls) / len(ppls)}


def build_eval_datasets(cfg, tokenizer, num_samples: int | None) -> dict[str, Any]:
    """Validation datasets per domain (sorted names) and the common number of sequences."""
    from ..data import build_domain_eval_datasets

    datasets = build_domain_eval_datasets(
        cfg.data, tokenizer, seq_length=cfg.model.seq_length, seed=cfg.train.seed, num_samples=num_samples
    )
    return datasets


def common_num_samples(datasets: dict[str, Any], requested: int | None) -> int:
    """``requested`` or, by default, the smallest domain's one-pass size (equal tokens per domain)."""
    if requested is not None:
        return requested
    return min(len(ds) for ds in datasets.values())


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------

def _gather(sink: list, num_samples: int, seq_length: int) -> TokenLosses:
    """Every rank's per-sample results, reassembled in sample order (identical on all ranks)."""
    from megatron.core import parallel_state

    holds = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
             and parallel_state.get_tensor_model_parallel_rank() == 0)
    mine = sink if holds else []
    world = torch.distributed.get_world_size()
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        records = [r for part in parts for r in part]
    else:
        records = mine
    out = {
        "tokens": torch.zeros(num_samples, seq_length, dtype=torch.int64),
        "labels": torch.zeros(num_samples, seq_length, dtype=torch.int64),
        "loss": torch.zeros(num_samples, seq_length, dtype=torch.float64),
        "mask": torch.zeros(num_samples, seq_length, dtype=torch.float64),
    }
    seen = torch.zeros(num_samples, dtype=torch.bool)
    for r in records:
        keep = r["index"] >= 0
        idx = r["index"][keep]
        # TP/EP/DP peers of one sample hold identical figures; the first copy wins.
        for k in out:
            out[k][idx] = r[k][keep].to(out[k].dtype)
        seen[idx] = True
    if not bool(seen.all()):
        raise RuntimeError(f"evaluation lost samples: {int((~seen).sum())} of {num_samples} not computed")
    out["loss"] = out["loss"] * out["mask"]
    return TokenLosses(**out)


@torch.no_grad()
def model_token_losses(loaded: LoadedModel, dataset, num_samples: int) -> TokenLosses:
    """Per-token loss of ``loaded`` on the first ``num_samples`` sequences of ``dataset``."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from ..models import virtual_pipeline_size

    if num_samples > len(dataset):
        raise ValueError(f"--num-samples {num_samples} exceeds the dataset's {len(dataset)} sequences.")
    cfg, s = loaded.cfg, loaded.setup
    mbs = cfg.train.micro_batch_size
    dp_rank, dp = parallel_state.get_data_parallel_rank(), s.data_parallel_size
    steps = math.ceil(num_samples / (mbs * dp))
    reads = (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
             or parallel_state.is_pipeline_last_stage(ignore_virtual=True))
    vp = virtual_pipeline_size(cfg)
    sink: list = []

    def iterator():
        return indexed_microbatches(dataset, num_samples, mbs, dp_rank, dp) if reads else None

    data_iterator = [iterator() for _ in range(vp)] if vp else iterator()
    s.forward_backward(
        forward_step_func=partial(forward_step, sink=sink), data_iterator=data_iterator, model=s.model,
        num_microbatches=steps, seq_length=cfg.model.seq_length, micro_batch_size=mbs, forward_only=True,
    )
    clear_aux_losses_tracker()
    return _gather(sink, num_samples, cfg.model.seq_length)


def _forced_experts(loaded: LoadedModel, force: dict[str, str] | None, domains: list[str]) -> dict[str, int]:
    """domain -> expert index for ``EvalOptions.force_expert`` (ValueError naming the fix)."""
    if not force:
        return {}
    if not loaded.cfg.model.is_moe:
        raise ValueError(f"--force-expert needs an MoE checkpoint; {loaded.path} is dense.")
    names = loaded.expert_names()
    unknown = sorted(set(force) - set(domains) - {"*"})
    if unknown:
        raise ValueError(f"--force-expert names domain(s) {unknown}; the domains are {domains}.")
    out = {}
    for d in domains:
        name = force.get(d, force.get("*"))
        if name is None:
            continue
        if name not in names:
            raise ValueError(f"--force-expert {d}={name}: the checkpoint's experts are {names}.")
        out[d] = names.index(name)
    return out


@contextlib.contextmanager
def forced_routing(model_chunks: list, expert: int | None):
    """Every router of ``model_chunks`` sends every token to ``expert`` with weight 1.

    The router's logits are replaced by a one-hot of height 60 (softmax weight 1 - e^-60 for the
    expert, for top-k and soft routing alike); token dispatch, expert parallelism and the
    experts' own computation are the model's, untouched. ``expert`` None: nothing changes.
    """
    from megatron.core.transformer.moe.router import Router

    if expert is None:
        yield
        return
    routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, Router)]

    def gating(input, router):
        logits = torch.zeros(*input.shape[:-1], router.weight.shape[0], dtype=torch.float32, device=input.device)
        logits[..., expert] = 60.0
        return logits

    for r in routers:
        r.gating = partial(gating, router=r)
    try:
        yield
    finally:
        for r in routers:
            del r.gating  # back to the class's method


def per_token_losses(path: str | Path, opts: EvalOptions) -> tuple[dict[str, TokenLosses], LoadedModel]:
    """Per-token losses of one checkpoint on every domain (same sequences for every model)."""
    loaded = load_for_eval(path, opts, domains=opts.domains)
    datasets = build_eval_datasets(loaded.cfg, loaded.tokenizer, opts.num_samples)
    forced = _forced_experts(loaded, opts.force_expert, list(datasets))
    if forced:
        loaded.forced_experts = {d: loaded.expert_names()[i] for d, i in forced.items()}
    n = common_num_samples(datasets, opts.num_samples)
    out = {}
    for name, ds in datasets.items():
        started = time.perf_counter()
        with forced_routing(loaded.setup.model, forced.get(name)):
            out[name] = model_token_losses(loaded, ds, n)
        if opts.progress and rank() == 0:
            tokens = int(out[name].mask.sum())
            elapsed = max(time.perf_counter() - started, 1e-9)
            print(f"[eval] {Path(str(path)).name} {name}: {n} sequences, {tokens:,} tokens, "
                  f"loss {out[name].mean():.4f}, {tokens / elapsed:,.0f} tokens/s", flush=True)
    return out, loaded


def evaluate_checkpoint(path: str | Path, domains: dict[str, list[str]] | None = None, *,
                        opts: EvalOptions | None = None, **options) -> dict[str, Any]:
    """Per-domain loss/perplexity of a dense or MoE checkpoint.

    ``evaluate_checkpoint(ckpt, {"math": [prefix]}, tokenizer_type=..., tokenizer_model=...,
    num_samples=64)`` (keywords are :class:`EvalOptions` fields) or ``opts=EvalOptions(...)``.
    Returns ``{"checkpoint", "iteration", "kind", "num_experts", "router_type", "seq_length",
    "num_samples", "domains": {name: {"loss", "ppl", "tokens", "samples"}}, "average_loss",
    "average_ppl"}``.
    """
    if opts is None:
        opts = EvalOptions(domains=domains or {}, **options)
    losses, loaded = per_token_losses(path, opts)
    domain_results = {name: tl.summary() for name, tl in losses.items()}
    m = loaded.cfg.model
    return {
        "checkpoint": str(loaded.ckpt_dir), "iteration": loaded.iteration,
        "kind": loaded.manifest.get("kind", "moe" if m.is_moe else "dense"),
        "num_experts": m.num_experts, "router_type": m.moe_router_type if m.is_moe else None,
        "router_topk": m.moe_router_topk if m.is_moe else None,
        "seq_length": m.seq_length, "num_samples": next(iter(losses.values())).tokens.shape[0],
        "forced_experts": loaded.forced_experts,
        "domains": domain_results, **summarize(domain_results),
    }


__all__ = ["EvalOptions", "LoadedModel", "TokenLosses", "build_eval_datasets", "common_num_samples", "evaluate_checkpoint",
           "forced_routing", "load_for_eval", "model_token_losses", "per_token_losses", "perplexity", "summarize"]
