"""One step of the model on data: batch -> forward -> loss.

Training, evaluation and routing analysis all run the model through Megatron-Core's pipeline
schedules with :func:`forward_step`, so a number computed anywhere in the project comes from the
same forward pass and the same per-token loss. The batch iterators address samples by index
(exact resume, data-parallel equivalence).

Legend: ``B`` micro batch size, ``S`` sequence length.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator

import torch

from ..runtime.distributed import device

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Dataset samples -> a micro batch of ``[B, S]`` tensors."""
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in BATCH_KEYS}


def microbatches(dataset, start_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """The endless stream of micro batches for this data-parallel rank, from ``start_sample``.

    Global sample order is the dataset order; one micro-batch step consumes
    ``micro_batch_size * dp_size`` samples and rank r takes its contiguous slice, so the global
    batch is the same set of samples for every DP size (DP equivalence) and resuming at
    ``consumed_samples`` continues the same stream (exact resume).
    """
    step = micro_batch_size * dp_size
    index = start_sample
    n = len(dataset)
    while True:
        first = index + dp_rank * micro_batch_size
        yield collate([dataset[(first + j) % n] for j in range(micro_batch_size)])
        index += step


def indexed_microbatches(dataset, num_samples: int, micro_batch_size: int, dp_rank: int,
                         dp_size: int) -> Iterator[dict]:
    """Micro batches over samples ``0 .. num_samples-1`` exactly once (evaluation).

    Each batch carries ``index`` (sample ids, ``[B]``). The last step is filled with repeats of
    sample 0 whose loss mask is zeroed and whose index is -1, so the result covers exactly
    ``num_samples`` sequences at any data-parallel size."""
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
        batch = collate(items)
        batch["index"] = torch.tensor(index, dtype=torch.int64)
        yield batch


def forward_step(data_iterator, model, *, sink: list | None = None, logits_sink: Callable | None = None):
    """Megatron-Core ``forward_step_func``: the model's per-token loss on the next micro batch.

    ``sink`` (evaluation): every micro batch's per-token losses are appended to it as
    ``{"index", "tokens", "labels", "loss" [B, S], "mask" [B, S]}`` (CPU, float64).
    ``logits_sink`` (inference: lm-eval, generation): the model runs without labels and, on the
    last pipeline stage, ``logits_sink(batch, logits)`` receives this rank's vocab-parallel
    logits ``[B, S, V / TP]``; the batch needs only ``tokens`` and ``position_ids``."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:
        # Middle pipeline stages read no data: their input arrives through p2p and they
        # compute no loss.
        return model(None, None, None), partial(loss_func, None, sink)
    dev = device()
    if logits_sink is not None:
        output = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), None)
        return output, partial(_logits_to_sink, batch, logits_sink)
    inputs = {k: batch[k].to(dev, non_blocking=True) for k in BATCH_KEYS}
    output = model(inputs["tokens"], inputs["position_ids"], None, labels=inputs["labels"])
    return output, partial(loss_func, {**batch, "loss_mask": inputs["loss_mask"]}, sink)


def loss_func(batch: dict[str, Any] | None, sink: list | None, output_tensor: torch.Tensor):
    """Per-token loss -> (masked sum, token count, report). Megatron divides the gradients by
    the global token count, so every token weighs the same at any micro-batch/DP split."""
    if batch is None:
        return output_tensor.sum() * 0, torch.zeros((), dtype=torch.int), {}
    mask = batch["loss_mask"].float()
    per_token = output_tensor.float()
    loss_sum = torch.sum(per_token.view(-1) * mask.view(-1))
    num_tokens = mask.sum()
    if sink is not None:
        sink.append({
            "index": batch.get("index"), "tokens": batch["tokens"], "labels": batch["labels"],
            "loss": per_token.detach().view(mask.shape).double().cpu(), "mask": mask.double().cpu(),
        })
    return loss_sum, num_tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach().clone(), num_tokens])}


def _logits_to_sink(batch: dict[str, Any], logits_sink: Callable, output_tensor: torch.Tensor):
    logits_sink(batch, output_tensor)
    return output_tensor.sum() * 0, torch.zeros((), dtype=torch.int), {}
