"""The local runner: training runs as independent process groups on this machine.

Each run is started in its own session (``start_new_session``), with its own rendezvous port
and, on GPU machines, its own devices; at most ``max_concurrent`` run at once. CPU runs get
``OMP_NUM_THREADS`` = cores / processes running at once, so concurrent runs do not oversubscribe
the machine. A signal to the runner is forwarded to every running run, which saves a checkpoint
and exits; the runner waits for them, so nothing is left running without its parent.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import checkpoint as fmt
from ..config.experiment import Experiment, ExperimentError
from ..runtime.distributed import free_port
from ..runtime.processes import start_child
from .plan import RunPlan
from .status import status_of

_PORT_RETRIES = 3


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def write_run_files(exp: Experiment, run: RunPlan, command: list[str], env: dict[str, str]) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "logs").mkdir(exist_ok=True)
    fmt.write_json_atomic(run.run_dir / "resolved_config.json", run.resolved(exp))
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    fmt.write_text_atomic(run.run_dir / "command.sh", "#!/bin/bash\n# Exact command of the latest local start.\n"
                          f"cd {shlex.quote(os.getcwd())}\n{env_text} {shlex.join(command)}\n")


@dataclass
class _Running:
    run: RunPlan
    proc: subprocess.Popen
    port: int
    devices: list[int]
    log: Any


@dataclass
class LocalRunner:
    """Runs dense runs as independent process groups, ``max_concurrent`` at a time."""

    exp: Experiment
    max_concurrent: int | None = None
    python: str = sys.executable
    echo: Callable[[str], None] = print
    poll_s: float = 0.5
    running: dict[str, _Running] = field(default_factory=dict)
    stopped_by: int | None = None   # the signal that stopped the queue (runs saved and exited)

    def __post_init__(self) -> None:
        self.gpus = _cuda_device_count()

    def _capacity(self, runs: list[RunPlan]) -> int:
        if self.max_concurrent:
            return self.max_concurrent
        width = max(r.launch.nproc_per_node for r in runs)
        slots = self.gpus if self.gpus else (os.cpu_count() or 1)
        return max(1, slots // width)

    def _env(self, run: RunPlan, port: int, devices: list[int], concurrent: int) -> dict[str, str]:
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        if run.launch.nproc_per_node == 1:
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        if "OMP_NUM_THREADS" not in os.environ:
            cpus = os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cpus // max(1, concurrent * run.launch.nproc_per_node)))
        return env

    def start(self, run: RunPlan, concurrent: int, free_gpus: list[int]) -> _Running:
        taken = {r.port for r in self.running.values()}
        port = free_port(taken)
        devices = [free_gpus.pop(0) for _ in range(run.launch.nproc_per_node)] if self.gpus else []
        env = self._env(run, port, devices, concurrent)
        resume = fmt.read_tracker(run.save_dir) is not None
        command = run.local_command(port, self.python, resume)
        write_run_files(self.exp, run, command, env)
        attempt = self._next_attempt(run)
        log = open(run.run_dir / "logs" / "train.log", "a")
        log.write(f"\n===== attempt {attempt} {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                  f"{'resume' if resume else 'first start'}: {shlex.join(command)}\n")
        log.flush()
        (run.run_dir / "exit.json").unlink(missing_ok=True)
        # Its own session: a kill of one run (or of its torchrun workers) never reaches another
        # run or this launcher; and it dies with the launcher (PDEATHSIG), never orphaned.
        proc = start_child(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        fmt.write_json_atomic(run.run_dir / "launch.json", {
            "attempt": attempt, "pid": proc.pid, "pgid": proc.pid, "host": socket.gethostname(),
            "master_port": port, "world_size": run.launch.world_size, "devices": devices,
            "resume": resume, "command": command, "env": env, "started": time.time(),
        })
        self.echo(f"[launch] {run.name}: started pid {proc.pid} ({'resume' if resume else 'from seed' if run.init_checkpoint else 'fresh'}, "
                  f"world {run.launch.world_size}, port {port}) -> {run.run_dir / 'logs' / 'train.log'}")
        return _Running(run, proc, port, devices, log)

    @staticmethod
    def _next_attempt(run: RunPlan) -> int:
        try:
            return int(json.loads((run.run_dir / "launch.json").read_text())["attempt"]) + 1
        except (OSError, ValueError, KeyError):
            return 1

    @staticmethod
    def _lost_port_race(r: _Running) -> bool:
        try:
            text = (r.run.run_dir / "logs" / "train.log").read_text(errors="replace")
        except OSError:
            return False
        attempt = text.rsplit("===== attempt ", 1)[-1].partition("\n")[2]  # output after the header line
        return "EADDRINUSE" in attempt and "[pretrain] iter" not in attempt

    def _finish(self, r: _Running, code: int) -> None:
        r.log.close()
        fmt.write_json_atomic(r.run.run_dir / "exit.json", {"returncode": code, "ended": time.time(),
                                                            "pid": r.proc.pid})
        state = status_of(r.run)
        self.echo(f"[launch] {r.run.name}: exited {code} ({state.state}, iteration {state.iteration}/{state.target})")

    def terminate(self, signum: int = signal.SIGTERM) -> None:
        """Forward a stop to every running branch (each saves a checkpoint and exits)."""
        for r in self.running.values():
            try:
                os.killpg(r.proc.pid, signum)
            except ProcessLookupError:
                pass

    def run(self, runs: list[RunPlan]) -> dict[str, int]:
        for run in runs:  # refuse before the first start, not halfway through the queue
            if run.launch.nodes != 1:
                raise ExperimentError(f"{run.name}: --local runs on one node; launch.nodes is {run.launch.nodes} "
                                      "(use --slurm).")
            if self.gpus and run.launch.nproc_per_node > self.gpus:
                raise ExperimentError(f"{run.name}: launch.nproc_per_node {run.launch.nproc_per_node} exceeds the "
                                      f"{self.gpus} GPUs of this machine.")
        capacity = self._capacity(runs)
        concurrent = min(capacity, len(runs))
        free_gpus = list(range(self.gpus))
        queue = list(runs)
        results: dict[str, int] = {}
        retries: dict[str, int] = {}
        mode = "concurrently" if concurrent > 1 else "one after another"
        self.echo(f"[launch] {len(runs)} run(s) {mode} ({concurrent} at a time)")
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

        def stop(signum, frame):
            self.echo(f"[launch] signal {signum}: asking the running runs to save and exit")
            self.stopped_by = self.stopped_by or signum
            queue.clear()
            self.terminate(signal.SIGTERM)

        for s in previous:
            signal.signal(s, stop)
        try:
            while queue or self.running:
                while queue and len(self.running) < capacity and \
                        (not self.gpus or len(free_gpus) >= queue[0].launch.nproc_per_node):
                    run = queue.pop(0)
                    self.running[run.name] = self.start(run, concurrent, free_gpus)
                for name, r in list(self.running.items()):
                    code = r.proc.poll()
                    if code is not None:
                        del self.running[name]
                        free_gpus += r.devices
                        if code != 0 and self._lost_port_race(r) and retries.get(name, 0) < _PORT_RETRIES:
                            # Another program took the port between our check and the trainer's bind.
                            retries[name] = retries.get(name, 0) + 1
                            r.log.close()
                            self.echo(f"[launch] {name}: port {r.port} was taken before the trainer bound it; "
                                      "restarting on another port")
                            queue.insert(0, r.run)
                            continue
                        results[name] = code
                        self._finish(r, code)
                time.sleep(self.poll_s)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return results


