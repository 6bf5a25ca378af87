"""The training loop every BTX stage uses (seed, branches, baselines, mix phase)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

from .. import checkpoint_format as fmt
from ..config import Config, config_to_argv
from ..models import virtual_pipeline_size
from ..runtime.distributed import device
from . import checkpointing
from .metrics import Throughput, peak_memory_gib
from .setup import TrainingSetup, setup_training

log = logging.getLogger("btx_megatron")


@dataclasses.dataclass
class TrainResult:
    iteration: int
    consumed_samples: int
    losses: list[float]                       # LM loss per iteration run in this process
    eval_history: list[dict[str, Any]]        # one entry per evaluation
    exit_reason: str                          # "finished", "signal", "exit-interval"


# --------------------------------------------------------------------------------------------
# Data: deterministic micro batches addressed by consumed samples (exact resume).
# --------------------------------------------------------------------------------------------

def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}


def microbatches(dataset, start_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """Micro batch m of the stream, for this data-parallel rank.

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
        yield _collate([dataset[(first + j) % n] for j in range(micro_batch_size)])
        index += step


def _to_device(batch: dict) -> dict:
    dev = device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _forward_step(data_iterator, model, *, eval_mode: bool = False):
    batch = _to_device(next(data_iterator)) if data_iterator is not None else None
    # Middle pipeline stages need no data; Megatron passes their input through p2p.
    if batch is None:
        output = model(None, None, None)
        return output, partial(_loss_func, None)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask, output_tensor):
    """Per-token loss: (sum, tokens); Megatron divides gradients by the global token count."""
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses.view(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


# --------------------------------------------------------------------------------------------
# Signals: SLURM sends SIGTERM/SIGUSR1 before pre-emption or the time limit.
# --------------------------------------------------------------------------------------------

class ExitSignal:
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

class Trainer:
    def __init__(self, cfg: Config, *, argv: list[str] | None = None, stage: str = "pretrain"):
        self.cfg = cfg
        self.argv = argv
        self.stage = stage
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.setup: TrainingSetup = setup_training(cfg)
        self.model = self.setup.model
        self.tokenizer = None
        self.datasets: dict[str, Any] = {}
        self.iteration = 0
        self.consumed_samples = 0
        self.metrics_path: Path | None = None
        self.tb = None
        self.throughput = Throughput(cfg.model, cfg.model.seq_length, self.world, cfg.logging.peak_tflops)

    # ---------------------------------------------------------------- set-up helpers
    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _is_logging_rank(self) -> bool:
        return self.rank == 0

    def build_data(self) -> None:
        from ..data import build_domain_eval_datasets, build_pretraining_datasets, build_tokenizer, check_vocab_fits

        cfg = self.cfg
        d, t, lg = cfg.data, cfg.train, cfg.logging
        tokenizer_type = d.tokenizer_type or ("NullTokenizer" if d.mock_data else None)
        if tokenizer_type is not None:
            self.tokenizer = build_tokenizer(tokenizer_type, d.tokenizer_model, cfg.model.vocab_size)
            check_vocab_fits(self.tokenizer, cfg.model.vocab_size)
        eval_interval = lg.eval_interval or t.train_iters or 1
        num_evals = t.train_iters // eval_interval + 1
        samples = (
            t.train_iters * t.global_batch_size,
            num_evals * lg.eval_iters * t.global_batch_size,
            0,  # no test split: per-domain sets are the held-out evaluation
        )
        if d.mock_data or d.data_path:
            train, valid, _ = build_pretraining_datasets(
                d, self.tokenizer, seq_length=cfg.model.seq_length, seed=t.seed, num_samples=samples
            )
            self.datasets["train"] = train
            if valid is not None:
                self.datasets["valid"] = valid
        if d.eval_domains:
            domains = build_domain_eval_datasets(
                d, self.tokenizer, seq_length=cfg.model.seq_length, seed=t.seed,
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

    def prepare_output(self) -> None:
        ck = self.cfg.checkpoint
        if self.cfg.logging.metrics_file:
            self.metrics_path = Path(self.cfg.logging.metrics_file)
        if not ck.save:
            return
        save = Path(ck.save)
        if self.rank == 0:
            if fmt.read_tracker(save) is not None and not ck.load and not ck.overwrite_save:
                raise ValueError(
                    f"--save {save} already holds checkpoints of another run, and --load is not "
                    f"given. Resume it with --load {save}, pick a new --save directory, or pass "
                    "--overwrite-save to write over it."
                )
            save.mkdir(parents=True, exist_ok=True)
            fmt.clean_stale_staging(save)
            run_record = {
                "argv": self.argv,
                "stage": self.stage,
                "config": self.cfg.to_dict(),
                "flags": config_to_argv(self.cfg),
                "git_revision": checkpointing.git_revision(),
                "world_size": self.world,
                "master_port": os.environ.get("MASTER_PORT"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            fmt.write_json_atomic(save / "run_config.json", run_record)
        self.metrics_path = Path(self.cfg.logging.metrics_file or (save / "metrics.jsonl"))

    def maybe_load(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.load:
            return
        # Resuming our own run takes precedence over the --load source (SLURM requeue).
        if ck.save and fmt.read_tracker(ck.save) is not None and Path(ck.save).resolve() != Path(ck.load).resolve():
            self._log(f"resuming from own checkpoints in --save {ck.save} (ignoring --load {ck.load})")
            ck.load, ck.finetune = ck.save, False
        self.iteration, self.consumed_samples = checkpointing.load_checkpoint(
            self.cfg, self.model, self.setup.optimizer, self.setup.scheduler
        )
        if ck.finetune and self.setup.scheduler is not None:
            self.setup.scheduler.step(0)
        sched, t = self.setup.scheduler, self.cfg.train
        wanted_decay = max(t.lr_decay_iters or max(t.train_iters, 1), t.lr_warmup_iters + 1)
        if sched is not None and not ck.finetune and sched.lr_decay_steps != wanted_decay:
            # Megatron keeps the checkpoint's schedule on resume; say so when the flags differ.
            self._log(
                f"warning: the resumed LR schedule decays over {sched.lr_decay_steps} iterations (from the "
                f"checkpoint), not {wanted_decay}; set --lr-decay-iters when a run is extended."
            )
        self._log(f"loaded {ck.load} -> iteration {self.iteration}, consumed samples {self.consumed_samples}")

    # ---------------------------------------------------------------- steps
    def train_step(self, data_iterator) -> tuple[float, float, dict]:
        s = self.setup
        t = self.cfg.train
        for chunk in self.model:
            chunk.zero_grad_buffer()
        s.optimizer.zero_grad()
        losses = s.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=s.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        lr = s.optimizer.param_groups[0]["lr"]  # the LR this step uses
        update_ok, grad_norm, _ = s.optimizer.step()
        if update_ok:
            s.scheduler.step(increment=1)
        loss = self._reduce_losses(losses)
        return loss, float(grad_norm) if grad_norm is not None else float("nan"), {"skipped": not update_ok, "lr": lr}

    def _reduce_losses(self, losses: list[dict]) -> float:
        """Global mean LM loss over all micro batches and DP ranks, known on every rank."""
        total = torch.zeros(2, dtype=torch.float64, device=device())
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
            for item in losses:
                total += item["lm loss"].to(torch.float64)
        torch.distributed.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    @torch.no_grad()
    def evaluate(self, dataset) -> float:
        s = self.setup
        t, lg = self.cfg.train, self.cfg.logging
        for chunk in self.model:
            chunk.eval()
        iterator = self._data_iterators(dataset, 0)
        total = torch.zeros(2, dtype=torch.float64, device=device())
        for _ in range(lg.eval_iters):
            losses = s.forward_backward(
                forward_step_func=partial(_forward_step, eval_mode=True),
                data_iterator=iterator,
                model=self.model,
                num_microbatches=s.num_microbatches,
                seq_length=self.cfg.model.seq_length,
                micro_batch_size=t.micro_batch_size,
                forward_only=True,
            )
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
                for item in losses:
                    total += item["lm loss"].to(torch.float64)
        torch.distributed.all_reduce(total)
        for chunk in self.model:
            chunk.train()
        # Evaluation must not leak MoE aux losses into the next training log.
        clear_aux_losses_tracker()
        return (total[0] / total[1].clamp(min=1)).item()

    def run_evaluation(self) -> dict[str, Any]:
        results: dict[str, Any] = {"iteration": self.iteration}
        for name, ds in self.datasets.items():
            if name == "train":
                continue
            loss = self.evaluate(ds)
            label = name.split(":", 1)[1] if name.startswith("domain:") else name
            results[label] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if len(results) > 1:
            text = " | ".join(f"{k} loss {v['loss']:.4f} ppl {v['ppl']:.2f}" for k, v in results.items() if k != "iteration")
            self._log(f"[eval] iteration {self.iteration}: {text}")
            self._write_metrics({"type": "eval", **results})
        return results

    # ---------------------------------------------------------------- logging
    def _write_metrics(self, record: dict) -> None:
        if self.rank != 0 or self.metrics_path is None:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("iteration", self.iteration)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(f"{record.get('type', 'train')}/{k}", v, step)
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{record.get('type')}/{k}/{kk}", vv, step)

    def _moe_stats(self, window_iters: int = 1) -> dict[str, Any]:
        if not self.cfg.model.is_moe:
            return {}
        out: dict[str, Any] = {}
        tracker = get_moe_layer_wise_logging_tracker()
        for name, entry in tracker.items():
            values = entry.get("values")
            if values is None:
                continue
            v = values.float()
            torch.distributed.all_reduce(v, group=parallel_state.get_pipeline_model_parallel_group())
            # The tracker sums over layers, micro batches and the iterations of the window.
            denom = max(self.setup.num_microbatches, 1) * max(self.cfg.model.num_layers, 1) * max(window_iters, 1)
            out[name] = v.sum().item() / denom
        clear_aux_losses_tracker()
        from ..models import routers

        if self.cfg.logging.log_routing and hasattr(routers, "routing_statistics"):
            stats = routers.routing_statistics(self.model)
            if stats:
                out["routing"] = stats
        return out

    # ---------------------------------------------------------------- main loop
    def train(self) -> TrainResult:
        cfg = self.cfg
        t, lg, ck = cfg.train, cfg.logging, cfg.checkpoint
        self.prepare_output()
        self.maybe_load()
        self.build_data()
        if lg.tensorboard_dir and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(lg.tensorboard_dir)
        if "train" not in self.datasets and t.train_iters > self.iteration:
            raise ValueError("No training data: pass --data-path (with a tokenizer) or --mock-data.")
        signals = ExitSignal(ck.exit_signal_handler)
        losses: list[float] = []
        eval_history: list[dict] = []
        exit_reason = "finished"
        tokens_per_iter = t.global_batch_size * cfg.model.seq_length
        self._log(
            f"{self.stage}: {sum(p.numel() for c in self.model for p in c.parameters()):,} parameters on rank 0, "
            f"world {self.world}, DP {self.setup.data_parallel_size}, {self.setup.num_microbatches} micro batches, "
            f"peak {self.throughput.peak:.1f} TFLOP/s ({self.throughput.peak_source})"
        )
        iterator = self._data_iterators(self.datasets["train"], self.consumed_samples) if "train" in self.datasets else None
        window_start, window_iters = time.perf_counter(), 0
        from ..models import routers

        loop_start = time.perf_counter()
        while self.iteration < t.train_iters:
            if hasattr(routers, "set_router_step"):
                routers.set_router_step(self.model, self.iteration)
            loss, grad_norm, info = self.train_step(iterator)
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            losses.append(loss)
            window_iters += 1
            if self.iteration % lg.log_interval == 0 or self.iteration == t.train_iters:
                elapsed = time.perf_counter() - window_start
                perf = self.throughput.report(tokens_per_iter * window_iters, elapsed)
                moe = self._moe_stats(window_iters)
                lr = info["lr"]
                record = {
                    "type": "train", "iteration": self.iteration, "loss": loss, "lr": lr,
                    "grad_norm": grad_norm, "consumed_samples": self.consumed_samples,
                    "tokens": self.consumed_samples * cfg.model.seq_length,
                    "iter_time_s": elapsed / window_iters, **perf, "peak_mem_gib": peak_memory_gib(),
                    "skipped": info["skipped"], **{k: v for k, v in moe.items() if k != "routing"},
                }
                if "routing" in moe:
                    record["routing"] = moe["routing"]
                self._write_metrics(record)
                extra = " ".join(f"{k} {v:.4f}" for k, v in moe.items() if isinstance(v, float))
                self._log(
                    f"[{self.stage}] iter {self.iteration}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | "
                    f"grad norm {grad_norm:.3f} | {perf['tokens_per_s']:.0f} tok/s | "
                    f"{perf['tflops_per_device']:.3f} TFLOP/s/device | MFU {100 * perf['mfu']:.1f}% | "
                    f"mem {record['peak_mem_gib']:.2f} GiB" + (f" | {extra}" if extra else "")
                )
                window_start, window_iters = time.perf_counter(), 0
            if lg.eval_interval and self.iteration % lg.eval_interval == 0 and self.iteration < t.train_iters:
                eval_history.append(self.run_evaluation())
                window_start = time.perf_counter()
            if ck.save and ck.save_interval and self.iteration % ck.save_interval == 0 and self.iteration < t.train_iters:
                self.save()
                window_start = time.perf_counter()
            if ck.exit_interval and self.iteration >= ck.exit_interval and self.iteration < t.train_iters:
                exit_reason = "exit-interval"
                break
            if signals.any_rank():
                exit_reason = "signal"
                self._log(f"exit signal received at iteration {self.iteration}: saving and exiting")
                break
        self.loop_seconds = time.perf_counter() - loop_start
        final_eval = self.run_evaluation()
        eval_history.append(final_eval)
        if ck.save:
            self.save()
            self._write_summary(final_eval, exit_reason)
        if self.tb is not None:
            self.tb.close()
        return TrainResult(self.iteration, self.consumed_samples, losses, eval_history, exit_reason)

    def save(self) -> None:
        path = checkpointing.save_checkpoint(
            self.cfg, self.iteration, self.model, self.setup.optimizer, self.setup.scheduler,
            self.consumed_samples, extra_manifest=self.extra_manifest(),
        )
        self._log(f"saved checkpoint {path}")

    def extra_manifest(self) -> dict | None:
        """Stage-specific manifest fields (the mix phase keeps the expert names)."""
        return getattr(self, "_extra_manifest", None)

    def _write_summary(self, final_eval: dict, exit_reason: str) -> None:
        if self.rank != 0:
            return
        summary = {
            "stage": self.stage,
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "tokens": self.consumed_samples * self.cfg.model.seq_length,
            "flops": self.throughput.flops_per_token * self.consumed_samples * self.cfg.model.seq_length,
            "exit_reason": exit_reason,
            "eval": final_eval,
        }
        fmt.write_json_atomic(Path(self.cfg.checkpoint.save) / "eval_summary.json", summary)


def configure_logging() -> None:
    level = os.environ.get("BTX_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Megatron-Core warns about deprecations and CPU fallbacks on every run; keep errors only
    # unless the user asks for more.
    if "BTX_LOG_LEVEL" not in os.environ:
        logging.getLogger("megatron").setLevel(logging.ERROR)
