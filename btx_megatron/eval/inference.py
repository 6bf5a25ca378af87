"""Logits of a loaded checkpoint for inference: per-token log-probabilities and next-token logits.

:class:`InferenceModel` runs a batch of token sequences through Megatron-Core's forward-only
schedule with the training step (:func:`btx_megatron.training.step.forward_step` with a
``logits_sink``), so every layout runs: TP (vocab-parallel logits, sequence parallelism), PP
(the schedule's p2p), EP (every rank feeds the same batch; the dispatcher exchanges tokens).
Sequences are right-padded: with causal attention a real position never sees padding, and the
BTX routers have no capacity limit except Switch (whose drop decisions can then depend on the
padding of the batch).

Numerical conventions (those of Hugging Face models and of lm-evaluation-harness's ``hf``
backend, so an exported checkpoint scores the same):

* The softmax runs over the tokenizer's vocabulary, not the padded one
  (``--make-vocab-size-divisible-by`` rows are dropped, as the HF export drops them). The
  perplexity evaluation keeps the training loss's padded softmax; see :mod:`.perplexity`.
* Log-probabilities are computed in float32 from the model's logits; with TP the log-sum-exp,
  the target logit and the arg-max are reduced across the tensor-parallel group, never
  gathering a ``[B, S, V]`` tensor. Next-token logits (generation) gather one row per sequence.

Every rank of the launch gets the same results (the last pipeline stage broadcasts them).

Legend: ``B`` batch, ``S`` padded sequence length, ``V`` vocabulary, ``Vl`` vocabulary slice of
this tensor-parallel rank, ``E`` experts.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import torch

from ..training.step import forward_step
from .loading import LoadedModel


@dataclasses.dataclass
class TokenScores:
    """Log-probability of each target token and whether it is the model's arg-max there."""

    logprobs: list[float]
    greedy: list[bool]


class InferenceModel:
    """A loaded checkpoint as a function from token sequences to scores and next-token logits."""

    def __init__(self, loaded: LoadedModel, *, pad_multiple: int = 8):
        from megatron.core import parallel_state

        self.loaded = loaded
        self.cfg = loaded.cfg
        self.setup = loaded.setup
        self.tokenizer = loaded.tokenizer
        self.vocab_size = int(self.cfg.model.vocab_size)         # the tokenizer's; HF's vocabulary
        self.max_length = int(self.cfg.model.seq_length)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        # Sequence parallelism splits the sequence over TP ranks: lengths are padded to a
        # multiple of TP (and of ``pad_multiple``, so few distinct shapes occur).
        self.pad_multiple = pad_multiple * self.tp // _gcd(pad_multiple, self.tp)
        self.pad_id = int(self.tokenizer.eod)
        self._expert_hooks: list = []
        self._expert_records: list[tuple[int, int, torch.Tensor]] = []

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def token_logprobs(self, inputs: list[list[int]], targets: list[list[int]]) -> list[TokenScores]:
        """For each sequence, log p(targets[i][t] | inputs[i][:t+1]) and the arg-max check.

        ``len(targets[i]) == len(inputs[i]) <= max_length``; one forward pass for the batch."""
        for i, (x, y) in enumerate(zip(inputs, targets)):
            if len(x) != len(y) or not x:
                raise ValueError(f"sequence {i}: {len(x)} inputs and {len(y)} targets (need equal, non-zero).")
        tokens, lengths = self._pad(inputs)
        target_BS = torch.zeros_like(tokens)
        for i, y in enumerate(targets):
            target_BS[i, : len(y)] = torch.tensor(y, dtype=torch.int64)

        def consume(batch, logits_BSVl):
            logp, argmax = vocab_parallel_logprobs(logits_BSVl, target_BS.to(logits_BSVl.device), self.vocab_size)
            return logp.cpu(), argmax.cpu()

        logp_BS, argmax_BS = self._run(tokens, consume)
        out = []
        for i, n in enumerate(lengths):
            out.append(TokenScores(logp_BS[i, :n].tolist(), (argmax_BS[i, :n] == target_BS[i, :n]).tolist()))
        return out

    @torch.no_grad()
    def next_token_logits(self, inputs: list[list[int]]) -> torch.Tensor:
        """Logits ``[B, V]`` (float32, CPU) of the token after each sequence's last one."""
        tokens, lengths = self._pad(inputs)
        last_B = torch.tensor([n - 1 for n in lengths], dtype=torch.int64)
        self._last_positions = last_B

        def consume(batch, logits_BSVl):
            rows = logits_BSVl[torch.arange(logits_BSVl.shape[0]), last_B.to(logits_BSVl.device)].float()
            return gather_vocab(rows)[:, : self.vocab_size].cpu()

        return self._run(tokens, consume)

    # ------------------------------------------------------------------ expert recording
    def record_experts(self, enabled: bool) -> None:
        """While enabled, :meth:`next_token_logits` also records, per sequence and MoE layer, the
        experts that routed each sequence's last position (read with :meth:`pop_experts`)."""
        from megatron.core.transformer.moe.router import Router

        for handle in self._expert_hooks:
            handle.remove()
        self._expert_hooks = []
        if not enabled:
            return
        for chunk in self.setup.model:
            for module in chunk.modules():
                if isinstance(module, Router):
                    self._expert_hooks.append(module.register_forward_hook(self._router_hook))

    def _router_hook(self, router, inputs, outputs) -> None:
        from megatron.core import parallel_state

        hidden = inputs[0]
        if hidden.dim() != 3:
            return
        s_local, b = hidden.shape[0], hidden.shape[1]
        routing_map = outputs[1].reshape(s_local, b, -1)
        # With sequence parallelism this rank routes positions [r * s_local, (r + 1) * s_local).
        first = parallel_state.get_tensor_model_parallel_rank() * s_local if self.cfg.parallel.sequence_parallel else 0
        last = self._last_positions
        for row in range(b):
            pos = int(last[row]) - first
            if 0 <= pos < s_local:
                self._expert_records.append((router.layer_number, row, routing_map[pos, row].nonzero().flatten().cpu()))

    def pop_experts(self, batch_size: int) -> list[dict[int, list[int]]]:
        """Per sequence: {MoE layer number: expert ids} for the last :meth:`next_token_logits`."""
        records = [(layer, row, ids.tolist()) for layer, row, ids in self._expert_records]
        self._expert_records = []
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        out: list[dict[int, list[int]]] = [{} for _ in range(batch_size)]
        for layer, row, ids in records:
            out[row].setdefault(layer, ids)  # TP/EP/DP peers record the same decision
        return [dict(sorted(d.items())) for d in out]

    # ------------------------------------------------------------------ internals
    def _pad(self, inputs: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        if not inputs:
            raise ValueError("no sequences to run")
        lengths = [len(x) for x in inputs]
        if min(lengths) < 1:
            raise ValueError("empty input sequence")
        if max(lengths) > self.max_length:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the model's {self.max_length}; "
                             "truncate it (lm-eval does) or evaluate with a larger --seq-length.")
        s = -(-max(lengths) // self.pad_multiple) * self.pad_multiple
        tokens = torch.full((len(inputs), s), self.pad_id, dtype=torch.int64)
        for i, x in enumerate(inputs):
            tokens[i, : len(x)] = torch.tensor(x, dtype=torch.int64)
        return tokens, lengths

    def _run(self, tokens_BS: torch.Tensor, consume: Callable[[dict, torch.Tensor], Any]) -> Any:
        """One forward pass of ``tokens_BS``; ``consume(batch, logits)`` on the last stage, its
        result returned on every rank."""
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        b, s = tokens_BS.shape
        batch = {"tokens": tokens_BS, "position_ids": torch.arange(s, dtype=torch.int64).expand(b, s).contiguous()}
        reads = (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
                 or parallel_state.is_pipeline_last_stage(ignore_virtual=True))
        results: list = []

        def sink(batch, logits):
            results.append(consume(batch, logits))

        self.setup.forward_backward(
            forward_step_func=partial(forward_step, logits_sink=sink), data_iterator=iter([batch]) if reads else None,
            model=self.setup.model, num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
        )
        clear_aux_losses_tracker()
        if self.pp > 1:
            box = [results[0] if results else None]
            torch.distributed.broadcast_object_list(
                box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
            return box[0]
        return results[0]


def _gcd(a: int, b: int) -> int:
    import math

    return math.gcd(a, b)


def _tp_group():
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None, 0
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()


def vocab_parallel_logprobs(logits_BSVl: torch.Tensor, target_BS: torch.Tensor,
                            vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [B, S], arg-max id [B, S]) over the first ``vocab_size`` ids, from this
    rank's vocabulary slice of the logits (reduced across the tensor-parallel group)."""
    group, tp_rank = _tp_group()
    logits = logits_BSVl.float()
    vl = logits.shape[-1]
    start = tp_rank * vl
    if start + vl > vocab_size:  # padded vocabulary rows: not part of the distribution
        logits = logits.clone()
        logits[..., max(0, vocab_size - start):] = float("-inf")
    local_max, local_arg = logits.max(-1)
    global_max = local_max.clone()
    if group is not None:
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - global_max.unsqueeze(-1)).sum(-1)
    local_t = target_BS - start
    in_range = (local_t >= 0) & (local_t < vl)
    target_logit = logits.gather(-1, local_t.clamp(0, vl - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(in_range, target_logit, torch.zeros_like(target_logit))
    argmax = torch.where(local_max == global_max, local_arg + start, torch.full_like(local_arg, torch.iinfo(torch.int64).max))
    if group is not None:
        torch.distributed.all_reduce(sum_exp, group=group)
        torch.distributed.all_reduce(target_logit, group=group)
        torch.distributed.all_reduce(argmax, op=torch.distributed.ReduceOp.MIN, group=group)
    return target_logit - (global_max + torch.log(sum_exp)), argmax


def gather_vocab(rows_BVl: torch.Tensor) -> torch.Tensor:
    """``[B, V / TP]`` vocabulary slices -> ``[B, V]`` on every tensor-parallel rank."""
    group, _ = _tp_group()
    if group is None:
        return rows_BVl
    parts = [torch.empty_like(rows_BVl) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, rows_BVl.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


__all__ = ["InferenceModel", "TokenScores", "gather_vocab", "vocab_parallel_logprobs"]
