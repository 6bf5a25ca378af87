"""Text generation from any checkpoint and layout: greedy or temperature / top-k / top-p sampling,
stop sequences, a token budget, and (MoE) the experts that produced each token.

Why not Megatron-Core's inference engines: in megatron-core 0.19 ``StaticInferenceEngine`` runs
on top of ``DynamicInferenceEngine`` (falling back to the legacy static path only when the
dynamic one fails to build), and both assume CUDA beyond what the CPU compatibility layer
answers: the text-generation controller creates its sampling generator, buffers, events and a
copy stream on ``torch.cuda.current_device()`` and wraps steps in NVTX ranges; the dynamic
context's paged KV cache appends through a Triton kernel and decodes through flash-attention
(``flash_attn_with_kvcache`` / varlen kernels), neither of which exists on CPU. So generation
here is a plain loop over :class:`.inference.InferenceModel`: each step recomputes the whole
(sliding) window with the training forward pass — no KV cache, O(n^2) in the generated length —
which runs unchanged at every TP/PP/EP layout on CPU and GPU and is exactly the function the
log-likelihood evaluation scores. On a GPU cluster, long generations should go through
Megatron-Core's dynamic engine instead.

Sampling is identical on every rank: the logits are the same everywhere and every rank draws
from a generator seeded with ``seed``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from .inference import InferenceModel


@dataclasses.dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0        # 0: greedy (arg-max)
    top_p: float = 1.0              # nucleus sampling: the smallest set of tokens with this mass
    top_k: int = 0                  # 0: no top-k cut
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings (cut from the text)
    stop_at_eod: bool = True        # the end-of-document token ends a generation
    seed: int = 1234
    batch_size: int = 16
    record_experts: bool = False    # MoE: experts of the position that produced each token

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 = off), got {self.top_k}.")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}.")
        self.stop = [s for s in self.stop if s]


@dataclasses.dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]               # generated ids (a stop sequence's tokens included, eod excluded)
    text: str                       # decoded, cut before the first stop string
    finish_reason: str              # "eod", "stop" or "length"
    experts: list[dict[int, list[int]]] | None = None  # per token: {MoE layer: expert ids}


def filter_logits(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature-scaled logits with the tokens outside top-k / top-p set to -inf."""
    logits = logits_BV / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits_BV: torch.Tensor, opts: GenerationOptions, generator: torch.Generator) -> torch.Tensor:
    if opts.temperature == 0:
        return logits_BV.argmax(-1)
    probs = filter_logits(logits_BV.double(), opts.temperature, opts.top_k, opts.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_cut(text: str, stops: list[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s in text]
    return min(cuts) if cuts else None


def generate(model: InferenceModel, prompts: list[list[int]], opts: GenerationOptions) -> list[Generation]:
    """Continue every prompt (token ids); batches of ``opts.batch_size``, finished rows dropped.

    Prompts longer than the model's window keep their last tokens; the window slides as the
    text grows."""
    generator = torch.Generator().manual_seed(opts.seed)
    tok = model.tokenizer
    eod = int(tok.eod)
    results: list[Generation | None] = [None] * len(prompts)
    model.record_experts(opts.record_experts)
    try:
        for start in range(0, len(prompts), opts.batch_size):
            rows = list(range(start, min(start + opts.batch_size, len(prompts))))
            generated: dict[int, list[int]] = {i: [] for i in rows}
            experts: dict[int, list] = {i: [] for i in rows}
            active = list(rows)
            while active:
                windows = [(prompts[i] + generated[i])[-model.max_length:] for i in active]
                logits = model.next_token_logits(windows)
                chosen = choose_tokens(logits, opts, generator).tolist()
                routed = model.pop_experts(len(active)) if opts.record_experts else None
                still = []
                for j, i in enumerate(active):
                    token = int(chosen[j])
                    if opts.stop_at_eod and token == eod:
                        results[i] = _finish(tok, prompts[i], generated[i], experts[i], "eod", opts)
                        continue
                    generated[i].append(token)
                    if routed is not None:
                        experts[i].append(routed[j])
                    if opts.stop and _stop_cut(tok.detokenize(generated[i]), opts.stop) is not None:
                        results[i] = _finish(tok, prompts[i], generated[i], experts[i], "stop", opts)
                    elif len(generated[i]) >= opts.max_new_tokens:
                        results[i] = _finish(tok, prompts[i], generated[i], experts[i], "length", opts)
                    else:
                        still.append(i)
                active = still
    finally:
        model.record_experts(False)
    return results  # type: ignore[return-value]


def _finish(tok, prompt: list[int], tokens: list[int], experts: list, reason: str, opts: GenerationOptions) -> Generation:
    text = tok.detokenize(tokens) if tokens else ""
    cut = _stop_cut(text, opts.stop)
    if cut is not None:
        text = text[:cut]
    return Generation(list(prompt), list(tokens), text, reason, list(experts) if opts.record_experts else None)


def generate_text(model: InferenceModel, prompts: list[str], opts: GenerationOptions) -> tuple[list[Generation], dict[str, Any]]:
    """Prompts as text (no BOS: documents start as in training) -> generations and throughput."""
    ids = [model.tokenizer.tokenize(p) if p else [int(model.tokenizer.eod)] for p in prompts]
    started = time.perf_counter()
    out = generate(model, ids, opts)
    elapsed = max(time.perf_counter() - started, 1e-9)
    n = sum(len(g.tokens) for g in out)
    return out, {"generated_tokens": n, "seconds": elapsed, "tokens_per_second": n / elapsed}


__all__ = ["Generation", "GenerationOptions", "choose_tokens", "filter_logits", "generate", "generate_text"]
