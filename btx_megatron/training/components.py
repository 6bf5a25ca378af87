"""The trainer's components, each owning one job and its own state: the metrics writer, the
per-domain evaluator, the exit-signal handler and the divergence guard. The loop in
:mod:`.trainer` calls them; it never formats a record or writes a file itself."""

from __future__ import annotations

import json
import math
import signal
from collections import deque
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

from ..checkpoint import write_text_atomic
from ..models import virtual_pipeline_size
from ..runtime.distributed import RunStopped, device
from .step import forward_step, microbatches


class TrainingStopped(RunStopped):
    """Training stopped on purpose (divergence, a failed save); the message says why and what
    to do. Entrypoints print it as one line and exit 1."""


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

class MetricsWriter:
    """``metrics.jsonl`` (one JSON record per log step and evaluation) and TensorBoard, rank 0.

    A resumed run first drops the records of iterations after the checkpoint it resumes from,
    so the file holds one record per iteration however often the run was interrupted."""

    def __init__(self, path: Path | None, tensorboard_dir: str | None, rank: int):
        self.path = path if rank == 0 else None
        self.tb = None
        if tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)

    def resume_at(self, iteration: int) -> int:
        """Keep the records up to ``iteration``; returns how many later ones were dropped."""
        if self.path is None or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1  # a line cut by a kill
                continue
            if int(rec.get("iteration", 0)) <= iteration:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            write_text_atomic(self.path, "".join(x + "\n" for x in kept))
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self._tensorboard(record)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        step = record.get("iteration", 0)
        kind = record.get("type", "train")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "iteration":
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)):
                        self.tb.add_scalar(f"{kind}/{k}/{kk}", vv, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------
# Evaluation during training
# --------------------------------------------------------------------------------------------

class Evaluator:
    """Loss and perplexity on the validation split and each ``--eval-domain`` set."""

    def __init__(self, cfg, setup, datasets: dict[str, Any]):
        self.cfg, self.setup, self.datasets = cfg, setup, datasets

    @torch.no_grad()
    def loss(self, dataset) -> float:
        s, t = self.setup, self.cfg.train
        model = s.model
        for chunk in model:
            chunk.eval()
        vp = virtual_pipeline_size(self.cfg)
        reads = (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
                 or parallel_state.is_pipeline_last_stage(ignore_virtual=True))
        dp_rank = parallel_state.get_data_parallel_rank()

        def iterator():
            return microbatches(dataset, 0, t.micro_batch_size, dp_rank, s.data_parallel_size) if reads else None

        data_iterator = [iterator() for _ in range(vp)] if vp else iterator()
        total = torch.zeros(2, dtype=torch.float64, device=device())
        for _ in range(self.cfg.logging.eval_iters):
            losses = s.forward_backward(
                forward_step_func=forward_step, data_iterator=data_iterator, model=model,
                num_microbatches=s.num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=True,
            )
            total += sum_lm_loss(losses)
        torch.distributed.all_reduce(total)
        for chunk in model:
            chunk.train()
        # Evaluation must not leak MoE aux losses into the next training log.
        clear_aux_losses_tracker()
        return (total[0] / total[1].clamp(min=1)).item()

    def run(self, iteration: int) -> dict[str, Any]:
        results: dict[str, Any] = {"iteration": iteration}
        for name, ds in self.datasets.items():
            label = name.split(":", 1)[1] if name.startswith("domain:") else name
            loss = self.loss(ds)
            results[label] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        return results


def sum_lm_loss(losses: list[dict]) -> torch.Tensor:
    """(loss sum, tokens) of this rank's micro batches; zero except on the rank that reports
    (the last pipeline stage, TP rank 0), so an all-reduce over the world counts each once."""
    total = torch.zeros(2, dtype=torch.float64, device=device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        for item in losses:
            total += item["lm loss"].to(torch.float64)
    return total


# --------------------------------------------------------------------------------------------
# Signals: SLURM sends SIGTERM/SIGUSR1 before pre-emption or the time limit.
# --------------------------------------------------------------------------------------------

class ExitSignal:
    """Records SIGTERM/SIGUSR1/SIGINT; the loop asks every rank at the end of each step."""

    def __init__(self, enabled: bool):
        self.received: int | None = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------

class DivergenceGuard:
    """Stops training on a non-finite loss or gradient norm, and on a loss spike: a loss more
    than ``factor`` times the mean of the last ``window`` losses (after ``window`` steps).

    Every rank sees the same all-reduced loss and global gradient norm, so every rank decides
    the same way without a collective."""

    def __init__(self, check_nan: bool, spike_factor: float | None, window: int):
        self.check_nan = check_nan
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, iteration: int, loss: float, grad_norm: float | None) -> str | None:
        """The reason to stop at ``iteration`` (None: all is well). ``grad_norm`` is None when
        the optimizer computes none (``--clip-grad 0``)."""
        if self.check_nan and not math.isfinite(loss):
            return f"iteration {iteration}: the loss is {loss} (not finite)"
        if self.check_nan and grad_norm is not None and not math.isfinite(grad_norm):
            return f"iteration {iteration}: the gradient norm is {grad_norm} (not finite)"
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return (f"iteration {iteration}: loss {loss:.4f} is more than {self.spike_factor:g}x the mean "
                        f"{mean:.4f} of the last {len(self.recent)} iterations (a loss spike)")
        self.recent.append(loss)
        return None
