"""The only new parameters of a BTX merge: the routers.

``random``    rows ~ N(0, init_method_std), seeded per layer (independent of the process layout).
``centroid``  rows point at each expert's domain: the mean hidden state entering the FFN of the
              branch's own model on its own data (Nexus-style), scaled to a random row's norm.

Only the centroid path builds a model (Megatron-Core), and only when the centroids are not
given precomputed (``--centroid-file``).
"""

from __future__ import annotations

import math

import torch

from .plan import ExpertPlan, mix_seed

ROUTER_INITS = ("random", "centroid")


def random_router(num_experts: int, hidden: int, std: float, seed: int, layer: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Router rows ~ N(0, std) (Megatron's init_method_std); independent of the process layout."""
    g = torch.Generator().manual_seed(mix_seed(seed, layer, 0x5E7))
    return (torch.randn(num_experts, hidden, generator=g, dtype=torch.float32) * std).to(dtype)


def centroid_router(centroids: torch.Tensor, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Router rows from per-expert mean hidden states [E, H].

    Each row is the unit-normalised centroid times ``std * sqrt(H)``, the expected norm of a
    randomly initialised row, so logits start at the scale a random router would give while
    pointing at each domain's mean direction.
    """
    c = centroids.to(torch.float64)
    norms = c.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a centroid is all zeros; its domain produced no hidden states.")
    rows = c / norms * (std * math.sqrt(c.shape[-1]))
    return rows.to(dtype)


def replicate_centroids(centroids: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """Per-source centroids [N, H] -> per-expert [E, H] for the plan's expert order."""
    if plan.method == "split":
        return centroids.repeat_interleave(plan.split, dim=0)
    if plan.method == "upcycle":
        return centroids[:1].expand(plan.num_experts, -1).clone()
    if plan.method == "blend":
        raise ValueError("--router-init centroid has no meaning for --blend-experts (every expert mixes all domains).")
    return centroids


def router_weight(router_init: str, num_experts: int, hidden: int, layer: int, *, std: float, seed: int,
                  plan: ExpertPlan, centroids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The [E, H] router of ``layer`` (``centroids``: [N, L, H] per source, for ``centroid``)."""
    if router_init == "random":
        return random_router(num_experts, hidden, std, seed, layer, dtype)
    return centroid_router(replicate_centroids(centroids[:, layer], plan), std, dtype)


def _as_prefixes(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def compute_centroids(sources, opts, model_config) -> tuple[torch.Tensor, dict]:
    """Per source, per layer: the mean hidden state entering the FFN of that branch's own model
    on its own data (``opts.centroid_data``: NAME -> prefixes). Returns ([N, L, H] float32, info).

    The *branch* model is used (not the averaged trunk): it is what produced each domain's
    representation and needs no extra merge pass. The hidden state is the pre-MLP-norm output
    (the router's input in the MoE layer). Every process builds the branch model in turn (one
    whole branch model at a time: the one phase where a process holds a full model) and runs
    1/W of the samples; sums are all-reduced. ``model_config(source)`` gives a ModelConfig.
    """
    from ..config.schema import ParallelConfig
    from ..runtime.distributed import initialize_distributed

    initialize_distributed(ParallelConfig(distributed_backend="gloo"), seed=opts.router_seed)
    seq = opts.centroid_seq_length or model_config(sources[0]).seq_length
    per_source, counts = [], []
    for src in sources:
        sums, count = _hidden_state_sums(src, model_config(src), opts, seq)
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(count)
        if count.item() == 0:
            raise ValueError(f"--centroid-data {src.name}={opts.centroid_data[src.name]} gave no tokens.")
        per_source.append((sums / count).float())
        counts.append(int(count.item()))
    info = {"hidden_state": "pre-MLP-norm output of each branch's own model",
            "data": dict(opts.centroid_data), "tokens": dict(zip([s.name for s in sources], counts)),
            "seq_length": seq, "samples": opts.centroid_samples}
    return torch.stack(per_source), info


def _hidden_state_sums(src, mcfg, opts, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of one source: (sum of pre-MLP-norm outputs [L, H] float64, tokens)."""
    from megatron.core.transformer.identity_op import IdentityOp

    from ..config.schema import Config, DataConfig
    from ..data.datasets import build_domain_eval_datasets
    from ..data.tokenizers import build_tokenizer
    from ..models import build_model_chunks, transformer_config
    from ..training.checkpointing import load_model_weights

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = Config(model=mcfg, data=DataConfig(
        eval_domains={src.name: _as_prefixes(opts.centroid_data[src.name])},
        tokenizer_type=opts.tokenizer_type, tokenizer_model=opts.tokenizer_model))
    tokenizer = build_tokenizer(opts.tokenizer_type, opts.tokenizer_model, mcfg.vocab_size)
    ds = build_domain_eval_datasets(cfg.data, tokenizer, seq_length=seq, seed=opts.router_seed,
                                    num_samples=opts.centroid_samples, flag="--centroid-data")[src.name]
    model = build_model_chunks(cfg, transformer_config(cfg))[0]
    load_model_weights([model], src.ckpt_dir, flag=src.flag)
    model.eval()
    sums = torch.zeros(mcfg.num_layers, mcfg.hidden_size, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)

    def hook(module, args, l, layer):
        x = args[0]
        if isinstance(layer.pre_mlp_layernorm, IdentityOp):  # TE: the norm is fused into fc1
            fc1, shape = layer.mlp.linear_fc1, (x.shape[-1],)
            if mcfg.normalization == "RMSNorm":
                x = torch.nn.functional.rms_norm(x, shape, fc1.layer_norm_weight, mcfg.norm_epsilon)
            else:
                x = torch.nn.functional.layer_norm(x, shape, fc1.layer_norm_weight, fc1.layer_norm_bias,
                                                   mcfg.norm_epsilon)
        sums[l] += x.detach().double().reshape(-1, x.shape[-1]).sum(0).cpu()

    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, l=l, layer=layer: hook(m, a, l, layer))
             for l, layer in enumerate(model.decoder.layers)]
    device = next(model.parameters()).device
    with torch.no_grad():
        for idx in range(rank, min(len(ds), opts.centroid_samples), world):
            tok = torch.as_tensor(ds[idx]["tokens"], dtype=torch.long, device=device).unsqueeze(0)
            model(tok, torch.arange(tok.shape[1], device=device).unsqueeze(0), None)
            count += tok.numel()
    for h in hooks:
        h.remove()
    return sums, count


__all__ = ["ROUTER_INITS", "centroid_router", "compute_centroids", "random_router", "replicate_centroids",
           "router_weight"]
