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
across branch models. Works in one process (the usual case) and under torchrun/srun at
TP/PP/EP > 1 (Megatron's forward-only schedule; every rank returns the same result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint_format as fmt

_PPL_CAP = 50.0  # exp(50) ~ 5e21: an untrained model's perplexity is still printable


@dataclasses.dataclass
class EvalOptions:
    """What to evaluate and how; one set of options serves every checkpoint of a comparison."""

    domains: dict[str, list[str]]           # NAME -> indexed-dataset prefixes (held-out text)
    tokenizer_type: str | None = None       # default: the run_config.json next to the checkpoint
    tokenizer_model: str | None = None
    num_samples: int | None = None          # sequences per domain; None: the smallest domain's one pass
    seq_length: int | None = None           # default: the checkpoint's
    micro_batch_size: int = 4
    seed: int = 1234                        # order of the validation samples (same for every model)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    bf16: bool | None = None                # None: bf16 on CUDA, fp32 on CPU
    progress: bool = True
    # MoE only: route every token of a domain to one expert, by expert name (the merge manifest's
    # expert_names). "*" applies to every domain. An "oracle" routing of a merged BTX model
    # ({"math": "math", ...}) measures how much of each branch the merge keeps before any
    # router is trained.
    force_expert: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("No evaluation domains: pass --eval-domain NAME=PREFIX (one per domain).")
        self.domains = {k: [v] if isinstance(v, str) else list(v) for k, v in self.domains.items()}
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}.")
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}.")


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


# ---------------------------------------------------------------------------------------------
# Configuration from a checkpoint
# ---------------------------------------------------------------------------------------------

def tokenizer_from_run_config(path: str | Path) -> tuple[str | None, str | None]:
    """The tokenizer a trainer run recorded in ``ROOT/run_config.json`` (None, None if absent)."""
    p = Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        f = candidate / "run_config.json"
        if f.is_file():
            data = json.loads(f.read_text()).get("config", {}).get("data", {})
            if data.get("tokenizer_type"):
                return data.get("tokenizer_type"), data.get("tokenizer_model")
    return None, None


def resolve_tokenizer(path: str | Path, opts: EvalOptions) -> tuple[str, str | None]:
    if opts.tokenizer_type:
        return opts.tokenizer_type, opts.tokenizer_model
    tt, tm = tokenizer_from_run_config(path)
    if tt is None:
        raise ValueError(
            f"--load {path} has no run_config.json naming its tokenizer (merged and converted "
            "checkpoints have none); pass --tokenizer-type and --tokenizer-model."
        )
    return tt, tm


def build_eval_config(manifest: dict, opts: EvalOptions, tokenizer_type: str, tokenizer_model: str | None):
    """A :class:`Config` with the checkpoint's architecture and the requested evaluation layout."""
    from ..config import Config
    from ..config.schema import SECTIONS

    model_fields = {f.name for f in dataclasses.fields(SECTIONS["model"])}
    model = {k: v for k, v in manifest["model"].items() if k in model_fields}
    if opts.seq_length is not None:
        model["seq_length"] = opts.seq_length
        model["max_position_embeddings"] = max(opts.seq_length, model.get("max_position_embeddings") or 0)
    bf16 = torch.cuda.is_available() if opts.bf16 is None else opts.bf16
    tp = opts.tensor_model_parallel_size
    return Config.from_dict({
        "model": model,
        "parallel": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": opts.pipeline_model_parallel_size,
            "expert_model_parallel_size": opts.expert_model_parallel_size,
            "sequence_parallel": tp > 1,
        },
        "precision": {"bf16": bool(bf16)},
        "train": {"micro_batch_size": opts.micro_batch_size, "train_iters": 0, "seed": opts.seed},
        "data": {"eval_domains": opts.domains, "tokenizer_type": tokenizer_type, "tokenizer_model": tokenizer_model},
        "logging": {"eval_iters": 1},
    })


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

def _batches(dataset, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """Micro batches over sample indices 0..num_samples-1; rank r takes its slice of each step.

    The last step is filled with repeats of sample 0 whose loss mask is zeroed and whose index is
    -1, so the result covers exactly ``num_samples`` sequences at any data-parallel size."""
    step = micro_batch_size * dp_size
    for start in range(0, num_samples, step):
        first = start + dp_rank * micro_batch_size
        items, index = [], []
        for j in range(micro_batch_size):
            i = first + j
            item = dict(dataset[i if i < num_samples else 0])
            if i >= num_samples:
                item["loss_mask"] = torch.zeros_like(torch.as_tensor(item["loss_mask"]))
            items.append(item)
            index.append(i if i < num_samples else -1)
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items])
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["index"] = torch.tensor(index, dtype=torch.int64)
        yield batch


def _forward_step(data_iterator, model, *, sink: list):
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # middle pipeline stage: activations arrive through p2p
        return model(None, None, None), partial(_loss, sink, None)
    from ..runtime.distributed import device

    dev_batch = {k: v.to(device()) for k, v in batch.items() if k != "index"}
    output = model(dev_batch["tokens"], dev_batch["position_ids"], None, labels=dev_batch["labels"])
    return output, partial(_loss, sink, batch)


def _loss(sink: list, batch, output_tensor):
    if batch is None:
        zero = output_tensor.sum() * 0
        return zero, torch.zeros((), dtype=torch.int), {}
    mask = batch["loss_mask"].to(output_tensor.device).float()
    per_token = output_tensor.float().view(mask.shape)
    sink.append({
        "index": batch["index"], "tokens": batch["tokens"], "labels": batch["labels"],
        "loss": per_token.detach().double().cpu(), "mask": mask.double().cpu(),
    })
    loss_sum = (per_token * mask).sum()
    return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


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


@dataclasses.dataclass
class LoadedModel:
    path: str
    ckpt_dir: Path
    iteration: int
    manifest: dict
    cfg: Any
    setup: Any
    tokenizer: Any
    forced_experts: dict[str, str] | None = None  # domain -> expert name (EvalOptions.force_expert)


def load_for_eval(path: str | Path, opts: EvalOptions) -> LoadedModel:
    """Initialise distributed state (idempotent), build the checkpoint's model and load weights."""
    from ..data import build_tokenizer, check_vocab_fits
    from ..models import virtual_pipeline_size
    from ..runtime.distributed import initialize_distributed, read_launch_env
    from ..training.checkpointing import load_model_weights
    from ..training.setup import setup_training

    ckpt_dir, iteration = fmt.resolve(path, "--load")
    manifest = fmt.read_manifest(ckpt_dir)
    tokenizer_type, tokenizer_model = resolve_tokenizer(path, opts)
    cfg = build_eval_config(manifest, opts, tokenizer_type, tokenizer_model)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, cfg.model.vocab_size)
    check_vocab_fits(tokenizer, cfg.model.vocab_size)
    cfg.validate_layout(read_launch_env().world_size)
    initialize_distributed(cfg.parallel, cfg.train.seed, virtual_pipeline_size=virtual_pipeline_size(cfg))
    setup = setup_training(cfg, with_optimizer=False)
    load_model_weights(setup.model, path)
    for chunk in setup.model:
        chunk.eval()
    return LoadedModel(str(path), ckpt_dir, iteration, manifest, cfg, setup, tokenizer)


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
        return _batches(dataset, num_samples, mbs, dp_rank, dp) if reads else None

    data_iterator = [iterator() for _ in range(vp)] if vp else iterator()
    s.forward_backward(
        forward_step_func=partial(_forward_step, sink=sink), data_iterator=data_iterator, model=s.model,
        num_microbatches=steps, seq_length=cfg.model.seq_length, micro_batch_size=mbs, forward_only=True,
    )
    clear_aux_losses_tracker()
    return _gather(sink, num_samples, cfg.model.seq_length)


def expert_names(loaded: LoadedModel) -> list[str]:
    """The MoE checkpoint's expert names (merge manifest), else expert_0 ... expert_{N-1}."""
    n = loaded.cfg.model.num_experts or 0
    names = list((loaded.manifest.get("btx") or {}).get("expert_names") or [])
    return names if len(names) == n else [f"expert_{i}" for i in range(n)]


def _forced_experts(loaded: LoadedModel, force: dict[str, str] | None, domains: list[str]) -> dict[str, int]:
    """domain -> expert index for ``EvalOptions.force_expert`` (ValueError naming the fix)."""
    if not force:
        return {}
    if not loaded.cfg.model.is_moe:
        raise ValueError(f"--force-expert needs an MoE checkpoint; {loaded.path} is dense.")
    names = expert_names(loaded)
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
    loaded = load_for_eval(path, opts)
    datasets = build_eval_datasets(loaded.cfg, loaded.tokenizer, opts.num_samples)
    forced = _forced_experts(loaded, opts.force_expert, list(datasets))
    if forced:
        loaded.forced_experts = {d: expert_names(loaded)[i] for d, i in forced.items()}
    n = common_num_samples(datasets, opts.num_samples)
    out = {}
    for name, ds in datasets.items():
        started = time.perf_counter()
        with forced_routing(loaded.setup.model, forced.get(name)):
            out[name] = model_token_losses(loaded, ds, n)
        if opts.progress and _rank() == 0:
            tokens = int(out[name].mask.sum())
            elapsed = max(time.perf_counter() - started, 1e-9)
            print(f"[eval] {Path(str(path)).name} {name}: {n} sequences, {tokens:,} tokens, "
                  f"loss {out[name].mean():.4f}, {tokens / elapsed:,.0f} tokens/s", flush=True)
    return out, loaded


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


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
