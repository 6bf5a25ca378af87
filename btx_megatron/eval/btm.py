"""Branch-Train-Merge (BTM) baseline: the domain branches kept as separate dense models and
ensembled at evaluation time, with the experts chosen per sequence from the text itself
(c-BTM style routing by tf-idf similarity).

Routing
    Each branch gets a *profile*: the tf-idf vector of a sample of its training data
    (``profile_samples`` sequences drawn from its training prefixes; token-id unigrams; the
    term frequency is the branch's summed token counts). IDF is computed over all sampled
    training sequences of all branches, ``idf(v) = log((1 + D) / (1 + df(v))) + 1`` (smoothed,
    so a token seen everywhere still counts a little). A context gets the same kind of vector
    (its token counts times the IDF), and its similarity to a branch is the cosine of the two.

Context (``context=``)
    ``"causal"`` (default): the prediction at position t (target ``tokens[t+1]``) is routed by
    the tokens the model has seen, ``tokens[0..t]``; weights change along the sequence and no
    token routes itself or any later token. Computed exactly with running counts per sequence
    (cost O(s * distinct tokens) per sequence, no model call).
    ``"prefix"``: one routing decision per sequence from its first ``prefix_fraction`` of tokens
    (c-BTM's "route with a prefix"); cheaper to think about, but the first tokens of the
    sequence are then scored with weights that saw them, a mild advantage to BTM. Both modes
    score every token of every sequence, so BTM's perplexity is on exactly the tokens the
    other models are scored on.

Mixture (``weighting=``)
    The top-``topk`` branches by similarity are kept; their weights are ``"softmax"`` of
    similarity / ``temperature`` over the kept branches (default, temperature 0.1, as c-BTM),
    ``"normalized"`` (similarities divided by their sum) or ``"uniform"`` (1/k). The loss is
    ``-log(sum_k w_k p_k(y))``; only each branch's probability of the target is needed, so the
    branches are run one after another (one model in memory at a time) and their per-token
    losses combined in log space.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from .perplexity import EvalOptions, TokenLosses, per_token_losses, perplexity, summarize

WEIGHTINGS = ("softmax", "normalized", "uniform")
CONTEXTS = ("causal", "prefix")


@dataclasses.dataclass
class BTMOptions:
    topk: int = 2
    weighting: str = "softmax"
    temperature: float = 0.1
    context: str = "causal"
    prefix_fraction: float = 0.5
    profile_samples: int = 256     # training sequences per branch for its tf-idf profile

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"--btm-topk must be >= 1, got {self.topk}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--btm-weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        if self.context not in CONTEXTS:
            raise ValueError(f"--btm-context must be one of {CONTEXTS}, got {self.context!r}.")
        if not self.temperature > 0:
            raise ValueError(f"--btm-temperature must be > 0, got {self.temperature}.")
        if not 0 < self.prefix_fraction <= 1:
            raise ValueError(f"--btm-prefix-fraction must be in (0, 1], got {self.prefix_fraction}.")
        if self.profile_samples < 1:
            raise ValueError(f"--btm-profile-samples must be >= 1, got {self.profile_samples}.")


# ---------------------------------------------------------------------------------------------
# tf-idf profiles and similarities (pure torch)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TfidfProfiles:
    names: list[str]
    idf: torch.Tensor        # [V] float64
    profiles: torch.Tensor   # [N, V] float64, unit L2 norm per branch

    def vector(self, tokens: torch.Tensor) -> torch.Tensor:
        """tf-idf vector [V] of a 1-D token sequence (unnormalised)."""
        counts = torch.bincount(tokens.reshape(-1).long(), minlength=self.idf.numel()).double()
        return counts[: self.idf.numel()] * self.idf

    def similarity(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [N] of a 1-D token sequence to every branch profile."""
        v = self.vector(tokens)
        return self.profiles @ v / v.norm().clamp(min=1e-300)

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "vocab_size": self.idf.numel(),
                "nonzero_terms": {n: int((p > 0).sum()) for n, p in zip(self.names, self.profiles)}}


def build_profiles(train_sequences: dict[str, torch.Tensor], vocab_size: int) -> TfidfProfiles:
    """Profiles from each branch's sampled training sequences ``{name: [m, s] int64}``."""
    names = list(train_sequences)
    if not names:
        raise ValueError("BTM needs at least one branch with training data (--btm-train-data NAME=PREFIX).")
    df = torch.zeros(vocab_size, dtype=torch.float64)
    term_counts = torch.zeros(len(names), vocab_size, dtype=torch.float64)
    num_docs = 0
    for b, name in enumerate(names):
        seqs = train_sequences[name].long()
        if seqs.numel() and int(seqs.max()) >= vocab_size:
            raise ValueError(f"branch {name}: token id {int(seqs.max())} >= vocabulary size {vocab_size}.")
        for seq in seqs:
            counts = torch.bincount(seq, minlength=vocab_size).double()
            df += (counts > 0).double()
            term_counts[b] += counts
            num_docs += 1
    idf = torch.log((1.0 + num_docs) / (1.0 + df)) + 1.0
    profiles = term_counts * idf
    profiles = profiles / profiles.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return TfidfProfiles(names, idf, profiles)


def context_similarities(tokens: torch.Tensor, profiles: TfidfProfiles, context: str = "causal",
                         prefix_fraction: float = 0.5) -> torch.Tensor:
    """Similarity [n, s, N] of each position's routing context to each branch profile."""
    n, s = tokens.shape
    out = torch.empty(n, s, len(profiles.names), dtype=torch.float64)
    if context == "prefix":
        length = max(1, math.ceil(s * prefix_fraction))
        for i in range(n):
            out[i] = profiles.similarity(tokens[i, :length]).unsqueeze(0)
        return out
    for i in range(n):
        # Running counts over the sequence's distinct ids: row t holds the counts of tokens[0..t].
        uniq, inverse = torch.unique(tokens[i].long(), return_inverse=True)
        running = torch.nn.functional.one_hot(inverse, uniq.numel()).double().cumsum(0)
        weighted = running * profiles.idf[uniq]
        dots = weighted @ profiles.profiles[:, uniq].T
        out[i] = dots / weighted.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return out


def mixture_weights(similarities: torch.Tensor, topk: int, weighting: str = "softmax",
                    temperature: float = 0.1) -> torch.Tensor:
    """Weights [..., N]: the top-k branches by similarity, zero for the others; rows sum to 1."""
    num = similarities.shape[-1]
    k = min(topk, num)
    top_vals, top_idx = similarities.topk(k, dim=-1)
    if weighting == "softmax":
        w = torch.softmax(top_vals / temperature, dim=-1)
    elif weighting == "normalized":
        clipped = top_vals.clamp(min=0)
        total = clipped.sum(-1, keepdim=True)
        w = torch.where(total > 0, clipped / total.clamp(min=1e-300), torch.full_like(clipped, 1.0 / k))
    elif weighting == "uniform":
        w = torch.full_like(top_vals, 1.0 / k)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")
    return torch.zeros_like(similarities).scatter(-1, top_idx, w)


def ensemble_losses(branch_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-log(sum_k w_k p_k(y)) per token, from per-branch losses [N, n, s] and weights [n, s, N]."""
    log_w = torch.log(weights.permute(2, 0, 1))  # log 0 = -inf drops the unselected branches
    return -torch.logsumexp(log_w - branch_losses, dim=0)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def sample_training_sequences(train_prefixes: dict[str, list[str]], cfg, tokenizer, num: int) -> dict[str, torch.Tensor]:
    """The first ``num`` sequences of each branch's training prefixes (shuffled by the seed)."""
    from ..data import build_domain_eval_datasets

    data_cfg = dataclasses.replace(
        cfg.data, eval_domains={k: [v] if isinstance(v, str) else list(v) for k, v in train_prefixes.items()})
    datasets = build_domain_eval_datasets(
        data_cfg, tokenizer, seq_length=cfg.model.seq_length, seed=cfg.train.seed, num_samples=None)
    out = {}
    for name in train_prefixes:
        ds = datasets[name]
        m = min(num, len(ds))
        out[name] = torch.stack([torch.as_tensor(ds[i]["tokens"]).long() for i in range(m)])
    return out


def combine(branch_results: dict[str, dict[str, TokenLosses]], profiles: TfidfProfiles,
            btm: BTMOptions) -> dict[str, Any]:
    """BTM figures per domain from every branch's per-token losses on the same sequences."""
    names = profiles.names
    missing = [n for n in names if n not in branch_results]
    if missing:
        raise ValueError(f"BTM branches {missing} have a training-data profile but no checkpoint.")
    domains = list(next(iter(branch_results.values())))
    results, selection = {}, {}
    for domain in domains:
        ref = branch_results[names[0]][domain]
        for name in names[1:]:
            other = branch_results[name][domain]
            if not (torch.equal(other.tokens, ref.tokens) and torch.equal(other.mask, ref.mask)):
                raise ValueError(
                    f"BTM: branch {name} was evaluated on different {domain} sequences than {names[0]}; "
                    "all branches must share the tokenizer and sequence length (pass --seq-length)."
                )
        sims = context_similarities(ref.tokens, profiles, btm.context, btm.prefix_fraction)
        weights = mixture_weights(sims, btm.topk, btm.weighting, btm.temperature)
        stacked = torch.stack([branch_results[n][domain].loss for n in names])
        loss = ensemble_losses(stacked, weights) * ref.mask
        mixed = TokenLosses(ref.tokens, ref.labels, loss, ref.mask)
        results[domain] = mixed.summary()
        mask = ref.mask.unsqueeze(-1)
        mean_w = (weights * mask).sum((0, 1)) / mask.sum().clamp(min=1)
        top1 = torch.nn.functional.one_hot(sims.argmax(-1), len(names)).double()
        top1_frac = (top1 * mask).sum((0, 1)) / mask.sum().clamp(min=1)
        selection[domain] = {"mean_weight": dict(zip(names, mean_w.tolist())),
                             "top1_fraction": dict(zip(names, top1_frac.tolist()))}
    return {"domains": results, "selection": selection, **summarize(results)}


def evaluate_btm(branch_paths: dict[str, str], train_prefixes: dict[str, list[str]],
                 domains: dict[str, list[str]] | None = None, *, opts: EvalOptions | None = None,
                 btm: BTMOptions | None = None, **options) -> dict[str, Any]:
    """BTM ensemble of ``branch_paths`` ({name: checkpoint}) routed by ``train_prefixes``.

    Keywords are :class:`EvalOptions` fields (tokenizer_type, tokenizer_model, num_samples, ...).
    Returns the same shape as :func:`evaluate_checkpoint` plus ``selection`` (per domain: mean
    mixture weight and top-1 fraction of every branch), ``branches`` (each branch alone, on the
    same sequences) and ``btm`` (the options)."""
    btm = btm or BTMOptions()
    if opts is None:
        opts = EvalOptions(domains=domains or {}, **options)
    if set(branch_paths) != set(train_prefixes):
        raise ValueError(
            f"--btm-train-data names {sorted(train_prefixes)} must match the branches {sorted(branch_paths)} "
            "(one NAME=PREFIX per --load NAME=CKPT)."
        )
    started = time.perf_counter()
    branch_results: dict[str, dict[str, TokenLosses]] = {}
    profiles = None
    vocab = None
    for name, path in branch_paths.items():
        losses, loaded = per_token_losses(path, opts)
        branch_results[name] = losses
        if vocab is not None and loaded.cfg.model.vocab_size != vocab:
            raise ValueError(f"BTM branch {name} has vocab_size {loaded.cfg.model.vocab_size}, others {vocab}.")
        vocab = loaded.cfg.model.vocab_size
        if profiles is None:
            samples = sample_training_sequences(train_prefixes, loaded.cfg, loaded.tokenizer, btm.profile_samples)
            profiles = build_profiles({n: samples[n] for n in branch_paths}, vocab)
        seq_length, num_samples = loaded.cfg.model.seq_length, next(iter(losses.values())).tokens.shape[0]
    combined = combine(branch_results, profiles, btm)
    return {
        "checkpoint": {n: str(p) for n, p in branch_paths.items()}, "kind": "btm",
        "btm": dataclasses.asdict(btm), "profiles": profiles.to_dict(),
        "seq_length": seq_length, "num_samples": num_samples,
        "branches": {n: {d: tl.summary() for d, tl in r.items()} for n, r in branch_results.items()},
        "elapsed_s": time.perf_counter() - started, **combined,
    }


__all__ = ["BTMOptions", "TfidfProfiles", "build_profiles", "combine", "context_similarities",
           "ensemble_losses", "evaluate_btm", "mixture_weights", "perplexity", "sample_training_sequences"]
