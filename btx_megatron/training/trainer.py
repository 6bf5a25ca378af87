"""The training loop every BTX stage uses (seed, branches, baselines, mix phase).

The loop body is a handful of calls: a step, then log, evaluate, save and stop checks, each
owned by a component (:mod:`.components`, :mod:`.checkpointer`). A stage adds its specifics
through :class:`StageHooks` (the mix phase: the merge provenance in every manifest).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

from ..config import Config
from ..data import build_domain_eval_datasets, build_pretraining_datasets, build_tokenizer, check_vocab_fits
from ..models import routers, virtual_pipeline_size
from .checkpointer import Checkpointer
from .components import DivergenceGuard, Evaluator, ExitSignal, MetricsWriter, TrainingStopped, sum_lm_loss
from .metrics import Throughput, peak_memory_gib
from .setup import TrainingSetup, setup_training
from .step import forward_step, microbatches


@dataclasses.dataclass
class TrainResult:
    iteration: int
    consumed_samples: int
    losses: list[float]                       # LM loss per iteration run in this process
    eval_history: list[dict[str, Any]]        # one entry per evaluation
    exit_reason: str                          # "finished", "signal", "exit-interval"


@dataclasses.dataclass
class StageHooks:
    """What a stage adds to the generic loop."""

    name: str = "pretrain"
    manifest_extra: dict[str, Any] | None = None
    """Fields merged into every checkpoint manifest this run writes (the mix phase: ``btx``)."""
    banner: str | None = None
    """A line printed once the run has started (rank 0)."""


class Trainer:
    def __init__(self, cfg: Config, *, argv: list[str] | None = None, hooks: StageHooks | None = None):
        self.cfg = cfg
        self.hooks = hooks or StageHooks()
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.setup: TrainingSetup = setup_training(cfg)
        self.model = self.setup.model
        self.iteration = 0
        self.consumed_samples = 0
        self.datasets: dict[str, Any] = {}
        self.checkpointer = Checkpointer(cfg, self.setup, argv=argv, stage=self.hooks.name,
                                         manifest_extra=self.hooks.manifest_extra)
        save = cfg.checkpoint.save
        metrics = cfg.logging.metrics_file or (str(Path(save) / "metrics.jsonl") if save else None)
        self.metrics = MetricsWriter(Path(metrics) if metrics else None, cfg.logging.tensorboard_dir, self.rank)
        self.throughput = Throughput(cfg.model, cfg.model.seq_length, self.world, cfg.logging.peak_tflops)
        t = cfg.train
        self.guard = DivergenceGuard(t.check_for_nan_in_loss_and_grad, t.spiky_loss_factor or None,
                                     t.spiky_loss_window)

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---------------------------------------------------------------- set-up
    def build_data(self) -> None:
        cfg = self.cfg
        d, t, lg = cfg.data, cfg.train, cfg.logging
        tokenizer = None
        tokenizer_type = d.tokenizer_type or ("NullTokenizer" if d.mock_data else None)
        if tokenizer_type is not None:
            tokenizer = build_tokenizer(tokenizer_type, d.tokenizer_model, cfg.model.vocab_size)
            check_vocab_fits(tokenizer, cfg.model.vocab_size)
        eval_interval = lg.eval_interval or t.train_iters or 1
        num_evals = t.train_iters // eval_interval + 1
        samples = (
            t.train_iters * t.global_batch_size,
            num_evals * lg.eval_iters * t.global_batch_size,
            0,  # no test split: per-domain sets are the held-out evaluation
        )
        if d.mock_data or d.data_path:
            train, valid, _ = build_pretraining_datasets(
                d, tokenizer, seq_length=cfg.model.seq_length, seed=t.seed, num_samples=samples
            )
            self.datasets["train"] = train
            if valid is not None:
                self.datasets["valid"] = valid
        if d.eval_domains:
            domains = build_domain_eval_datasets(
                d, tokenizer, seq_length=cfg.model.seq_length, seed=t.seed,
                num_samples=lg.eval_iters * t.global_batch_size,
            )
            for name, ds in domains.items():
                self.datasets[f"domain:{name}"] = ds

    def _data_iterators(self, dataset, start_sample: int):
        """One iterator per model chunk; only stages that embed or compute the loss read data."""
        t = self.cfg.train
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = self.setup.data_parallel_size
        vp = virtual_pipeline_size(self.cfg)
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if not (first or last):
            iterators = [None] * (vp or 1)
        else:
            # Each chunk consumes the same micro batches in the same order.
            iterators = [microbatches(dataset, start_sample, t.micro_batch_size, dp_rank, dp) for _ in range(vp or 1)]
        return iterators if vp else iterators[0]

    def load(self) -> None:
        ck, sched, t = self.cfg.checkpoint, self.setup.scheduler, self.cfg.train
        self.iteration, self.consumed_samples = self.checkpointer.load()
        if not ck.load:
            return
        if ck.finetune and sched is not None:
            sched.step(0)
        wanted_decay = max(t.lr_decay_iters or max(t.train_iters, 1), t.lr_warmup_iters + 1)
        if sched is not None and not ck.finetune and sched.lr_decay_steps != wanted_decay:
            # Megatron keeps the checkpoint's schedule on resume; say so when the flags differ.
            self._log(
                f"warning: the resumed LR schedule decays over {sched.lr_decay_steps} iterations (from the "
                f"checkpoint), not {wanted_decay}; set --lr-decay-iters when a run is extended."
            )
        self._log(f"loaded {ck.load} -> iteration {self.iteration}, consumed samples {self.consumed_samples}")

    # ---------------------------------------------------------------- one step
    def train_step(self, data_iterator) -> tuple[float, float | None, dict]:
        s, t = self.setup, self.cfg.train
        for chunk in self.model:
            chunk.zero_grad_buffer()
        s.optimizer.zero_grad()
        try:
            losses = s.forward_backward(
                forward_step_func=forward_step, data_iterator=data_iterator, model=self.model,
                num_microbatches=s.num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=t.micro_batch_size, forward_only=False,
            )
        except RuntimeError as exc:
            if "Unexpected result" not in str(exc):  # Megatron-Core's NaN/Inf gradient check
                raise
            # Its message names Megatron's own step counter (0 here); ours is the one to report.
            detail = str(exc).split("Unexpected result", 1)[1].strip()
            raise TrainingStopped(self._stop_message(
                f"iteration {self.iteration + 1}: a gradient is not finite ({detail})")) from None
        lr = s.optimizer.param_groups[0]["lr"]  # the LR this step uses
        update_ok, grad_norm, _ = s.optimizer.step()
        if update_ok:
            s.scheduler.step(increment=1)
        total = sum_lm_loss(losses)
        torch.distributed.all_reduce(total)
        loss = (total[0] / total[1].clamp(min=1)).item()
        return loss, float(grad_norm) if grad_norm is not None else None, {"skipped": not update_ok, "lr": lr}

    def _stop_message(self, reason: str) -> str:
        self.checkpointer.finish()  # an async save in flight is of a good iteration: publish it first
        latest = self.checkpointer.last_saved
        return (f"training stopped at {reason}. Nothing was saved after it; the last good checkpoint is "
                + (f"iteration {latest} in --save {self.cfg.checkpoint.save}" if latest is not None else "none")
                + ". Lower --lr or raise --clip-grad and restart from it; the guard is controlled by "
                "--check-for-nan-in-loss-and-grad and --spiky-loss-factor/--spiky-loss-window.")

    def _moe_stats(self, window_iters: int = 1) -> dict[str, Any]:
        if not self.cfg.model.is_moe:
            return {}
        out: dict[str, Any] = {}
        for name, entry in get_moe_layer_wise_logging_tracker().items():
            values = entry.get("values")
            if values is None:
                continue
            v = values.float()
            torch.distributed.all_reduce(v, group=parallel_state.get_pipeline_model_parallel_group())
            # The tracker sums over layers, micro batches and the iterations of the window.
            denom = max(self.setup.num_microbatches, 1) * max(self.cfg.model.num_layers, 1) * max(window_iters, 1)
            out[name] = v.sum().item() / denom
        clear_aux_losses_tracker()
        if self.cfg.logging.log_routing:
            stats = routers.routing_statistics(self.model)
            if stats:
                out["routing"] = stats
        return out

    def log_step(self, loss: float, grad_norm: float | None, info: dict, window_iters: int, elapsed: float) -> None:
        cfg = self.cfg
        t = cfg.train
        perf = self.throughput.report(t.global_batch_size * cfg.model.seq_length * window_iters, elapsed)
        moe = self._moe_stats(window_iters)
        record = {
            "type": "train", "iteration": self.iteration, "loss": loss, "lr": info["lr"],
            "grad_norm": grad_norm if grad_norm is not None else float("nan"),
            "consumed_samples": self.consumed_samples, "tokens": self.consumed_samples * cfg.model.seq_length,
            "iter_time_s": elapsed / window_iters, **perf, "peak_mem_gib": peak_memory_gib(),
            "skipped": info["skipped"], **moe,
        }
        self.metrics.write(record)
        extra = " ".join(f"{k} {v:.4f}" for k, v in moe.items() if isinstance(v, float))
        self._log(
            f"[{self.hooks.name}] iter {self.iteration}/{t.train_iters} | loss {loss:.4f} | lr {info['lr']:.3e} | "
            f"grad norm {record['grad_norm']:.3f} | {perf['tokens_per_s']:.0f} tok/s | "
            f"{perf['tflops_per_device']:.3f} TFLOP/s/device | MFU {100 * perf['mfu']:.1f}% | "
            f"mem {record['peak_mem_gib']:.2f} GiB" + (f" | {extra}" if extra else "")
        )

    def evaluate(self, evaluator: Evaluator) -> dict[str, Any]:
        results = evaluator.run(self.iteration)
        if len(results) > 1:
            text = " | ".join(f"{k} loss {v['loss']:.4f} ppl {v['ppl']:.2f}" for k, v in results.items() if k != "iteration")
            self._log(f"[eval] iteration {self.iteration}: {text}")
            self.metrics.write({"type": "eval", **results})
        return results

    def save(self, final: bool = False) -> None:
        # The last save of a run (end, signal, exit interval) is written before the process exits.
        path = self.checkpointer.save(self.iteration, self.consumed_samples, background=not final)
        if path is not None:
            self._log(f"saved checkpoint {path}")

    # ---------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        cfg = self.cfg
        t, lg, ck = cfg.train, cfg.logging, cfg.checkpoint
        self.load()
        self.build_data()
        if "train" not in self.datasets and t.train_iters > self.iteration:
            raise ValueError("No training data: pass --data-path (with a tokenizer) or --mock-data.")
        self.checkpointer.record_run()
        dropped = self.metrics.resume_at(self.iteration)
        if dropped:
            self._log(f"metrics: dropped {dropped} record(s) after iteration {self.iteration} (redone after resume)")
        evaluator = Evaluator(cfg, self.setup, {k: v for k, v in self.datasets.items() if k != "train"})
        signals = ExitSignal(ck.exit_signal_handler)
        self._log(
            f"{self.hooks.name}: {sum(p.numel() for c in self.model for p in c.parameters()):,} parameters on rank 0, "
            f"world {self.world}, DP {self.setup.data_parallel_size}, {self.setup.num_microbatches} micro batches, "
            f"peak {self.throughput.peak:.1f} TFLOP/s ({self.throughput.peak_source})"
        )
        if self.hooks.banner:
            self._log(self.hooks.banner)
        iterator = self._data_iterators(self.datasets["train"], self.consumed_samples) if "train" in self.datasets else None
        losses: list[float] = []
        eval_history: list[dict] = []
        exit_reason = "finished"
        window_start, window_iters = time.perf_counter(), 0
        loop_start = time.perf_counter()
        while self.iteration < t.train_iters:
            routers.set_router_step(self.model, self.iteration)
            loss, grad_norm, info = self.train_step(iterator)
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            stop = self.guard.check(self.iteration, loss, grad_norm)
            if stop:
                raise TrainingStopped(self._stop_message(stop))
            losses.append(loss)
            window_iters += 1
            last = self.iteration == t.train_iters
            if self.iteration % lg.log_interval == 0 or last:
                self.log_step(loss, grad_norm, info, window_iters, time.perf_counter() - window_start)
                window_start, window_iters = time.perf_counter(), 0
            if lg.eval_interval and self.iteration % lg.eval_interval == 0 and not last:
                eval_history.append(self.evaluate(evaluator))
                window_start = time.perf_counter()
            self.checkpointer.poll()  # publishes an async save (--async-save) once its files are written
            if self.checkpointer.due(self.iteration) and not last:
                self.save()
                window_start = time.perf_counter()
            if ck.exit_interval and self.iteration >= ck.exit_interval and not last:
                exit_reason = "exit-interval"
                break
            if signals.any_rank():
                exit_reason = "signal"
                self._log(f"exit signal received at iteration {self.iteration}: saving and exiting")
                break
        self.loop_seconds = time.perf_counter() - loop_start
        final_eval = self.evaluate(evaluator)
        eval_history.append(final_eval)
        if ck.save:
            self.save(final=True)
            self.checkpointer.write_summary({
                "stage": self.hooks.name, "iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "tokens": self.consumed_samples * cfg.model.seq_length,
                "flops": self.throughput.flops_per_token * self.consumed_samples * cfg.model.seq_length,
                "exit_reason": exit_reason, "eval": final_eval,
            })
        self.metrics.close()
        return TrainResult(self.iteration, self.consumed_samples, losses, eval_history, exit_reason)


def configure_logging() -> None:
    level = os.environ.get("BTX_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Megatron-Core warns about deprecations and CPU fallbacks on every run; keep errors only
    # unless the user asks for more.
    if "BTX_LOG_LEVEL" not in os.environ:
        logging.getLogger("megatron").setLevel(logging.ERROR)
