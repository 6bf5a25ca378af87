"""The end-to-end BTX experiment: every stage of one experiment file, resumable and checked.

    python tools/run_experiment.py examples/tiny/experiment.yaml [--output DIR] [--stages ...]

Stages, in order (each reads the outputs of the ones before it)::

    corpora    built-in corpora + tokenizer (tools/build_corpora.py), when the experiment's data
               lives in a build_corpora directory; otherwise the data prefixes are only checked
    seed       pretrain the dense seed on a mix of the domains (launcher, local mode)
    branches   one dense branch per domain from the seed (launcher --local, --finetune)
    merge      branches' FFNs -> experts, seed FFN as an extra expert, new router (merge tool)
    mix        MoE finetuning of the merged model on the mix data (btx_megatron.pretrain_mix);
               with ``router_variants`` also one run per extra router type (mix:soft, ...)
    dense      baseline: the seed continued on the mix data for the FLOPs of branches + mix
    upcycling  baseline: the seed's FFN copied into N experts (merge tool), then the same mix phase
    evaluate   per-domain loss/perplexity of every model, and the BTM ensemble of the branches
    routing    routing heatmaps of the BTX model per domain (tools/analyze_routing.py)
    report     results table (markdown + JSON), loss curves and perplexity PNGs (.report)

State lives in ``OUT/stages.json``: per stage its status, wall time, the hash of its
configuration, the fingerprints of its inputs and of its outputs. A stage is reused only when
its outputs validate *now* (checkpoint tracker + manifest + every ``.distcp`` file the DCP
metadata references, JSON that parses, PNGs that exist) and its configuration and input
fingerprints are the recorded ones; otherwise it is rebuilt, and the stages after it see new
input fingerprints and rebuild too. A training stage whose output is damaged is rolled back to
its newest intact checkpoint and resumed (resume is bit-exact), so a crash or a deleted file
costs the iterations since that checkpoint, not the stage.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .. import checkpoint_format as fmt
from .experiment import (
    DENSE_NAME, SEED_NAME, BlendEntry, Experiment, ExperimentError, blend_to_data_path, parse_experiment,
)

STATE_FILE = "stages.json"
STATE_VERSION = 1
MERGED_ROW = "btx_merged"  # results-table row of the merged checkpoint (iteration 0)
ORACLE_ROW = "btx_oracle"  # the merged checkpoint, each domain's tokens forced to its own expert
STAGES = ("corpora", "seed", "branches", "merge", "mix", "dense", "upcycling", "evaluate", "routing", "report")
STAGE_GROUPS = {"baselines": ("dense", "upcycling")}
REPO_ROOT = Path(__file__).resolve().parents[2]


class PipelineError(RuntimeError):
    """A stage failed or cannot run; the message names the stage and its log."""


# ---------------------------------------------------------------------------------------------
# Scales: the experiment file as written ("tiny") or shrunk for the end-to-end test ("test")
# ---------------------------------------------------------------------------------------------

@dataclass
class CorporaOptions:
    """tools/build_corpora.py options used when the pipeline builds the corpora itself."""

    tokens_per_domain: int = 2_000_000
    vocab_size: int = 8000
    seed: int = 1234


def _set(raw: dict, path: str, value: Any) -> None:
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


# The test scale keeps every stage and every code path of the experiment (same domains, merge
# with the seed expert, top-2 mix, all baselines) and shrinks only sizes and iteration counts.
_TEST_OVERRIDES = {
    "model.num_layers": 2, "model.hidden_size": 64, "model.ffn_hidden_size": 176,
    "model.num_attention_heads": 4, "model.num_query_groups": 2, "model.seq_length": 32,
    "seed.train_iters": 24, "seed.train.lr_warmup_iters": 2,
    "branch_defaults.train.micro_batch_size": 4, "branch_defaults.train.global_batch_size": 4,
    "branch_defaults.train.lr_warmup_iters": 2,
    # Saving is most of a tiny step's cost: only the branches keep an intermediate checkpoint
    # (the test resumes one from it). seed.checkpoint names a seed checkpoint, so the seed
    # inherits branch_defaults' interval.
    "branch_defaults.checkpoint.save_interval": 1000,
    "branch_defaults.logging.log_interval": 4, "branch_defaults.logging.eval_iters": 2,
    "mix.train_iters": 8, "mix.train.lr_warmup_iters": 2,
    "evaluation.eval_iters": 2,
}


def apply_scale(raw: dict, scale: str) -> tuple[dict, CorporaOptions]:
    """The experiment document and corpora options for ``scale`` ("tiny": as written)."""
    raw = copy.deepcopy(raw)
    if scale == "tiny":
        return raw, CorporaOptions()
    if scale != "test":
        raise ValueError(f"--scale {scale!r}: choose tiny (the experiment as written) or test (minutes).")
    for key, value in _TEST_OVERRIDES.items():
        _set(raw, key, value)
    for d in raw.get("domains") or []:
        d.pop("tokens", None)
        d["train_iters"] = 8
        d.setdefault("checkpoint", {})["save_interval"] = 4
    for key in ("seed", "mix"):
        if isinstance(raw.get(key), dict):
            raw[key].pop("tokens", None)
    raw.pop("corpora", None)
    return raw, CorporaOptions(tokens_per_domain=20_000, vocab_size=400)


# ---------------------------------------------------------------------------------------------
# Validation and fingerprints
# ---------------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def file_fingerprint(path: Path) -> str | None:
    try:
        return sha256_bytes(Path(path).read_bytes())[:16]
    except OSError:
        return None


@dataclass
class Check:
    ok: bool
    reason: str = ""
    fingerprint: dict[str, str] = field(default_factory=dict)
    # Set before a build: may partial progress be resumed? Only when the stage's configuration
    # and inputs are the ones that progress was made with (or nothing is recorded about it).
    resumable: bool = True


def check_checkpoint_dir(ckpt_dir: Path, label: str, kind: str | None = None) -> Check:
    """One iteration directory: manifest, DCP metadata and every referenced .distcp intact."""
    from .merge_io import fingerprint, verify_files

    try:
        manifest = fmt.read_manifest(ckpt_dir)
    except (fmt.CheckpointError, OSError, ValueError) as exc:
        return Check(False, f"{label}: {exc}")
    if kind is not None and manifest.get("kind", "dense") != kind:
        return Check(False, f"{label}: {ckpt_dir} is a {manifest.get('kind')!r} checkpoint, expected {kind!r}")
    try:
        verify_files(ckpt_dir, label)
    except ValueError as exc:
        return Check(False, str(exc))
    return Check(True, fingerprint={"checkpoint": fingerprint(ckpt_dir)})


def check_checkpoint_root(root: Path, label: str, iteration: int | None = None, kind: str | None = None) -> Check:
    """A checkpoint ROOT whose tracker names an intact iteration (``iteration`` if given)."""
    try:
        latest = fmt.read_tracker(root)
    except fmt.CheckpointError as exc:
        return Check(False, f"{label}: {exc}")
    if latest is None:
        return Check(False, f"{label}: no checkpoint in {root} (no {fmt.TRACKER})")
    if iteration is not None and latest != iteration:
        return Check(False, f"{label}: latest checkpoint is iteration {latest}, the stage trains to {iteration}")
    check = check_checkpoint_dir(fmt.iteration_dir(root, latest), label, kind)
    if check.ok:
        check.fingerprint["iteration"] = str(latest)
    return check


def check_training_run(save_dir: Path, label: str, iterations: int, kind: str) -> Check:
    """A finished training run: final checkpoint intact, eval summary and metrics readable."""
    check = check_checkpoint_root(save_dir, label, iterations, kind)
    if not check.ok:
        return check
    summary = read_json(save_dir / "eval_summary.json")
    if not isinstance(summary, dict) or summary.get("iteration") != iterations or "flops" not in summary:
        return Check(False, f"{label}: {save_dir / 'eval_summary.json'} is missing, does not parse or is not "
                            f"the summary of iteration {iterations}")
    if not (save_dir / "metrics.jsonl").is_file():
        return Check(False, f"{label}: {save_dir / 'metrics.jsonl'} is missing")
    check.fingerprint["eval_summary"] = file_fingerprint(save_dir / "eval_summary.json")
    return check


def roll_back_to_intact(save_dir: Path, label: str, kind: str, echo: Callable[[str], None]) -> int | None:
    """Drop damaged iterations of a run so it resumes from its newest intact checkpoint.

    Returns that iteration (None: nothing intact, the run directory's checkpoints are removed).
    metrics.jsonl keeps only the records up to it, so the resumed run does not log twice."""
    iters = sorted((int(p.name[5:]) for p in save_dir.glob("iter_*") if p.name[5:].isdigit()), reverse=True)
    keep = None
    for it in iters:
        d = fmt.iteration_dir(save_dir, it)
        check = check_checkpoint_dir(d, label, kind)
        if check.ok:
            keep = it
            break
        echo(f"[pipeline] {label}: dropping damaged checkpoint {d.name} ({check.reason})")
        shutil.rmtree(d)
    for stale in ("eval_summary.json",):
        (save_dir / stale).unlink(missing_ok=True)
    if keep is None:
        if save_dir.exists():
            shutil.rmtree(save_dir)
        return None
    fmt.write_text_atomic(save_dir / fmt.TRACKER, f"{keep}\n")
    metrics = save_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if int(rec.get("iteration", 0)) <= keep:
                kept.append(line)
        fmt.write_text_atomic(metrics, "".join(x + "\n" for x in kept))
    return keep


# ---------------------------------------------------------------------------------------------
# State file
# ---------------------------------------------------------------------------------------------

class State:
    """``OUT/stages.json``: one record per stage, rewritten atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        data = read_json(path)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            data = {"version": STATE_VERSION, "stages": {}}
        self.data = data

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fmt.write_json_atomic(self.path, self.data)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(command: list[str], log_path: Path, label: str, env: dict[str, str] | None = None,
               echo: Callable[[str], None] = print) -> None:
    """Run ``command`` with its output appended to ``log_path``; a failure names the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise PipelineError(f"{label} failed (exit {code}); log {log_path}:\n{tail}")


def single_process_env() -> dict[str, str]:
    """torchrun-like variables for one local rank (our own port: concurrent tools never collide)."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    return env


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

@dataclass
class StageTiming:
    name: str
    action: str         # ran | reused | skipped
    seconds: float


class Pipeline:
    """Runs the stages of one experiment; see the module docstring."""

    def __init__(self, exp: Experiment, *, scale: str = "tiny", corpora: CorporaOptions | None = None,
                 stages: list[str] | None = None, python: str = sys.executable,
                 echo: Callable[[str], None] = print, max_concurrent: int | None = None,
                 router_variants: list[str] | None = None):
        self.exp = exp
        from ..config.schema import ROUTER_TYPES

        self.router_variants = [r for r in (router_variants or []) if r != exp.mix.model.get("moe_router_type", "topk")]
        bad = [r for r in self.router_variants if r not in ROUTER_TYPES]
        if bad:
            raise ValueError(f"--router-variants {' '.join(bad)}: router types are {', '.join(ROUTER_TYPES)}.")
        self.scale = scale
        self.corpora = corpora or CorporaOptions()
        self.python = python
        self.echo = echo
        self.max_concurrent = max_concurrent
        self.out = Path(exp.output_dir)
        self.state = State(self.out / STATE_FILE)
        self.selected = self._expand(stages)
        self.timings: list[StageTiming] = []
        from . import launcher

        self.launcher = launcher
        self.plans = launcher.plan_runs(exp)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _expand(stages: list[str] | None) -> set[str]:
        if not stages:
            return set(STAGES)
        out: set[str] = set()
        for s in stages:
            if s in STAGE_GROUPS:
                out.update(STAGE_GROUPS[s])
            elif s in STAGES:
                out.add(s)
            else:
                raise ValueError(f"--stages {s}: unknown stage; stages are {', '.join(STAGES)} "
                                 f"(and {', '.join(STAGE_GROUPS)}).")
        return out

    @property
    def branch_names(self) -> list[str]:
        return self.exp.domain_names

    @property
    def eval_dir(self) -> Path:
        return self.out / "eval"

    @property
    def report_dir(self) -> Path:
        return self.out / "report"

    @property
    def upcycling_dir(self) -> Path:
        """The upcycling baseline's mix run (checkpoints/, logs/)."""
        return self.out / "baselines" / "upcycling"

    @property
    def upcycled_dir(self) -> Path:
        """The upcycled MoE before its mix phase (outside the run directory, which a changed run
        is moved away with)."""
        return self.out / "baselines" / "upcycled"

    def _decide(self, name: str, config: Any, inputs: dict[str, Any], validate: Callable[[], Check]):
        """(reuse?, why not, check, config hash, inputs) for one stage record."""
        rec = self.state.stages.get(name)
        chash = config_hash(config)
        inputs = json.loads(json.dumps(inputs, sort_keys=True, default=str))
        check = validate()
        if rec is None:
            why = check.reason if not check.ok else "outputs present but not recorded in stages.json"
        elif rec.get("status") != "done":
            why = f"last attempt {rec.get('status')}" + (f": {check.reason}" if not check.ok else "")
        elif not check.ok:
            why = f"output damaged or incomplete: {check.reason}"
        elif rec.get("config") != chash:
            why = "its configuration changed"
        elif rec.get("inputs") != inputs:
            changed = sorted(k for k in set(inputs) | set(rec.get("inputs", {}))
                             if inputs.get(k) != rec.get("inputs", {}).get(k))
            why = f"its inputs changed ({', '.join(changed)})"
        elif rec.get("outputs") != check.fingerprint:
            why = "its outputs changed since they were recorded"
        else:
            why = ""
        return not why, why, check, chash, inputs

    def _ensure(self, name: str, group: str, config: Any, inputs: dict[str, Any],
                validate: Callable[[], Check], build: Callable[[Check], None]) -> dict[str, str]:
        """Reuse stage ``name`` when it validates with the same config and inputs; else build it."""
        return self._ensure_group(group, {name: (config, inputs, validate)},
                                  lambda checks: build(checks[name]), label=name)[name]

    def _ensure_group(self, group: str, members: dict[str, tuple], build: Callable[[dict[str, Check]], None],
                      label: str) -> dict[str, dict[str, str]]:
        """Stages built by one action (the branches: one launcher call; evaluation: one worker).

        Members that are up to date are reused; ``build`` gets the checks of the others."""
        results: dict[str, dict[str, str]] = {}
        todo: dict[str, tuple] = {}
        for name, (config, inputs, validate) in members.items():
            reuse, why, check, chash, inputs = self._decide(name, config, inputs, validate)
            if reuse:
                self.echo(f"[pipeline] {name}: up to date, reused")
                self.timings.append(StageTiming(name, "reused", 0.0))
                results[name] = check.fingerprint
            else:
                todo[name] = (why, check, chash, inputs, validate)
        if not todo:
            return results
        if group not in self.selected:
            name, (why, *_) = next(iter(todo.items()))
            raise PipelineError(f"stage {name} must (re)run ({why}) but --stages does not include {group}.")
        now = time.time()
        for name, (why, check, chash, inputs, _) in todo.items():
            prev = self.state.stages.get(name)
            check.resumable = prev is None or (prev.get("config") == chash and prev.get("inputs") == inputs)
            self.echo(f"[pipeline] {name}: running ({why})")
            self.state.stages[name] = {
                "status": "running", "started": now, "config": chash, "inputs": inputs,
                "executions": int((self.state.stages.get(name) or {}).get("executions", 0)) + 1}
        self.state.save()
        started = time.perf_counter()
        try:
            build({name: item[1] for name, item in todo.items()})
            checks = {name: item[4]() for name, item in todo.items()}
            bad = {n: c.reason for n, c in checks.items() if not c.ok}
            if bad:
                raise PipelineError("finished but the output does not validate: "
                                    + "; ".join(f"{n}: {r}" for n, r in bad.items()))
        except BaseException as exc:
            for name in todo:
                self.state.stages[name].update(status="failed", ended=time.time(),
                                               seconds=round(time.perf_counter() - started, 2),
                                               error=str(exc)[-2000:])
            self.state.save()
            raise
        seconds = round(time.perf_counter() - started, 2)
        for name in todo:
            self.state.stages[name].update(status="done", ended=time.time(), seconds=seconds,
                                           outputs=checks[name].fingerprint)
            if len(todo) > 1:
                self.state.stages[name]["built_with"] = sorted(todo)
            results[name] = checks[name].fingerprint
        self.state.save()
        shown = label if len(todo) == len(members) else f"{label} ({', '.join(todo)})"
        self.timings.append(StageTiming(shown, "ran", seconds))
        self.echo(f"[pipeline] {shown}: done in {seconds:.1f}s")
        return results

    # ------------------------------------------------------------------ stage 1: corpora
    def corpora_dir(self) -> Path | None:
        """The build_corpora directory the experiment reads (tokenizer DIR/tokenizer/tokenizer.model
        and every prefix under DIR/data/), or None for data prepared elsewhere."""
        tok = self.exp.tokenizer_model
        if not tok:
            return None
        root = Path(tok).parent.parent
        if Path(tok) != root / "tokenizer" / "tokenizer.model":
            return None
        prefixes = [e.prefix for d in self.exp.domains for e in d.data] + list(self.exp.eval_domains.values())
        if self.exp.seed.data:
            prefixes += [e.prefix for e in self.exp.seed.data]
        if all(Path(p).parent == root / "data" for p in prefixes):
            return root
        return None

    def _data_prefixes(self) -> list[str]:
        out = {e.prefix for d in self.exp.domains for e in d.data} | set(self.exp.eval_domains.values())
        if self.exp.seed.data:
            out |= {e.prefix for e in self.exp.seed.data}
        return sorted(out)

    def stage_corpora(self) -> dict[str, str]:
        root = self.corpora_dir()
        prefixes = self._data_prefixes()

        def validate() -> Check:
            missing = [p + s for p in prefixes for s in (".bin", ".idx") if not os.path.isfile(p + s)]
            if missing:
                return Check(False, f"missing data files: {', '.join(missing[:3])}")
            if self.exp.tokenizer_model and not os.path.isfile(self.exp.tokenizer_model):
                return Check(False, f"missing tokenizer {self.exp.tokenizer_model}")
            fp = {}
            if root is not None:
                from ..data.corpora import CorporaConfig, _manifest_is_current

                cfg = CorporaConfig(output=str(root), **dataclasses.asdict(self.corpora))
                if not _manifest_is_current(str(root / "manifest.json"), cfg):
                    return Check(False, f"{root / 'manifest.json'} is missing or does not match the files/options")
                fp["manifest"] = file_fingerprint(root / "manifest.json")
            else:
                for p in prefixes:
                    st = os.stat(p + ".bin")
                    fp[p] = f"{st.st_size}:{file_fingerprint(p + '.idx')}"
            if self.exp.tokenizer_model:
                fp["tokenizer"] = file_fingerprint(Path(self.exp.tokenizer_model))
            return Check(True, fingerprint=fp)

        def build(_: Check) -> None:
            if root is None:
                raise PipelineError(
                    "the experiment's data is not a tools/build_corpora.py directory and some prefixes are missing; "
                    "prepare them with tools/preprocess_data.py (see the experiment file's domains).")
            c = self.corpora
            run_logged([self.python, str(REPO_ROOT / "tools" / "build_corpora.py"), "--output", str(root),
                        "--tokens-per-domain", str(c.tokens_per_domain), "--vocab-size", str(c.vocab_size),
                        "--seed", str(c.seed)],
                       self.out / "logs" / "corpora.log", "corpora (tools/build_corpora.py)", echo=self.echo)

        config = {"root": str(root), "corpora": dataclasses.asdict(self.corpora) if root else None}
        return self._ensure("corpora", "corpora", config, {}, validate, build)

    # ------------------------------------------------------------------ training stages (launcher)
    def _train_check(self, plan, kind: str = "dense") -> Callable[[], Check]:
        return lambda: check_training_run(plan.save_dir, plan.name, plan.target_iters, kind)

    def _prepare_resume(self, plan, check: Check, flags: list[str], kind: str = "dense") -> None:
        """Before (re)running a training stage: keep intact progress made with the same flags."""
        resolved = read_json(plan.run_dir / "resolved_config.json") or {}
        if plan.save_dir.exists() and (resolved.get("flags") != flags or not check.resumable):
            # A different run now (other flags, or another seed/merged model to start from):
            # set the old one aside (never deleted) and start over.
            aside = plan.run_dir.with_name(f"{plan.run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            what = "flags" if resolved.get("flags") != flags else "its inputs"
            self.echo(f"[pipeline] {plan.name}: {what} changed since the last start; the old run is kept "
                      f"as {aside} and this one starts over")
            plan.run_dir.rename(aside)
            return
        if plan.save_dir.exists():
            it = roll_back_to_intact(plan.save_dir, plan.name, kind, self.echo)
            self.echo(f"[pipeline] {plan.name}: " + (f"resuming from iteration {it}" if it is not None
                                                     else "no intact checkpoint; starting from the beginning"))

    def _launch(self, plans: list) -> None:
        problems = self.launcher.check_inputs(self.exp, plans)
        if problems:
            raise PipelineError("cannot start " + ", ".join(p.name for p in plans) + ":\n  - " + "\n  - ".join(problems))
        runner = self.launcher.LocalRunner(self.exp, max_concurrent=self.max_concurrent, python=self.python,
                                           echo=self.echo)
        results = runner.run(plans)
        failed = {n: c for n, c in results.items() if c != 0}
        if failed:
            logs = ", ".join(f"{n} (exit {c}): {self.plans[n].run_dir / 'logs' / 'train.log'}" for n, c in failed.items())
            raise PipelineError(f"training run(s) failed: {logs}")

    def _plan_inputs(self, plan) -> dict[str, Any]:
        return {"init": self.state.stages.get(SEED_NAME, {}).get("outputs") if plan.init_checkpoint else None}

    def stage_seed(self, corpora_fp: dict) -> dict[str, str]:
        if not self.exp.seed.trained_here:
            root = self.exp.seed_checkpoint

            def validate() -> Check:
                return check_checkpoint_root(root, "seed checkpoint", kind="dense")

            def build(check: Check) -> None:
                raise PipelineError(f"seed.checkpoint {root} is not usable: {check.reason}")

            return self._ensure(SEED_NAME, "seed", {"checkpoint": str(root)}, {}, validate, build)
        plan = self.plans[SEED_NAME]
        flags = plan.base_argv()

        def build(check: Check) -> None:
            self._prepare_resume(plan, check, flags)
            self._launch([plan])

        return self._ensure(SEED_NAME, "seed", flags, {"corpora": corpora_fp}, self._train_check(plan), build)

    def stage_branches(self, seed_fp: dict) -> dict[str, dict[str, str]]:
        """Every branch is its own stage record; the ones to (re)build start in one launcher call,
        so they run concurrently where the machine has room."""
        members = {}
        for name in self.branch_names:
            plan = self.plans[name]
            members[f"branch:{name}"] = (plan.base_argv(), {"seed": seed_fp}, self._train_check(plan))

        def build(checks: dict[str, Check]) -> None:
            plans = [self.plans[stage.split(":", 1)[1]] for stage in checks]
            for plan in plans:
                self._prepare_resume(plan, checks[f"branch:{plan.name}"], plan.base_argv())
            self._launch(plans)

        out = self._ensure_group("branches", members, build, label="branches")
        return {stage.split(":", 1)[1]: fp for stage, fp in out.items()}

    # ------------------------------------------------------------------ merges
    def _merge_check(self, root: Path, label: str, num_experts: int) -> Callable[[], Check]:
        def validate() -> Check:
            check = check_checkpoint_root(root, label, 0, kind="moe")
            if check.ok:
                manifest = fmt.read_manifest(fmt.iteration_dir(root, 0))
                if manifest.get("model", {}).get("num_experts") != num_experts:
                    return Check(False, f"{label}: {root} has {manifest.get('model', {}).get('num_experts')} "
                                        f"experts, expected {num_experts}")
            return check
        return validate

    def merge_command(self) -> list[str]:
        m = self.exp.merge
        cmd = [self.python, str(REPO_ROOT / "tools" / "merge_branches.py")]
        for name in self.branch_names:
            cmd += ["--branch", f"{name}={self.plans[name].save_dir}"]
        if m.with_seed_expert:
            cmd += ["--seed-expert", str(self.exp.seed_checkpoint)]
        if m.weights:
            cmd += ["--weights", ",".join(f"{k}={v}" for k, v in m.weights.items())]
        if m.method == "split":
            cmd += ["--split-experts", str(m.split_experts or 2)]
        elif m.method == "blend":
            cmd += ["--blend-experts"]
        cmd += ["--router-init", m.router_init, "--router-seed", str(m.router_seed)]
        if m.router_init == "centroid":
            # Every prefix of a source's data (repeating a name averages over its prefixes).
            for d in self.exp.domains:
                cmd += [x for e in d.data for x in ("--centroid-data", f"{d.name}={e.prefix}")]
            if m.with_seed_expert and self.exp.seed.data:
                cmd += [x for e in self.exp.seed.data for x in ("--centroid-data", f"{SEED_NAME}={e.prefix}")]
            cmd += ["--tokenizer-type", self.exp.tokenizer_type, "--tokenizer-model", self.exp.tokenizer_model]
        cmd += ["--moe-router-topk", str(self.mix_topk()), "--output", str(self.exp.merged_dir), "--overwrite"]
        return cmd

    @property
    def num_btx_experts(self) -> int:
        m = self.exp.merge
        n = len(self.branch_names) + (1 if m.with_seed_expert else 0)
        return n * (m.split_experts or 2) if m.method == "split" else n

    def mix_topk(self) -> int:
        return int(self.exp.mix.model.get("moe_router_topk", 2))

    def stage_merge(self, seed_fp: dict, branch_fps: dict) -> dict[str, str]:
        cmd = self.merge_command()
        root = self.exp.merged_dir

        def build(_: Check) -> None:
            run_logged(cmd, self.out / "logs" / "merge.log", "merge (tools/merge_branches.py)",
                       env=single_process_env(), echo=self.echo)

        return self._ensure("merge", "merge", cmd[2:], {"seed": seed_fp, "branches": branch_fps},
                            self._merge_check(root, "merged BTX checkpoint", self.num_btx_experts), build)

    def upcycling_num_experts(self) -> int:
        return int(self.exp.baselines.upcycling.get("num_experts") or self.num_btx_experts)

    # ------------------------------------------------------------------ mix phase (BTX and upcycling)
    def mix_config(self, save: Path, num_experts: int, router: dict[str, Any] | None = None):
        """The mix-phase Config: the dense shape + mix.model (+ ``router`` overrides), the mix
        blend, the mix options."""
        from ..config import Config

        exp = self.exp
        data = dict(exp.data_options)
        data.update(data_path=blend_to_data_path(exp.mix_blend()),
                    eval_domains={k: [v] for k, v in exp.eval_domains.items()},
                    tokenizer_type=exp.tokenizer_type, tokenizer_model=exp.tokenizer_model)
        sections = {s: dict(v) for s, v in exp.mix.options.sections.items()}
        sections["checkpoint"]["save"] = str(save)
        model = {**exp.model, **exp.mix.model, **(router or {}), "num_experts": num_experts}
        budget = exp.mix.budget
        if budget.train_iters:
            sections["train"]["train_iters"] = budget.train_iters
        try:
            cfg = Config.from_dict({"model": model, "data": data, **sections})
            cfg.validate_layout(exp.mix.options.launch.world_size)
        except (TypeError, ValueError) as exc:
            raise ExperimentError(f"mix: {exc}") from None
        if budget.tokens is not None:
            cfg.train.train_iters = max(1, math.ceil(budget.tokens / (cfg.train.global_batch_size * cfg.model.seq_length)))
        elif not budget.train_iters:
            # Default budget: as many iterations as the longest branch.
            cfg.train.train_iters = max(self.plans[n].target_iters for n in self.branch_names)
        return cfg

    def _mix_stage(self, name: str, group: str, run_dir: Path, merged: Path, merged_fp: dict,
                   num_experts: int, router: dict[str, Any] | None = None) -> dict[str, str]:
        from ..config import config_to_argv

        cfg = self.mix_config(run_dir / "checkpoints", num_experts, router)
        flags = config_to_argv(cfg)
        save = run_dir / "checkpoints"
        iters = cfg.train.train_iters
        launch = self.exp.mix.options.launch

        def validate() -> Check:
            return check_training_run(save, name, iters, "moe")

        def build(check: Check) -> None:
            plan = _MixRun(name, run_dir, save)
            self._prepare_resume(plan, check, flags, kind="moe")
            run_dir.mkdir(parents=True, exist_ok=True)
            argv = flags + ["--load", str(merged)]
            if launch.nodes != 1:
                raise PipelineError(f"{name}: local runs use one node; mix.launch.nodes is {launch.nodes}.")
            if launch.nproc_per_node == 1:
                cmd, env = [self.python, "-m", "btx_megatron.pretrain_mix", *argv], single_process_env()
            else:
                cmd = [self.python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                       str(launch.nproc_per_node), "--master-addr", "127.0.0.1", "--master-port",
                       str(_free_port()), "-m", "btx_megatron.pretrain_mix", *argv]
                env = {}
            fmt.write_json_atomic(run_dir / "resolved_config.json", {
                "run": name, "flags": flags, "load": str(merged), "train_iters": iters,
                "command": cmd, "config": cfg.to_dict()})
            fmt.write_text_atomic(run_dir / "command.sh", f"#!/bin/bash\ncd {shlex.quote(str(REPO_ROOT))}\n"
                                  + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd) + "\n")
            run_logged(cmd, run_dir / "logs" / "train.log", f"{name} (btx_megatron.pretrain_mix)", env=env,
                       echo=self.echo)

        return self._ensure(name, group, flags, {"merged": merged_fp}, validate, build)

    def stage_mix(self, merged_fp: dict) -> dict[str, str]:
        return self._mix_stage("mix", "mix", self.exp.mix_dir, self.exp.merged_dir, merged_fp, self.num_btx_experts)

    def router_variant_dir(self, router_type: str) -> Path:
        return self.exp.mix_dir.with_name(f"{self.exp.mix_dir.name}_{router_type}")

    def stage_router_variants(self, merged_fp: dict) -> dict[str, dict[str, str]]:
        """The same merged model, mixed with each extra router type (paper, Table 4)."""
        out = {}
        for rt in self.router_variants:
            router = {"moe_router_type": rt}
            if rt == "switch":
                router["moe_expert_capacity_factor"] = 1.5  # the paper's Switch setting
            out[rt] = self._mix_stage(f"mix:{rt}", "mix", self.router_variant_dir(rt), self.exp.merged_dir,
                                      merged_fp, self.num_btx_experts, router)
        return out

    def stage_upcycling(self, seed_fp: dict) -> dict[str, str]:
        root = self.upcycled_dir
        n = self.upcycling_num_experts()
        noise = self.exp.baselines.upcycling.get("noise")
        cmd = [self.python, str(REPO_ROOT / "tools" / "merge_branches.py"), "--upcycle-from",
               str(self.exp.seed_checkpoint), "--num-experts", str(n), "--router-init", "random",
               "--router-seed", str(self.exp.merge.router_seed), "--moe-router-topk", str(self.mix_topk()),
               "--output", str(root), "--overwrite"]
        if noise:
            cmd += ["--upcycle-noise", str(noise)]

        def build(_: Check) -> None:
            run_logged(cmd, self.out / "logs" / "upcycling_merge.log", "upcycling merge (tools/merge_branches.py)",
                       env=single_process_env(), echo=self.echo)

        merged_fp = self._ensure("upcycling:merge", "upcycling", cmd[2:], {"seed": seed_fp},
                                 self._merge_check(root, "upcycled checkpoint", n), build)
        return self._mix_stage("upcycling:mix", "upcycling", self.upcycling_dir, root, merged_fp, n)

    # ------------------------------------------------------------------ dense baseline
    def dense_plan(self):
        """The launcher's dense plan, continued on the mix data for the FLOPs of branches + mix."""
        from ..training.metrics import flops_per_token

        plan = copy.deepcopy(self.plans[DENSE_NAME])
        dense = self.exp.baselines.dense
        blend = dense.data if dense.data is not None else self.exp.mix_blend()
        plan.blend = blend
        plan.config.data.data_path = blend_to_data_path(blend)
        if not dense.budget.given:
            total = 0.0
            for run in [*self.branch_names, "mix"]:
                save = self.exp.mix_dir / "checkpoints" if run == "mix" else self.plans[run].save_dir
                summary = read_json(save / "eval_summary.json")
                if not summary or "flops" not in summary:
                    raise PipelineError(f"dense baseline: {save / 'eval_summary.json'} has no 'flops' "
                                        "(run the branches and the mix phase first).")
                total += float(summary["flops"])
            model = copy.deepcopy(plan.config.model)
            if model.vocab_size is None:
                model.vocab_size = self.launcher.resolved_vocab_size(self.exp)
            per_iter = flops_per_token(model, model.seq_length) * plan.tokens_per_iter
            plan.config.train.train_iters = max(1, round(total / per_iter))
            self.dense_target_flops = total
        return plan

    def stage_dense(self, seed_fp: dict, branch_fps: dict, mix_fp: dict) -> dict[str, str]:
        plan = self.dense_plan()
        flags = plan.base_argv()

        def build(check: Check) -> None:
            self._prepare_resume(plan, check, flags)
            self._launch([plan])

        # The budget follows from the branches' and the mix's FLOPs, which are part of the flags.
        return self._ensure(DENSE_NAME, "dense", flags, {"seed": seed_fp}, self._train_check(plan), build)

    # ------------------------------------------------------------------ evaluation
    def eval_models(self) -> dict[str, dict[str, Any]]:
        """Every model of the results table: name -> {"path"} or {"btm": {branch: path}}."""
        models: dict[str, dict[str, Any]] = {SEED_NAME: {"path": str(self.exp.seed_checkpoint)}}
        for name in self.branch_names:
            models[name] = {"path": str(self.plans[name].save_dir)}
        if self.exp.baselines.dense.enabled:
            models[DENSE_NAME] = {"path": str(self.plans[DENSE_NAME].save_dir)}
        if self.exp.baselines.upcycling.get("enabled", True):
            models["upcycling"] = {"path": str(self.upcycling_dir / "checkpoints")}
        if self.exp.baselines.btm.get("enabled", True):
            models["btm"] = {"btm": {n: str(self.plans[n].save_dir) for n in self.branch_names},
                             "train_data": {n: [e.prefix for e in self.exp.domain(n).data] for n in self.branch_names},
                             "top_k": int(self.exp.baselines.btm.get("top_k", 2))}
        # The merged model before any mix-phase step: how much of the branches the merge keeps.
        models[MERGED_ROW] = {"path": str(self.exp.merged_dir)}
        own = {d: d for d in self.exp.eval_domains if d in self.branch_names}
        if own and self.exp.merge.method == "btx":
            models[ORACLE_ROW] = {"path": str(self.exp.merged_dir), "force_expert": own}
        models["btx"] = {"path": str(self.exp.mix_dir / "checkpoints")}
        for rt in self.router_variants:
            models[f"btx_{rt}"] = {"path": str(self.router_variant_dir(rt) / "checkpoints")}
        return models

    def eval_num_samples(self) -> int:
        gbs = self.plans[self.branch_names[0]].config.train.global_batch_size
        return self.exp.evaluation.eval_iters * gbs

    def stage_evaluate(self, fps: dict[str, dict]) -> dict[str, str]:
        models = self.eval_models()
        spec_common = {
            "domains": {k: [v] for k, v in self.exp.eval_domains.items()},
            "tokenizer_type": self.exp.tokenizer_type, "tokenizer_model": self.exp.tokenizer_model,
            "num_samples": self.eval_num_samples(),
        }
        members = {f"evaluate:{name}": ({**spec_common, **model}, {"model": fps[name]},
                                        _eval_check(self.eval_dir / f"{name}.json", list(self.exp.eval_domains)))
                   for name, model in models.items()}

        def build(checks: dict[str, Check]) -> None:
            names = [stage.split(":", 1)[1] for stage in checks]
            spec = {**spec_common, "models": {n: models[n] for n in names},
                    "outputs": {n: str(self.eval_dir / f"{n}.json") for n in names}}
            self.eval_dir.mkdir(parents=True, exist_ok=True)
            spec_path = self.eval_dir / "eval_spec.json"
            fmt.write_json_atomic(spec_path, spec)
            for n in names:
                (self.eval_dir / f"{n}.json").unlink(missing_ok=True)
            run_logged([self.python, "-m", "btx_megatron.btx.pipeline", "eval-worker", str(spec_path)],
                       self.out / "logs" / "evaluate.log", "evaluation", env=single_process_env(), echo=self.echo)

        out = self._ensure_group("evaluate", members, build, label="evaluate")
        return {stage.split(":", 1)[1]: fp["result"] for stage, fp in out.items()}

    # ------------------------------------------------------------------ routing and report
    def stage_routing(self, mix_fp: dict) -> dict[str, str]:
        out = self.report_dir / "routing"
        domains = list(self.exp.eval_domains)
        cmd = [self.python, str(REPO_ROOT / "tools" / "analyze_routing.py"), "--load", str(self.exp.mix_dir / "checkpoints")]
        for name, prefix in self.exp.eval_domains.items():
            cmd += ["--data", f"{name}={prefix}"]
        cmd += ["--output", str(out), "--overwrite", "--num-batches", str(max(2, self.exp.evaluation.eval_iters)),
                "--micro-batch-size", "4"]

        def validate() -> Check:
            report = read_json(out / "routing.json")
            if not isinstance(report, dict) or set(report.get("domains", {})) != set(domains):
                return Check(False, f"{out / 'routing.json'} is missing or does not cover {', '.join(domains)}")
            missing = [d for d in domains if not (out / f"routing_{d}.png").is_file()]
            if missing:
                return Check(False, f"routing heatmaps missing for {', '.join(missing)}")
            return Check(True, fingerprint={"routing": file_fingerprint(out / "routing.json")})

        def build(_: Check) -> None:
            run_logged(cmd, self.out / "logs" / "routing.log", "routing analysis (tools/analyze_routing.py)",
                       env=single_process_env(), echo=self.echo)

        return self._ensure("routing", "routing", cmd[2:], {"mix": mix_fp}, validate, build)

    def stage_report(self, eval_fps: dict[str, str], routing_fp: dict) -> dict[str, str]:
        files = ["results.md", "results.json", "loss_curves.png", "perplexity.png"]

        def validate() -> Check:
            missing = [f for f in files if not (self.report_dir / f).is_file()]
            if missing:
                return Check(False, f"missing {', '.join(missing)} in {self.report_dir}")
            if not isinstance(read_json(self.report_dir / "results.json"), dict):
                return Check(False, f"{self.report_dir / 'results.json'} does not parse")
            return Check(True, fingerprint={f: file_fingerprint(self.report_dir / f) for f in files})

        def build(_: Check) -> None:
            write_report(self)

        return self._ensure("report", "report", {"files": files}, {"eval": eval_fps, "routing": routing_fp},
                            validate, build)

    # ------------------------------------------------------------------ all of it
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.echo(f"[pipeline] experiment {self.exp.name} ({self.exp.source}), scale {self.scale}, output {self.out}")
        try:
            fmt.write_text_atomic(self.out / "experiment.resolved.yaml",
                                  yaml.safe_dump(self.exp.raw, sort_keys=False))
            last = max(STAGES.index(st) for st in self.selected)

            def wanted(stage: str) -> bool:
                # Stages after the last selected one are not looked at (--stages corpora seed
                # stops after the seed); earlier unselected ones must be up to date.
                return STAGES.index(stage) <= last

            corpora_fp = self.stage_corpora()
            seed_fp = self.stage_seed(corpora_fp) if wanted("seed") else None
            branch_fps = self.stage_branches(seed_fp) if wanted("branches") else None
            merged_fp = self.stage_merge(seed_fp, branch_fps) if wanted("merge") else None
            mix_fp = self.stage_mix(merged_fp) if wanted("mix") else None
            fps: dict[str, dict] = {SEED_NAME: seed_fp, **(branch_fps or {}), "btx": mix_fp,
                                    MERGED_ROW: merged_fp, ORACLE_ROW: merged_fp,
                                    "btm": {"branches": branch_fps}}
            if wanted("mix"):
                fps.update({f"btx_{rt}": fp for rt, fp in self.stage_router_variants(merged_fp).items()})
            if self.exp.baselines.dense.enabled and wanted("dense"):
                fps[DENSE_NAME] = self.stage_dense(seed_fp, branch_fps, mix_fp)
            if self.exp.baselines.upcycling.get("enabled", True) and wanted("upcycling"):
                fps["upcycling"] = self.stage_upcycling(seed_fp)
            if not wanted("evaluate"):
                return {}
            eval_fps = self.stage_evaluate(fps)
            if not wanted("routing"):
                return {}
            routing_fp = self.stage_routing(mix_fp)
            if not wanted("report"):
                return {}
            self.stage_report(eval_fps, routing_fp)
        finally:
            self.print_timings(time.perf_counter() - started)
        table = (self.report_dir / "results.md").read_text()
        self.echo("\n" + table)
        return read_json(self.report_dir / "results.json")

    def print_timings(self, total: float) -> None:
        self.echo("\n[pipeline] stage wall times (this invocation; 'recorded' = when the stage last ran)")
        for t in self.timings:
            rec = self.state.stages.get(t.name, {})
            recorded = rec.get("seconds")
            line = f"  {t.name:<22} {t.action:<7} {t.seconds:8.1f}s"
            if t.action == "reused" and recorded is not None:
                line += f"   (recorded {recorded:.1f}s)"
            self.echo(line)
        self.echo(f"  {'total':<22} {'':<7} {total:8.1f}s")


@dataclass
class _MixRun:
    """The bits of a launcher RunPlan that roll-back needs, for the mix-phase runs."""

    name: str
    run_dir: Path
    save_dir: Path


def _eval_check(path: Path, domains: list[str]) -> Callable[[], Check]:
    def validate() -> Check:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
            return Check(False, f"{path} is missing or does not parse")
        for d in domains:
            loss = (data["domains"].get(d) or {}).get("loss")
            if not isinstance(loss, (int, float)) or not math.isfinite(loss):
                return Check(False, f"{path}: no finite loss for domain {d}")
        return Check(True, fingerprint={"result": file_fingerprint(path)})
    return validate


# ---------------------------------------------------------------------------------------------
# Evaluation worker (one process evaluates every model that needs it)
# ---------------------------------------------------------------------------------------------

def eval_worker(spec_path: str) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    from .evaluation import evaluate_checkpoint

    spec = json.loads(Path(spec_path).read_text())
    common = {"tokenizer_type": spec["tokenizer_type"], "tokenizer_model": spec["tokenizer_model"],
              "num_samples": spec["num_samples"]}
    from .evaluation import summarize

    # BTM scores every branch alone on the same sequences on its way to the ensemble: run it
    # first and take those figures for the branch rows instead of evaluating the branches twice.
    order = sorted(spec["models"], key=lambda n: "btm" not in spec["models"][n])
    alone: dict[str, dict] = {}
    for name in order:
        model = spec["models"][name]
        started = time.perf_counter()
        if "btm" in model:
            from .btm import BTMOptions, evaluate_btm

            result = evaluate_btm(model["btm"], model["train_data"], spec["domains"],
                                  btm=BTMOptions(topk=model["top_k"]), **common)
            for branch, path in model["btm"].items():
                alone[str(path)] = {"checkpoint": str(path), "kind": "dense", "scored_in": "btm",
                                    "seq_length": result["seq_length"], "num_samples": result["num_samples"],
                                    "domains": result["branches"][branch], **summarize(result["branches"][branch])}
        elif str(model["path"]) in alone:
            result = alone[str(model["path"])]
        else:
            result = evaluate_checkpoint(model["path"], spec["domains"], force_expert=model.get("force_expert"),
                                         **common)
        result["model"] = name
        result["eval_seconds"] = round(time.perf_counter() - started, 2)
        fmt.write_json_atomic(spec["outputs"][name], result)
        print(f"[eval] {name}: average loss {result['average_loss']:.4f} in {result['eval_seconds']:.1f}s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Report (results table + loss curves)
# ---------------------------------------------------------------------------------------------

def _summary(save: Path) -> dict:
    return read_json(save / "eval_summary.json") or {}


def results_rows(p: Pipeline) -> tuple[list[dict[str, Any]], tuple[float, float]]:
    """One row per model: per-domain perplexity, average, training tokens/FLOPs after the seed."""
    exp = p.exp
    domains = list(exp.eval_domains)
    cost: dict[str, tuple[float, float]] = {}

    def stage_cost(save: Path) -> tuple[float, float]:
        s = _summary(save)
        return float(s.get("tokens", 0)), float(s.get("flops", 0.0))

    seed_cost = stage_cost(exp.seed_checkpoint) if exp.seed.trained_here else (0.0, 0.0)
    branch_cost = {n: stage_cost(p.plans[n].save_dir) for n in p.branch_names}
    mix_cost = stage_cost(exp.mix_dir / "checkpoints")
    branches_total = (sum(c[0] for c in branch_cost.values()), sum(c[1] for c in branch_cost.values()))
    cost[SEED_NAME] = (0.0, 0.0)
    cost.update(branch_cost)
    if exp.baselines.dense.enabled:
        cost[DENSE_NAME] = stage_cost(p.plans[DENSE_NAME].save_dir)
    if exp.baselines.upcycling.get("enabled", True):
        cost["upcycling"] = stage_cost(p.upcycling_dir / "checkpoints")
    cost["btm"] = branches_total
    cost["btx"] = (branches_total[0] + mix_cost[0], branches_total[1] + mix_cost[1])
    cost[MERGED_ROW] = cost[ORACLE_ROW] = branches_total
    for rt in p.router_variants:
        c = stage_cost(p.router_variant_dir(rt) / "checkpoints")
        cost[f"btx_{rt}"] = (branches_total[0] + c[0], branches_total[1] + c[1])
    labels = {SEED_NAME: "seed", DENSE_NAME: "dense (compute-matched)", "upcycling": "sparse upcycling",
              "btm": f"BTM top-{exp.baselines.btm.get('top_k', 2)}",
              "btx": f"BTX {exp.mix.model.get('moe_router_type', 'topk')}-{p.mix_topk()}",
              MERGED_ROW: "BTX merged, before the mix phase",
              ORACLE_ROW: "BTX merged, oracle routing (domain -> own expert)"}
    rows = []
    for name in p.eval_models():
        data = read_json(p.eval_dir / f"{name}.json") or {}
        per = {d: (data.get("domains", {}).get(d) or {}) for d in domains}
        rows.append({
            "model": name,
            "label": labels.get(name, f"BTX {name[4:]}" if name.startswith("btx_") else f"branch {name}"),
            "ppl": {d: per[d].get("ppl") for d in domains}, "loss": {d: per[d].get("loss") for d in domains},
            "average_ppl": data.get("average_ppl"), "average_loss": data.get("average_loss"),
            "tokens": cost.get(name, (0, 0))[0], "flops": cost.get(name, (0, 0))[1],
        })
    return rows, seed_cost


def shape_checks(rows: list[dict], domains: list[str], branches: list[str]) -> dict[str, Any]:
    """The paper's qualitative claims, evaluated on this table."""
    by = {r["model"]: r for r in rows}
    dense_models = [m for m in (SEED_NAME, *branches, DENSE_NAME) if m in by]
    out: dict[str, Any] = {}
    for d in domains:
        if d in by:
            best = min(dense_models, key=lambda m: by[m]["loss"][d])
            out[f"branch {d} best dense model on {d}"] = best == d
    if DENSE_NAME in by and "btx" in by:
        out["BTX beats dense on the average"] = by["btx"]["average_loss"] < by[DENSE_NAME]["average_loss"]
    if "btx" in by:
        gaps = {d: by["btx"]["ppl"][d] / min(by[m]["ppl"][d] for m in branches) - 1 for d in domains}
        out["BTX ppl gap to the best branch per domain (%)"] = {d: round(100 * g, 1) for d, g in gaps.items()}
    # How much of each branch's gain over the seed survives the merge (averaged shared weights)
    # when routing is perfect: 100% = the branch itself, 0% = the seed.
    if ORACLE_ROW in by and SEED_NAME in by:
        kept = {}
        for d in domains:
            if d in by and by[SEED_NAME]["loss"][d] != by[d]["loss"][d]:
                gain = by[SEED_NAME]["loss"][d] - by[d]["loss"][d]
                kept[d] = round(100 * (by[SEED_NAME]["loss"][d] - by[ORACLE_ROW]["loss"][d]) / gain, 1)
        out["share of each branch's loss gain kept by the merge, oracle routing (%)"] = kept
    return out


def _kind(model: str, branches: list[str]) -> str:
    if model in branches:
        return "branch"
    if model.startswith("btx"):
        return "btx"
    return model if model in (SEED_NAME, DENSE_NAME, "upcycling", "btm") else "other"


def write_report(p: Pipeline) -> None:
    """results.md / results.json / perplexity.png / loss_curves.png via :mod:`.report`."""
    from . import report

    exp = p.exp
    domains = list(exp.eval_domains)
    rows, seed_cost = results_rows(p)
    checks = shape_checks(rows, domains, p.branch_names)
    result_rows = []
    for r in rows:
        data = read_json(p.eval_dir / f"{r['model']}.json") or {}
        # report's convention: a row's cost includes the stages it starts from (the seed).
        result_rows.append(report.row_from_eval(
            r["label"], _kind(r["model"], p.branch_names), data,
            train_tokens=r["tokens"] + seed_cost[0], train_flops=r["flops"] + seed_cost[1],
            notes="evaluation-only ensemble of the branches" if r["model"] == "btm" else ""))
    metrics, offsets = stage_curves(p)
    notes = [f"Seed pretraining (in every row's cost): {seed_cost[0] / 1e6:.3f}M tokens, {seed_cost[1]:.3e} FLOPs; "
             "BTX = seed + branches + mix; the dense baseline is FLOP-matched to branches + mix."]
    notes += [f"shape check: {k}: {v}" for k, v in checks.items()]
    report.write_report(
        result_rows, p.report_dir, stage_metrics=metrics, stage_offsets=offsets,
        routing_dir=p.report_dir / "routing", title=f"{exp.name}: per-domain validation perplexity",
        notes=notes, echo=False,
        extra={"experiment": exp.name, "scale": p.scale, "models": [r["model"] for r in rows],
               "seed": {"tokens": seed_cost[0], "flops": seed_cost[1]}, "shape_checks": checks})


def stage_curves(p: Pipeline) -> tuple[dict[str, Path], dict[str, float]]:
    """Each training stage's metrics.jsonl and its x offset (tokens since the seed's start)."""
    exp = p.exp
    metrics: dict[str, Path] = {}
    offsets: dict[str, float] = {}

    def add(label: str, save: Path, offset: float) -> None:
        if (save / "metrics.jsonl").is_file():
            metrics[label], offsets[label] = save / "metrics.jsonl", offset

    seed_tokens = float(_summary(exp.seed_checkpoint).get("tokens", 0)) if exp.seed.trained_here else 0.0
    if exp.seed.trained_here:
        add("seed", exp.seed_checkpoint, 0.0)
    for n in p.branch_names:
        add(f"branch {n}", p.plans[n].save_dir, seed_tokens)
    branch_tokens = sum(float(_summary(p.plans[n].save_dir).get("tokens", 0)) for n in p.branch_names)
    add("BTX mix", exp.mix_dir / "checkpoints", seed_tokens + branch_tokens)
    for rt in p.router_variants:
        add(f"BTX mix ({rt})", p.router_variant_dir(rt) / "checkpoints", seed_tokens + branch_tokens)
    if exp.baselines.dense.enabled:
        add("dense", p.plans[DENSE_NAME].save_dir, seed_tokens)
    if exp.baselines.upcycling.get("enabled", True):
        add("upcycling mix", p.upcycling_dir / "checkpoints", seed_tokens)
    return metrics, offsets


# ---------------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------------

def load_pipeline(experiment: str, *, output: str | None = None, scale: str = "tiny", data_dir: str | None = None,
                  stages: list[str] | None = None, echo: Callable[[str], None] = print,
                  max_concurrent: int | None = None, router_variants: list[str] | None = None,
                  corpora_vocab_size: int | None = None, corpora_tokens_per_domain: int | None = None) -> Pipeline:
    """Read the experiment file, apply the scale and the output override, plan every stage."""
    path = Path(experiment)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist.")
    if data_dir:
        os.environ["BTX_DATA_DIR"] = os.path.abspath(data_dir)
    raw = yaml.safe_load(path.read_text())
    raw, corpora = apply_scale(raw, scale)
    if output:
        raw["output_dir"] = os.path.abspath(output)
    exp = parse_experiment(raw, str(path))
    # The experiment's corpora section, then the command line's overrides.
    corpora = dataclasses.replace(corpora, **exp.corpora)
    if corpora_vocab_size:
        corpora.vocab_size = corpora_vocab_size
    if corpora_tokens_per_domain:
        corpora.tokens_per_domain = corpora_tokens_per_domain
    return Pipeline(exp, scale=scale, corpora=corpora, stages=stages, echo=echo, max_concurrent=max_concurrent,
                    router_variants=router_variants)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "eval-worker":
        sys.exit(eval_worker(sys.argv[2]))
    print("usage: python -m btx_megatron.btx.pipeline eval-worker SPEC.json "
          "(the pipeline itself: python tools/run_experiment.py EXPERIMENT.yaml)", file=sys.stderr)
    sys.exit(2)
