"""The end-to-end BTX experiment: every stage of one experiment file, resumable and checked.

    python tools/run_experiment.py examples/tiny/experiment.yaml [--output DIR] [--stages ...]

Stages, in order (each reads the outputs of the ones before it)::

    corpora    built-in corpora + tokenizer (btx_megatron.data.corpora), when the experiment's data
               lives in a corpora directory; otherwise the data prefixes are only checked
    seed       pretrain the dense seed on a mix of the domains (launch.local)
    branches   one dense branch per domain from the seed (--finetune), concurrently where possible
    merge      branches' FFNs -> experts, seed FFN as an extra expert, new router (btx_megatron.merge)
    mix        MoE finetuning of the merged model on the mix data (btx_megatron.pretrain_mix);
               with router variants also one run per extra router type (mix:soft, ...)
    dense      baseline: the seed continued on the mix data for the FLOPs of branches + mix
    upcycling  baseline: the seed's FFN copied into N experts, then the same mix phase
    evaluate   per-domain loss/perplexity of every model, and the BTM ensemble of the branches
    tasks      per-domain accuracy of every model on the built-in downstream tasks (lm-eval)
    routing    routing heatmaps of the BTX model per domain (btx_megatron.eval.routing)
    report     results table (markdown + JSON), loss curves and perplexity PNGs

Training runs are the :class:`~btx_megatron.launch.plan.RunPlan` of :mod:`btx_megatron.launch`;
the other jobs run in a child process through :mod:`.worker`. The evaluate, tasks and routing
stages are in :mod:`.evaluation`; stage state, reuse and roll-back are in :mod:`.state`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .. import checkpoint as fmt
from ..config.experiment import DENSE_NAME, SEED_NAME, Experiment, ExperimentError
from ..config.experiment_file import apply_overrides, parse_experiment, read_experiment_document
from ..config.model import ROUTER_TYPES
from ..launch import plan as planning
from ..launch.local import LocalRunner
from ..launch.plan import MIX_NAME, UPCYCLING_NAME, RunPlan
from ..runtime.processes import ChildFailed, run_logged
from . import results
from .evaluation import MERGED_ROW, ORACLE_ROW, stage_evaluate, stage_routing, stage_tasks
from .state import (
    STATE_FILE, Check, PipelineError, StageRunner, State, check_checkpoint_root, check_training_run, file_fingerprint,
    read_json, roll_back_to_intact,
)

STAGES = ("corpora", "seed", "branches", "merge", "mix", "dense", "upcycling", "evaluate", "tasks", "routing",
          "report")
STAGE_GROUPS = {"baselines": ("dense", "upcycling")}
# Run only when named in --stages, after the stages above (grow: experiment/grow.py).
OPTIONAL_STAGES = ("grow",)
REPO_ROOT = Path(__file__).resolve().parents[2]


def expand_stages(stages: list[str] | None) -> set[str]:
    if not stages:
        return set(STAGES)
    out: set[str] = set()
    for s in stages:
        if s in STAGE_GROUPS:
            out.update(STAGE_GROUPS[s])
        elif s in STAGES or s in OPTIONAL_STAGES:
            out.add(s)
        else:
            raise ValueError(f"--stages {s}: unknown stage; stages are {', '.join(STAGES)} "
                             f"(and {', '.join(STAGE_GROUPS)}; optional: {', '.join(OPTIONAL_STAGES)}).")
    return out


class Pipeline:
    """Runs the stages of one experiment; see the module docstring."""

    def __init__(self, exp: Experiment, *, stages: list[str] | None = None, python: str = sys.executable,
                 echo: Callable[[str], None] = print, max_concurrent: int | None = None,
                 router_variants: list[str] | None = None):
        self.exp = exp
        default_router = exp.mix.model.get("moe_router_type", "topk")
        self.router_variants = [r for r in (router_variants or []) if r != default_router]
        bad = [r for r in self.router_variants if r not in ROUTER_TYPES]
        if bad:
            raise ValueError(f"--router-variants {' '.join(bad)}: router types are {', '.join(ROUTER_TYPES)}.")
        self.python = python
        self.echo = echo
        self.max_concurrent = max_concurrent
        self.out = Path(exp.output_dir)
        self.runner = StageRunner(State(self.out / STATE_FILE), expand_stages(stages), echo)
        self.plans = planning.plan_runs(exp, self.router_variants)

    # ------------------------------------------------------------------ paths and names
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
    def seed_checkpoint(self) -> Path:
        """The seed every branch starts from (a run of this experiment, or a given checkpoint)."""
        return self.plans[SEED_NAME].save_dir if self.exp.seed.trained_here else self.exp.seed_checkpoint

    def variant_plans(self) -> dict[str, RunPlan]:
        """Router variant -> its mix run."""
        return {rt: self.plans[f"{MIX_NAME}:{rt}"] for rt in self.router_variants}

    # ------------------------------------------------------------------ running things
    def _job(self, job: str, spec: dict[str, Any], log: str, label: str) -> None:
        """Run a :mod:`.worker` job in a child process (its spec next to its log)."""
        spec_path = self.out / "logs" / f"{log}.spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        fmt.write_json_atomic(spec_path, spec)
        try:
            run_logged([self.python, "-m", "btx_megatron.experiment.worker", job, str(spec_path)],
                       self.out / "logs" / f"{log}.log", label, cwd=REPO_ROOT, echo=self.echo)
        except ChildFailed as exc:
            raise PipelineError(str(exc)) from None

    def _train_check(self, plan: RunPlan) -> Callable[[], Check]:
        kind = "moe" if plan.config.model.is_moe else "dense"

        def validate() -> Check:
            check = check_training_run(plan.save_dir, plan.name, plan.target_iters, kind)
            if self.exp.shared_runs_dir and Path(self.exp.shared_runs_dir) in plan.run_dir.parents:
                # A content-addressed run (its directory name hashes its configuration and start):
                # finished by another experiment of the sweep with exactly these flags.
                resolved = read_json(plan.run_dir / "resolved_config.json") or {}
                check.adoptable = (resolved.get("flags") == plan.base_argv()
                                   and resolved.get("init_checkpoint") == plan.init_checkpoint)
            return check
        return validate

    def _prepare_resume(self, plan: RunPlan, check: Check) -> None:
        """Before (re)running a training stage: keep intact progress made with the same flags."""
        flags = plan.base_argv()
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
            kind = "moe" if plan.config.model.is_moe else "dense"
            it = roll_back_to_intact(plan.save_dir, plan.name, kind, self.echo)
            self.echo(f"[pipeline] {plan.name}: " + (f"resuming from iteration {it}" if it is not None
                                                     else "no intact checkpoint; starting from the beginning"))

    def _train(self, plans: list[RunPlan], checks: dict[str, Check]) -> None:
        """Start (or resume) training runs through the local runner; raise if any fails."""
        for plan in plans:
            self._prepare_resume(plan, checks[plan.name])
        problems = planning.check_inputs(self.exp, plans)
        if problems:
            raise PipelineError("cannot start " + ", ".join(p.name for p in plans) + ":\n  - " + "\n  - ".join(problems))
        runner = LocalRunner(self.exp, max_concurrent=self.max_concurrent, python=self.python, echo=self.echo)
        codes = runner.run(plans)
        failed = {n: c for n, c in codes.items() if c != 0}
        if failed:
            logs = ", ".join(f"{n} (exit {c}): {self.plans[n].run_dir / 'logs' / 'train.log'}" for n, c in failed.items())
            raise PipelineError(f"training run(s) failed: {logs}")
        if runner.stopped_by is not None:
            raise PipelineError(f"stopped by signal {runner.stopped_by}; the runs saved a checkpoint. Run the same "
                                "command again to resume.")

    def _train_stage(self, stage: str, group: str, plan: RunPlan, inputs: dict[str, Any]) -> dict[str, str]:
        return self.runner.ensure(stage, group, plan.base_argv(), inputs, self._train_check(plan),
                                  lambda check: self._train([plan], {plan.name: check}))

    # ------------------------------------------------------------------ stage 1: corpora
    def corpora_dir(self) -> Path | None:
        """The corpora directory the experiment reads (tokenizer DIR/tokenizer/tokenizer.model and
        every prefix under DIR/data/), or None for data prepared elsewhere."""
        tok = self.exp.tokenizer_model
        if not tok:
            return None
        root = Path(tok).parent.parent
        if Path(tok) != root / "tokenizer" / "tokenizer.model":
            return None
        if all(Path(p).parent == root / "data" for p in self._data_prefixes()):
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
        spec = {"output": str(root), **dataclasses.asdict(self.exp.corpora)} if root else None

        def validate() -> Check:
            missing = [p + s for p in prefixes for s in (".bin", ".idx") if not os.path.isfile(p + s)]
            if missing:
                return Check(False, f"missing data files: {', '.join(missing[:3])}")
            if self.exp.tokenizer_model and not os.path.isfile(self.exp.tokenizer_model):
                return Check(False, f"missing tokenizer {self.exp.tokenizer_model}")
            fp = {}
            if root is not None:
                from ..data.corpora import CorporaConfig, corpora_up_to_date

                if not corpora_up_to_date(str(root / "manifest.json"), CorporaConfig(**spec)):
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
                    "the experiment's data is not a built-in corpora directory and some prefixes are missing; "
                    "prepare them with tools/preprocess_data.py (see the experiment file's domains).")
            self._job("corpora", spec, "corpora", "corpora (btx_megatron.data.corpora)")

        config = {"root": str(root), "corpora": {k: v for k, v in (spec or {}).items() if k != "output"} or None}
        return self.runner.ensure("corpora", "corpora", config, {}, validate, build)

    # ------------------------------------------------------------------ seed and branches
    def stage_seed(self, corpora_fp: dict) -> dict[str, str]:
        if not self.exp.seed.trained_here:
            root = self.seed_checkpoint

            def validate() -> Check:
                return check_checkpoint_root(root, "seed checkpoint", kind="dense")

            def build(check: Check) -> None:
                raise PipelineError(f"seed.checkpoint {root} is not usable: {check.reason}")

            return self.runner.ensure(SEED_NAME, "seed", {"checkpoint": str(root)}, {}, validate, build)
        return self._train_stage(SEED_NAME, "seed", self.plans[SEED_NAME], {"corpora": corpora_fp})

    def stage_branches(self, seed_fp: dict) -> dict[str, dict[str, str]]:
        """Every branch is its own stage record; the ones to (re)build start in one runner call,
        so they run concurrently where the machine has room."""
        members = {f"branch:{n}": (self.plans[n].base_argv(), {"seed": seed_fp}, self._train_check(self.plans[n]))
                   for n in self.branch_names}

        def build(checks: dict[str, Check]) -> None:
            names = [stage.split(":", 1)[1] for stage in checks]
            self._train([self.plans[n] for n in names], {n: checks[f"branch:{n}"] for n in names})

        out = self.runner.ensure_group("branches", members, build, label="branches")
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
                # A content-addressed output (the upcycled model of a sweep: its directory name hashes
                # the seed and the recipe), finished by another experiment: take it as it is.
                check.adoptable = bool(self.exp.shared_runs_dir) and Path(self.exp.shared_runs_dir) in root.parents
            return check
        return validate

    def merge_spec(self) -> dict[str, Any]:
        """``MergeOptions`` of the BTX merge: experts in domain order, then the seed."""
        m, exp = self.exp.merge, self.exp
        spec: dict[str, Any] = {
            "branches": [[n, str(self.plans[n].save_dir)] for n in self.branch_names],
            "seed_expert": str(self.seed_checkpoint) if m.with_seed_expert else None,
            "weights": dict(m.weights) if m.weights else None,
            "method": m.method, "split": (m.split_experts or 2) if m.method == "split" else 1,
            "router_init": m.router_init, "router_seed": m.router_seed,
            "topk": planning.mix_topk(exp), "output": str(exp.merged_dir), "overwrite": True,
        }
        router_type = exp.mix.model.get("moe_router_type", "topk")
        if router_type != "topk":  # (only then: the default's spec, and so its stage record, stays as it was)
            spec["router_type"] = router_type
        if m.router_init == "centroid":
            # Every prefix of a source's data (several prefixes: averaged over the blend).
            data = {d.name: [e.prefix for e in d.data] for d in exp.domains}
            if m.with_seed_expert and exp.seed.data:
                data[SEED_NAME] = [e.prefix for e in exp.seed.data]
            spec.update(centroid_data=data, tokenizer_type=exp.tokenizer_type, tokenizer_model=exp.tokenizer_model)
        return spec

    def stage_merge(self, seed_fp: dict, branch_fps: dict) -> dict[str, str]:
        spec = self.merge_spec()
        return self.runner.ensure(
            "merge", "merge", spec, {"seed": seed_fp, "branches": branch_fps},
            self._merge_check(self.exp.merged_dir, "merged BTX checkpoint", planning.num_btx_experts(self.exp)),
            lambda _: self._job("merge", spec, "merge", "merge (btx_megatron.merge)"))

    # ------------------------------------------------------------------ mix phase (BTX and upcycling)
    def stage_mix(self, merged_fp: dict) -> dict[str, str]:
        return self._train_stage(MIX_NAME, "mix", self.plans[MIX_NAME], {"merged": merged_fp})

    def stage_router_variants(self, merged_fp: dict) -> dict[str, dict[str, str]]:
        """The same merged model, mixed with each extra router type (paper, Table 4)."""
        return {rt: self._train_stage(plan.name, "mix", plan, {"merged": merged_fp})
                for rt, plan in self.variant_plans().items()}

    def stage_upcycling(self, seed_fp: dict) -> dict[str, str]:
        exp = self.exp
        root = Path(self.plans[UPCYCLING_NAME].init_checkpoint)
        n = planning.upcycling_num_experts(exp)
        spec = {**planning.upcycling_spec(exp, str(self.seed_checkpoint)), "output": str(root), "overwrite": True}
        merged_fp = self.runner.ensure(
            "upcycling:merge", "upcycling", spec, {"seed": seed_fp}, self._merge_check(root, "upcycled checkpoint", n),
            lambda _: self._job("merge", spec, "upcycling_merge", "upcycling merge (btx_megatron.merge)"))
        return self._train_stage("upcycling:mix", "upcycling", self.plans[UPCYCLING_NAME], {"merged": merged_fp})

    # ------------------------------------------------------------------ dense baseline
    def stage_dense(self, seed_fp: dict) -> dict[str, str]:
        dense = self.exp.baselines.dense
        flops = None
        if not dense.budget.given and dense.match == "compute":
            # Compute-matched: the training FLOPs of the branches and the mix phase (data-matched:
            # plan_runs counts their tokens).
            flops = 0.0
            for plan in [*(self.plans[n] for n in self.branch_names), self.plans[MIX_NAME]]:
                summary = read_json(plan.save_dir / "eval_summary.json")
                if not summary or "flops" not in summary:
                    raise PipelineError(f"dense baseline: {plan.save_dir / 'eval_summary.json'} has no 'flops' "
                                        "(run the branches and the mix phase first).")
                flops += float(summary["flops"])
        plan = planning.plan_runs(self.exp, self.router_variants, dense_flops=flops)[DENSE_NAME]
        self.plans[DENSE_NAME] = plan
        # The budget follows from the branches' and the mix's FLOPs, which are part of the flags.
        return self._train_stage(DENSE_NAME, "dense", plan, {"seed": seed_fp})

    # ------------------------------------------------------------------ report
    def stage_report(self, eval_fps: dict[str, str], task_fps: dict[str, str], routing_fp: dict) -> dict[str, str]:
        files = ["results.md", "results.json", "loss_curves.png", "perplexity.png"]

        def validate() -> Check:
            missing = [f for f in files if not (self.report_dir / f).is_file()]
            if missing:
                return Check(False, f"missing {', '.join(missing)} in {self.report_dir}")
            if not isinstance(read_json(self.report_dir / "results.json"), dict):
                return Check(False, f"{self.report_dir / 'results.json'} does not parse")
            return Check(True, fingerprint={f: file_fingerprint(self.report_dir / f) for f in files})

        inputs = {"eval": eval_fps, "routing": routing_fp, **({"tasks": task_fps} if task_fps else {})}
        return self.runner.ensure("report", "report", {"files": files}, inputs, validate,
                                  lambda _: results.write_report(self))

    # ------------------------------------------------------------------ optional stages
    def stage_grow(self) -> dict[str, Any]:
        """Add a fourth domain to the finished BTX model and remove domains again (see grow.py)."""
        from . import grow

        return grow.stage_grow(self)

    # ------------------------------------------------------------------ all of it
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.echo(f"[pipeline] experiment {self.exp.name} ({self.exp.source}), output {self.out}")
        try:
            fmt.write_text_atomic(self.out / "experiment.resolved.yaml", yaml.safe_dump(self.exp.raw, sort_keys=False))
            if self.runner.selected <= set(OPTIONAL_STAGES):  # e.g. --stages grow, on a finished run
                return self.stage_grow()
            last = max(STAGES.index(st) for st in self.runner.selected if st in STAGES)

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
                                    MERGED_ROW: merged_fp, ORACLE_ROW: merged_fp, "btm": {"branches": branch_fps}}
            if wanted("mix"):
                fps.update({f"btx_{rt}": fp for rt, fp in self.stage_router_variants(merged_fp).items()})
            if self.exp.baselines.dense.enabled and wanted("dense"):
                fps[DENSE_NAME] = self.stage_dense(seed_fp)
            if self.exp.baselines.upcycling.enabled and wanted("upcycling"):
                fps[UPCYCLING_NAME] = self.stage_upcycling(seed_fp)
            if not wanted("evaluate"):
                return {}
            eval_fps = stage_evaluate(self, fps)
            task_fps = stage_tasks(self, fps) if wanted("tasks") else {}
            if not wanted("routing"):
                return {}
            routing_fp = stage_routing(self, mix_fp)
            if not wanted("report"):
                return {}
            self.stage_report(eval_fps, task_fps, routing_fp)
            if "grow" in self.runner.selected:
                self.stage_grow()
        finally:
            self.print_timings(time.perf_counter() - started)
        self.echo("\n" + (self.report_dir / "results.md").read_text())
        return read_json(self.report_dir / "results.json")

    def print_timings(self, total: float) -> None:
        self.echo("\n[pipeline] stage wall times (this invocation; 'recorded' = when the stage last ran)")
        for t in self.runner.timings:
            recorded = self.runner.state.stages.get(t.name, {}).get("seconds")
            line = f"  {t.name:<22} {t.action:<7} {t.seconds:8.1f}s"
            if t.action == "reused" and recorded is not None:
                line += f"   (recorded {recorded:.1f}s)"
            self.echo(line)
        self.echo(f"  {'total':<22} {'':<7} {total:8.1f}s")


def load_pipeline(experiment: str, *, output: str | None = None, data_dir: str | None = None,
                  overrides: dict[str, Any] | None = None, stages: list[str] | None = None,
                  echo: Callable[[str], None] = print, max_concurrent: int | None = None,
                  router_variants: list[str] | None = None) -> Pipeline:
    """Read the experiment file, apply ``--set`` overrides and the output override, plan every run."""
    if data_dir:
        os.environ["BTX_DATA_DIR"] = os.path.abspath(data_dir)
    raw = apply_overrides(read_experiment_document(experiment), overrides or {})
    if output:
        raw["output_dir"] = os.path.abspath(output)
    exp = parse_experiment(raw, str(experiment))
    pipeline = Pipeline(exp, stages=stages, echo=echo, max_concurrent=max_concurrent, router_variants=router_variants)
    blocking = next((p for p in (pipeline.out, *pipeline.out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ExperimentError(f"the run directory {pipeline.out} cannot be created: {blocking} is a file; pass "
                              "--output DIR (or set output_dir) to a directory.")
    return pipeline


__all__ = ["ExperimentError", "OPTIONAL_STAGES", "Pipeline", "PipelineError", "STAGES", "STAGE_GROUPS", "load_pipeline"]
