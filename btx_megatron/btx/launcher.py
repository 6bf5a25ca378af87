"""Branch planning and launching: each BTX branch is an ordinary, independent dense training job.

:func:`plan_runs` turns an :class:`~btx_megatron.btx.experiment.Experiment` into one
:class:`RunPlan` per dense run (the domain branches, the dense baseline and, when the experiment
pretrains it, the seed): a validated :class:`~btx_megatron.config.Config` and the exact
``python -m btx_megatron.pretrain`` flags. Nothing is shared between runs: each has its own
directory, process group, rendezvous port and (on GPU machines) devices, so a failure or a
restart touches one branch only.

Run directory (``OUT/branches/NAME``)::

    resolved_config.json   the Config, flags, launch layout, experiment file (written before start)
    command.sh             the exact command (first start: --load SEED --finetune)
    launch.json            pid / process group / MASTER_PORT / world size of the current attempt
    exit.json              return code of the last local attempt
    slurm.json             job id of the last submission (--slurm)
    logs/train.log         stdout+stderr of every local attempt (appended)
    checkpoints/           --save: iter_XXXXXXX/, metrics.jsonl, eval_summary.json, run_config.json

A restarted run resumes from its own ``checkpoints/`` (``--load`` of its save directory, no
``--finetune``); the first start loads the seed with ``--finetune`` (iteration 0, new optimizer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint_format as fmt
from ..config import Config, config_to_argv
from ..config.args import _flag_name
from ..config.schema import SECTIONS
from .experiment import (
    DENSE_NAME, SEED_NAME, BlendEntry, Experiment, ExperimentError, Launch, StageOptions,
    blend_to_data_path,
)

TRAINER_MODULE = "btx_megatron.pretrain"


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    name: str
    kind: str                      # "seed" | "branch" | "baseline"
    run_dir: Path
    config: Config                 # save set; load/finetune are decided per start (see start_args)
    launch: Launch
    init_checkpoint: str | None    # the seed for branches and baselines; None for the seed itself
    blend: list[BlendEntry]

    @property
    def save_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def target_iters(self) -> int:
        return self.config.train.train_iters

    @property
    def tokens_per_iter(self) -> int:
        return self.config.train.global_batch_size * self.config.model.seq_length

    def base_argv(self) -> list[str]:
        """Every flag except how to start (``--load``/``--finetune``)."""
        return config_to_argv(self.config)

    def start_args(self, resume: bool | None = None) -> list[str]:
        """First start: the seed with ``--finetune``; later starts: resume the own ``--save``.

        The trainer would also prefer its own checkpoints over ``--load`` (SLURM requeue), but
        the command says so explicitly, so a log shows which one was meant.
        """
        if resume is None:
            resume = fmt.read_tracker(self.save_dir) is not None
        if resume:
            return ["--load", str(self.save_dir)]
        if self.init_checkpoint is None:
            return []
        return ["--load", self.init_checkpoint, "--finetune"]

    def trainer_argv(self, resume: bool | None = None) -> list[str]:
        return self.base_argv() + self.start_args(resume)

    def local_command(self, master_port: int, python: str = sys.executable, resume: bool | None = None) -> list[str]:
        k = self.launch.nproc_per_node
        if k == 1:
            # Plain python with an explicit single-rank env: no rendezvous process to outlive us.
            return [python, "-m", TRAINER_MODULE, *self.trainer_argv(resume)]
        # A static rendezvous on our own port (not --standalone) so the port is recorded and
        # distinct per branch: no process group can span two branches.
        return [python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(k),
                "--master-addr", "127.0.0.1", "--master-port", str(master_port),
                "-m", TRAINER_MODULE, *self.trainer_argv(resume)]

    def resolved(self, exp: Experiment) -> dict[str, Any]:
        return {
            "experiment": exp.name,
            "experiment_file": os.path.abspath(exp.source),
            "run": self.name,
            "kind": self.kind,
            "launch": dataclasses.asdict(self.launch),
            "init_checkpoint": self.init_checkpoint,
            "save": str(self.save_dir),
            "train_iters": self.target_iters,
            "tokens_per_iter": self.tokens_per_iter,
            "tokens": self.target_iters * self.tokens_per_iter,
            "blend": [dataclasses.asdict(b) for b in self.blend],
            "flags": self.base_argv(),
            "first_start": self.start_args(resume=False),
            "resume": self.start_args(resume=True),
            "config": self.config.to_dict(),
        }


def _stage_dict(exp: Experiment, opts: StageOptions, blend: list[BlendEntry], save: Path,
                train_iters: int | None) -> dict[str, Any]:
    data = dict(exp.data_options)
    data.update(
        data_path=blend_to_data_path(blend),
        eval_domains={k: [v] for k, v in exp.eval_domains.items()},
        tokenizer_type=exp.tokenizer_type,
        tokenizer_model=exp.tokenizer_model,
    )
    sections = {s: dict(v) for s, v in opts.sections.items()}
    if train_iters is not None:
        sections["train"]["train_iters"] = train_iters
    sections["checkpoint"]["save"] = str(save)
    return {"model": dict(exp.model), "data": data, **sections}


def _build_config(values: dict[str, Any], where: str) -> Config:
    try:
        return Config.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ExperimentError(f"{where}: {exc}") from None


def _resolve_iters(exp: Experiment, opts: StageOptions, blend, save, budget, where: str) -> Config:
    """Config with ``train_iters`` from ``budget`` (tokens -> iterations at this batch size)."""
    cfg = _build_config(_stage_dict(exp, opts, blend, save, budget.train_iters or 1), where)
    world = opts.launch.world_size
    try:
        cfg.validate_layout(world)  # fills global_batch_size = micro * DP when unset
    except ValueError as exc:
        raise ExperimentError(f"{where}: with {world} processes ({opts.launch.nodes} node(s) x "
                              f"{opts.launch.nproc_per_node}): {exc}") from None
    if budget.tokens is not None:
        per_iter = cfg.train.global_batch_size * cfg.model.seq_length
        cfg.train.train_iters = max(1, math.ceil(budget.tokens / per_iter))
    return cfg


def plan_runs(exp: Experiment) -> dict[str, RunPlan]:
    """Every dense run of the experiment, by name: [seed], each domain, dense baseline."""
    plans: dict[str, RunPlan] = {}
    seed_ckpt = str(exp.seed_checkpoint)
    if exp.seed.trained_here:
        cfg = _resolve_iters(exp, exp.seed.options, exp.seed.data, exp.checkpoint_dir(SEED_NAME),
                             exp.seed.budget, "seed")
        plans[SEED_NAME] = RunPlan(SEED_NAME, "seed", exp.run_dir(SEED_NAME), cfg, exp.seed.options.launch,
                                   None, exp.seed.data)
    for d in exp.domains:
        where = f"domains ({d.name})"
        cfg = _resolve_iters(exp, d.options, d.data, exp.checkpoint_dir(d.name), d.budget, where)
        plans[d.name] = RunPlan(d.name, "branch", exp.run_dir(d.name), cfg, d.options.launch, seed_ckpt, d.data)
    dense = exp.baselines.dense
    if dense.enabled:
        branch_tokens = {n: plans[n].target_iters * plans[n].tokens_per_iter for n in exp.domain_names}
        if dense.data is not None:
            blend = dense.data
        else:
            # Data-matched to the branch phase: every domain's data in proportion to its budget.
            total = sum(branch_tokens.values())
            blend = []
            for d in exp.domains:
                w_total = sum(e.weight for e in d.data)
                blend += [BlendEntry(e.prefix, branch_tokens[d.name] / total * e.weight / w_total) for e in d.data]
        budget = dense.budget
        if not budget.given:
            # The same number of tokens as all branches together (and so the same FLOPs).
            budget = dataclasses.replace(budget, tokens=float(sum(branch_tokens.values())))
        cfg = _resolve_iters(exp, dense.options, blend, exp.checkpoint_dir(DENSE_NAME), budget, "baselines.dense")
        plans[DENSE_NAME] = RunPlan(DENSE_NAME, "baseline", exp.run_dir(DENSE_NAME), cfg, dense.options.launch,
                                    seed_ckpt, blend)
    return plans


def select(plans: dict[str, RunPlan], only: list[str] | None, default: Callable[[RunPlan], bool]) -> list[RunPlan]:
    if not only:
        return [p for p in plans.values() if default(p)]
    unknown = [n for n in only if n not in plans]
    if unknown:
        raise ExperimentError(f"--only {', '.join(unknown)}: no such run; runs are {', '.join(plans)}.")
    return [plans[n] for n in only]


# ---------------------------------------------------------------------------------------------
# Input checks (before anything starts)
# ---------------------------------------------------------------------------------------------

def resolved_vocab_size(exp: Experiment) -> int | None:
    if exp.model.get("vocab_size") is not None:
        return exp.model["vocab_size"]
    if exp.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer") and exp.tokenizer_model \
            and os.path.exists(exp.tokenizer_model):
        from ..data import build_tokenizer

        return build_tokenizer(exp.tokenizer_type, exp.tokenizer_model, None).vocab_size
    return None


def check_inputs(exp: Experiment, runs: list[RunPlan]) -> list[str]:
    """Problems that would make a run fail at start-up: missing data, tokenizer or seed, a seed
    of another shape. Returns the messages (empty when all is well)."""
    problems: list[str] = []
    if exp.tokenizer_model and not os.path.exists(exp.tokenizer_model):
        problems.append(f"tokenizer.model {exp.tokenizer_model} does not exist.")
    seen: set[str] = set()
    for run in runs:
        prefixes = [(e.prefix, f"{run.name}: data") for e in run.blend]
        prefixes += [(p, f"evaluation domain {n}") for n, p in exp.eval_domains.items()]
        for prefix, what in prefixes:
            if prefix in seen:
                continue
            seen.add(prefix)
            missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
            if missing:
                problems.append(f"{what} prefix {prefix} does not exist (missing {' and '.join(prefix + s for s in missing)}); "
                                "build it with tools/preprocess_data.py or tools/build_corpora.py.")
    if any(r.init_checkpoint for r in runs):
        problems += check_seed(exp, runs)
    return problems


def check_seed(exp: Experiment, runs: list[RunPlan]) -> list[str]:
    seed = exp.seed_checkpoint
    starting = [r for r in runs if r.init_checkpoint and fmt.read_tracker(r.save_dir) is None]
    if not starting:
        return []  # every run resumes from its own checkpoints
    try:
        ckpt_dir, _ = fmt.resolve(seed, "seed checkpoint")
        manifest = fmt.read_manifest(ckpt_dir)
    except fmt.CheckpointError as exc:
        hint = ""
        if exp.seed.trained_here:
            hint = (f" The experiment pretrains its seed: run `python tools/launch_branches.py {exp.source} "
                    "--local --only seed` first.")
        return [f"{exc}{hint}"]
    problems = []
    if manifest.get("kind", "dense") != "dense" or manifest.get("model", {}).get("num_experts"):
        problems.append(f"seed checkpoint {ckpt_dir} is an MoE checkpoint; branches start from a dense model.")
    declared = runs[0].config.model
    saved = manifest.get("model", {})
    want = dataclasses.replace(declared, vocab_size=declared.vocab_size or resolved_vocab_size(exp)).architecture()
    diffs = [f"{k}: seed {saved[k]!r} vs experiment {v!r}" for k, v in want.items()
             if k in saved and v is not None and saved[k] != v]
    if diffs:
        problems.append(f"seed checkpoint {ckpt_dir} does not match the experiment's model section ("
                        + "; ".join(diffs) + "). Fix model: in the experiment file or point seed.checkpoint elsewhere.")
    return problems


# ---------------------------------------------------------------------------------------------
# Local runner
# ---------------------------------------------------------------------------------------------

def _free_port(taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range (32768+ on Linux), where ports handed out
    to other programs' outgoing connections and bind(0) calls would soon collide with ours:
    the trainer binds it only after its imports, seconds later."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port in 20000-32000 for the branch rendezvous")


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
        port = _free_port(taken)
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
        # start_new_session: the run is its own process group (a kill of one branch, or of its
        # torchrun workers, never reaches another branch or this launcher).
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
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
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def stop(signum, frame):
            self.echo(f"[launch] signal {signum}: asking running branches to save and exit")
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


# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------

@dataclass
class RunStatus:
    name: str
    state: str                  # pending | running | submitted | done | stopped | failed
    iteration: int
    target: int
    tokens: int | None
    loss: float | None
    checkpoint: str | None
    detail: str = ""

    def line(self) -> str:
        tokens = f"{self.tokens / 1e6:.2f}M" if self.tokens is not None else "-"
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        ckpt = self.checkpoint or "-"
        text = (f"{self.name:<10} {self.state:<9} iter {self.iteration:>7}/{self.target:<7} tokens {tokens:>9} "
                f"loss {loss:>8}  ckpt {ckpt}")
        return text + (f"  ({self.detail})" if self.detail else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _last_train_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    last = None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("type") == "train":
                last = rec
    return last


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _slurm_state(job_id: str) -> str | None:
    import shutil

    if not shutil.which("squeue"):
        return None
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip().lower() or None


def status_of(run: RunPlan) -> RunStatus:
    tracker = None
    try:
        tracker = fmt.read_tracker(run.save_dir)
    except fmt.CheckpointError:
        pass
    rec = _last_train_record(run.save_dir / "metrics.jsonl")
    iteration = max(tracker or 0, int(rec["iteration"]) if rec else 0)
    launch = _read_json(run.run_dir / "launch.json")
    exit_info = _read_json(run.run_dir / "exit.json")
    slurm = _read_json(run.run_dir / "slurm.json")
    detail = ""
    if tracker is not None and tracker >= run.target_iters:
        state = "done"
    elif launch and not exit_info and _pid_alive(int(launch["pid"])) and launch.get("host") == socket.gethostname():
        state, detail = "running", f"pid {launch['pid']}"
    elif exit_info and exit_info.get("returncode") == 0:
        state, detail = "stopped", "saved and exited on a signal; relaunch to resume"
    elif exit_info:
        state, detail = "failed", f"exit code {exit_info.get('returncode')}; see {run.run_dir / 'logs' / 'train.log'}"
    elif launch and launch.get("host") == socket.gethostname() and not slurm:
        state, detail = "failed", "process gone without an exit record (killed)"
    elif slurm:
        sq = _slurm_state(str(slurm.get("job_id")))
        state = "running" if sq == "running" else "submitted" if sq else "submitted"
        detail = f"slurm job {slurm.get('job_id')}" + (f" {sq}" if sq else "")
    else:
        state = "pending"
    checkpoint = str(fmt.iteration_dir(run.save_dir, tracker)) if tracker is not None else None
    return RunStatus(run.name, state, iteration, run.target_iters,
                     int(rec["tokens"]) if rec and "tokens" in rec else None,
                     float(rec["loss"]) if rec and "loss" in rec else None, checkpoint, detail)


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------

ARRAY_ORDER = ("MODEL_ARGS", "MOE_ARGS", "PARALLEL_ARGS", "PRECISION_ARGS", "DATA_ARGS", "TRAIN_ARGS",
               "CKPT_ARGS", "LOG_ARGS")
_SECTION_ARRAY = {"model": "MODEL_ARGS", "parallel": "PARALLEL_ARGS", "precision": "PRECISION_ARGS",
                  "train": "TRAIN_ARGS", "data": "DATA_ARGS", "checkpoint": "CKPT_ARGS", "logging": "LOG_ARGS"}


def _flag_sections() -> dict[str, str]:
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                name = _flag_name(f)
                out[name] = section
                out["--no-" + name[2:]] = section
    return out


def grouped_args(argv: list[str]) -> dict[str, list[str]]:
    """Split trainer flags into Megatron-style arrays (MODEL_ARGS, MOE_ARGS, DATA_ARGS ...)."""
    flags = _flag_sections()
    groups: dict[str, list[str]] = {k: [] for k in ARRAY_ORDER}
    current: list[str] | None = None
    for tok in argv:
        if tok in flags:
            array = _SECTION_ARRAY[flags[tok]]
            if array == "MODEL_ARGS" and (tok.startswith("--moe") or tok.startswith("--num-experts")):
                array = "MOE_ARGS"
            current = groups[array]
        assert current is not None, f"argv starts with a value: {tok}"
        current.append(tok)
    return groups


def _bash_array(name: str, argv: list[str]) -> str:
    if not argv:
        return f"{name}=()"
    lines, i = [], 0
    while i < len(argv):
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        lines.append("    " + " ".join(shlex.quote(t) for t in argv[i:j]))
        i = j
    return f"{name}=(\n" + "\n".join(lines) + "\n)"


def sbatch_command(exp: Experiment, run: RunPlan) -> list[str]:
    return ["sbatch", str(run.run_dir / "branch.sbatch")]


def render_sbatch(exp: Experiment, run: RunPlan, repo_root: Path) -> str:
    """The per-branch job script: #SBATCH header, the resolved flags in arrays, then the shared
    run logic of ``slurm/branch.sbatch`` (environment, first start vs. requeue, signal, srun)."""
    s = exp.slurm
    # One task per GPU; the layout (and so the batch arithmetic) is the experiment's launch section.
    tasks = run.launch.nproc_per_node
    if tasks > s.gpus_per_node:
        raise ExperimentError(f"{run.name}: launch.nproc_per_node {tasks} exceeds slurm.gpus_per_node {s.gpus_per_node}.")
    header = [
        f"#SBATCH --job-name=btx-{exp.name}-{run.name}",
        f"#SBATCH --nodes={run.launch.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --gpus-per-node={tasks}",
        f"#SBATCH --time={s.time}",
        f"#SBATCH --signal=B:USR1@{s.signal_grace_s}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run.run_dir}/logs/slurm-%j.out",
    ]
    if s.account:
        header.append(f"#SBATCH --account={s.account}")
    if s.partition:
        header.append(f"#SBATCH --partition={s.partition}")
    if s.qos:
        header.append(f"#SBATCH --qos={s.qos}")
    if s.cpus_per_task:
        header.append(f"#SBATCH --cpus-per-task={s.cpus_per_task}")
    header += [f"#SBATCH {x}" for x in s.extra_sbatch]
    groups = grouped_args(run.base_argv())
    # Spell out the shape even where it equals a trainer default, for whoever reads the script.
    m = run.config.model
    explicit = []
    for flag, value in (("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
                        ("--num-attention-heads", m.num_attention_heads), ("--seq-length", m.seq_length)):
        if flag not in groups["MODEL_ARGS"]:
            explicit += [flag, str(value)]
    groups["MODEL_ARGS"] = explicit + groups["MODEL_ARGS"]
    body = [
        "#!/bin/bash",
        f"# BTX run '{run.name}' of experiment '{exp.name}', generated by tools/launch_branches.py from",
        f"# {os.path.abspath(exp.source)}. Submit with:",
        f"#   {shlex.join(sbatch_command(exp, run))}",
        *header,
        "",
        "set -euo pipefail",
        f"BTX_ROOT={shlex.quote(str(repo_root))}",
        f"RUN_NAME={shlex.quote(run.name)}",
        f"SAVE={shlex.quote(str(run.save_dir))}",
        f"INIT_CHECKPOINT={shlex.quote(run.init_checkpoint or '')}   # the seed (first start only)",
        f"TRAIN_ITERS={run.target_iters}",
        *[f"export {k}={shlex.quote(str(v))}" for k, v in s.env.items()],
        *s.setup,
        "",
        *[_bash_array(name, groups[name]) for name in ARRAY_ORDER],
        "",
        "# Environment, first start (--load SEED --finetune) vs requeue (--load SAVE), srun, signal forwarding:",
        'source "$BTX_ROOT/slurm/branch.sbatch"',
        "",
    ]
    return "\n".join(body)


def submit_slurm(exp: Experiment, runs: list[RunPlan], repo_root: Path, dry_run: bool,
                 echo: Callable[[str], None] = print) -> dict[str, str]:
    import shutil

    if not dry_run and not shutil.which("sbatch"):
        raise ExperimentError("--slurm: `sbatch` is not on PATH; run on a SLURM login node, or use --local "
                              "(or --dry-run to print the job scripts). Nothing was submitted.")
    scripts = {run.name: render_sbatch(exp, run, repo_root) for run in runs}
    job_ids: dict[str, str] = {}
    for run in runs:
        command = sbatch_command(exp, run)
        if dry_run:
            echo(f"$ {shlex.join(command)}")
            echo(f"----- {run.run_dir / 'branch.sbatch'} -----")
            echo(scripts[run.name])
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "logs").mkdir(exist_ok=True)
        fmt.write_text_atomic(run.run_dir / "branch.sbatch", scripts[run.name])
        fmt.write_json_atomic(run.run_dir / "resolved_config.json", run.resolved(exp))
        fmt.write_text_atomic(run.run_dir / "command.sh", "#!/bin/bash\n" + shlex.join(command) + "\n")
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed ({out.returncode}): {out.stderr.strip()}")
        job_id = out.stdout.strip().split()[-1]
        job_ids[run.name] = job_id
        fmt.write_json_atomic(run.run_dir / "slurm.json", {"job_id": job_id, "submitted": time.time(),
                                                         "command": command})
        echo(f"[slurm] {run.name}: submitted job {job_id} ({run.run_dir})")
    return job_ids
