"""Checkpoint saves: the training stall per save, synchronous against --async-save, and the time
from SIGTERM to a saved exit.

    python benchmarks/bench_checkpoint.py                                # ~40M parameters, 12 saves
    python benchmarks/bench_checkpoint.py --hidden-size 512 --num-layers 8 --saves 8 --sigterm-trials 3

Stall: one training run (same model, same data) whose saves alternate between a synchronous
save and an async one (Megatron-Core's async torch_dist writer, ``--async-save``), so machine
noise hits both alike. A sync save stalls training for the whole write; an async save for
building the state dict and plan and forking the writer, then for publishing it (manifest,
rename, tracker) once the writer is done, plus any wait for a writer still running at the
next save or at exit. The run is in-process, with timers around the checkpointer's calls.

SIGTERM: separate runs (``python -m btx_megatron.pretrain``) get SIGTERM at random moments
after training started (for async runs: right after a background save started, the worst
case); the time to a clean exit with the checkpoint saved is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_argv(args) -> list[str]:
    return [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--ffn-hidden-size", str(4 * args.hidden_size), "--num-attention-heads", "8", "--num-query-groups", "4",
        "--seq-length", "128", "--vocab-size", str(args.vocab_size), "--swiglu", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "1e-4", "--eval-iters", "1",
        "--log-interval", "1000", "--seed", "1",
    ]


# ------------------------------------------------------------------------------ the stall run
def worker(args) -> None:
    """Train in this process with alternating sync/async saves; write the timings as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from btx_megatron.config import parse_config
    from btx_megatron.pretrain import run
    from btx_megatron.training.checkpointer import Checkpointer
    from btx_megatron.training.trainer import Trainer

    saves: list[dict] = []
    state = {"nested": 0.0}
    save_calls = {"n": 0}
    original_save, original_poll, original_finish = Checkpointer.save, Checkpointer.poll, Checkpointer.finish

    def timed_finish(self):
        pending = self.in_flight
        t0 = time.perf_counter()
        original_finish(self)
        dt = time.perf_counter() - t0
        state["nested"] += dt
        if pending is not None:
            record = next(r for r in saves if r["iteration"] == pending[0])
            record["wait_s"] += dt
            record["written_after_s"] = time.perf_counter() - record["t_start"]

    def timed_poll(self):
        pending = self.in_flight
        t0 = time.perf_counter()
        original_poll(self)
        dt = time.perf_counter() - t0
        if pending is not None:
            record = next(r for r in saves if r["iteration"] == pending[0])
            record["poll_s"] += dt
            if self.in_flight is None:
                record["written_after_s"] = time.perf_counter() - record["t_start"]

    def timed_save(self, iteration, consumed_samples, *, background=True):
        state["nested"] = 0.0
        t0 = time.perf_counter()
        record = {"iteration": iteration, "mode": "async" if background else "sync", "t_start": t0,
                  "wait_s": 0.0, "poll_s": 0.0, "written_after_s": None}
        saves.append(record)
        path = original_save(self, iteration, consumed_samples, background=background)
        record["call_s"] = time.perf_counter() - t0 - state["nested"]
        if not background:
            record["written_after_s"] = record["call_s"]
        return path

    def alternating_save(self, final=False):
        save_calls["n"] += 1
        # warm-up (sync), then async, sync, async, ...; the last one is sync (written before exit)
        background = not final and save_calls["n"] % 2 == 0
        path = self.checkpointer.save(self.iteration, self.consumed_samples, background=background)
        if path is not None:
            self._log(f"saved checkpoint {path}")

    Checkpointer.save, Checkpointer.poll, Checkpointer.finish = timed_save, timed_poll, timed_finish
    Trainer.save = alternating_save
    argv = model_argv(args) + ["--train-iters", str(args.saves * args.save_interval), "--save-interval",
                               str(args.save_interval), "--save", args.save_dir, "--async-save"]
    cfg, _ = parse_config(argv)
    t0 = time.perf_counter()
    result = run(cfg, argv)
    wall = time.perf_counter() - t0
    ckpt = Path(args.save_dir) / f"iter_{result.iteration:07d}"
    size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    manifest = json.loads((ckpt / "btx_checkpoint.json").read_text())
    for r in saves:
        r.pop("t_start")
    Path(args.out).write_text(json.dumps({"saves": saves, "checkpoint_bytes": size, "wall_s": wall,
                                          "iterations": len(result.losses), "model": manifest["model"]}))


def stall_table(data: dict) -> str:
    rows = []
    warmup = data["saves"][0]
    measured = [r for r in data["saves"][1:] if r["iteration"] != data["iterations"]]
    for mode in ("sync", "async"):
        recs = [r for r in measured if r["mode"] == mode]
        if not recs:
            continue
        stall = [r["call_s"] + r["poll_s"] + r["wait_s"] for r in recs]
        written = [r["written_after_s"] for r in recs if r["written_after_s"] is not None]
        rows.append((mode, len(recs), statistics.mean(stall), max(stall), statistics.mean(r["call_s"] for r in recs),
                     statistics.mean(r["poll_s"] + r["wait_s"] for r in recs),
                     statistics.mean(written) if written else float("nan")))
    out = [f"checkpoint {data['checkpoint_bytes'] / 2**20:,.1f} MiB; {data['iterations']} iterations in "
           f"{data['wall_s']:.1f}s; saves alternate sync/async in this one run. Excluded: the first save "
           f"({warmup['call_s']:.2f}s, sync; it also starts Megatron-Core's write-results queue process) and the "
           "final one (always sync).",
           f"{'mode':<6} {'saves':>5} {'stall mean s':>13} {'stall max s':>12} {'in save() s':>12} "
           f"{'publish+wait s':>15} {'written after s':>16}"]
    for mode, n, mean, mx, call, rest, written in rows:
        out.append(f"{mode:<6} {n:>5} {mean:>13.3f} {mx:>12.3f} {call:>12.3f} {rest:>15.3f} {written:>16.3f}")
    return "\n".join(out)


# ------------------------------------------------------------------------------ SIGTERM trials
def sigterm_trial(args, is_async: bool, seed: int, workdir: Path) -> float | None:
    """Seconds from SIGTERM to the exit of a run that saved; None if it did not save."""
    rng = random.Random(seed)
    save = workdir / f"sig-{'async' if is_async else 'sync'}-{seed}"
    argv = model_argv(args) + ["--train-iters", "1000", "--save-interval", str(args.save_interval), "--log-interval",
                               "1", "--save", str(save), "--load", str(save)] + (["--async-save"] if is_async else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "btx_megatron.pretrain", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Async: the worst moment, right after a background save started. Sync: a random moment
    # within a save interval after the first save.
    marker = "in the background" if is_async else f"saved checkpoint {save}/iter_{args.save_interval:07d}"
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
    if not is_async:
        time.sleep(rng.uniform(0, args.save_interval * 1.0))
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=900)
    elapsed = time.perf_counter() - sent
    text = "".join(lines) + out
    stopped = re.search(r"exit signal received at iteration (\d+)", text)
    if proc.returncode != 0 or not stopped:
        print(f"  trial {seed}: exit {proc.returncode}, no saved exit:\n{text[-1500:]}", file=sys.stderr)
        return None
    tracker = (save / "latest_checkpointed_iteration.txt").read_text().strip()
    return elapsed if tracker == stopped.group(1) else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--saves", type=int, default=13, help="saves in the stall run: a warm-up, then async and sync "
                   "alternating")
    p.add_argument("--save-interval", type=int, default=3)
    p.add_argument("--sigterm-trials", type=int, default=2, help="SIGTERM runs per mode (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        out = workdir / "stall.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, __file__, "--worker", "--save-dir", str(workdir / "stall"), "--out", str(out),
               "--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers), "--vocab-size",
               str(args.vocab_size), "--saves", str(args.saves), "--save-interval", str(args.save_interval),
               "--threads", str(args.threads)]
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
        m = data["model"]
        print(f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}; "
              f"threads {args.threads}; CPU {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
        print(stall_table(data))
        if args.sigterm_trials:
            print("\nSIGTERM to saved exit (s):")
            for is_async in (False, True):
                times = [sigterm_trial(args, is_async, seed, workdir) for seed in range(args.sigterm_trials)]
                ok = [t for t in times if t is not None]
                print(f"{'async' if is_async else 'sync':<6} trials {len(times)}, saved exits {len(ok)}, "
                      f"longest {max(ok) if ok else float('nan'):.2f}, mean {statistics.mean(ok) if ok else float('nan'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
