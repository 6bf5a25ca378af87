"""The evaluation stages of the experiment pipeline (:mod:`.pipeline`): every model's per-domain
loss and perplexity (``evaluate``), its accuracy on the built-in downstream tasks (``tasks``) and
the BTX model's routing per domain (``routing``), each run through :mod:`.worker` jobs.

Experiments that share runs (``shared_runs_dir``: a sweep's configurations) also share the
evaluations of those runs: each result is kept under ``SHARED/results-cache/`` by a hash of what
was evaluated (the evaluation's options, the model's paths and its checkpoint fingerprint), and
an experiment that would evaluate the same thing again takes the kept result instead."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import checkpoint as fmt
from ..config.experiment import DENSE_NAME, SEED_NAME
from ..launch.plan import MIX_NAME, UPCYCLING_NAME
from .state import Check, config_hash, eval_check, file_fingerprint, read_json

if TYPE_CHECKING:
    from .pipeline import Pipeline

MERGED_ROW = "btx_merged"  # the merged checkpoint before any mix-phase step (iteration 0)
ORACLE_ROW = "btx_oracle"  # the merged checkpoint, each domain's tokens forced to its own expert


def eval_models(p: "Pipeline") -> dict[str, dict[str, Any]]:
    """Every model of the results table: name -> {"path"} or {"btm": {branch: path}}."""
    exp = p.exp
    models: dict[str, dict[str, Any]] = {SEED_NAME: {"path": str(p.seed_checkpoint)}}
    for name in p.branch_names:
        models[name] = {"path": str(p.plans[name].save_dir)}
    if exp.baselines.dense.enabled:
        models[DENSE_NAME] = {"path": str(p.plans[DENSE_NAME].save_dir)}
    if exp.baselines.upcycling.enabled:
        models[UPCYCLING_NAME] = {"path": str(p.plans[UPCYCLING_NAME].save_dir)}
    if exp.baselines.btm.enabled:
        models["btm"] = {"btm": {n: str(p.plans[n].save_dir) for n in p.branch_names},
                         "train_data": {n: [e.prefix for e in exp.domain(n).data] for n in p.branch_names},
                         "top_k": exp.baselines.btm.top_k}
    # The merged model before any mix-phase step: how much of the branches the merge keeps.
    models[MERGED_ROW] = {"path": str(exp.merged_dir)}
    own = {d: d for d in exp.eval_domains if d in p.branch_names}
    if own and exp.merge.method == "btx":
        models[ORACLE_ROW] = {"path": str(exp.merged_dir), "force_expert": own}
    models["btx"] = {"path": str(p.plans[MIX_NAME].save_dir)}
    for rt, plan in p.variant_plans().items():
        models[f"btx_{rt}"] = {"path": str(plan.save_dir)}
    return models


RESULTS_CACHE = "results-cache"


def _result_key(kind: str, spec: dict[str, Any], model_fp: Any) -> str:
    return f"{kind}-" + config_hash([spec, model_fp])


def shared_results(p: "Pipeline", members: dict[str, tuple], outputs: dict[str, Path],
                   keys: dict[str, str]) -> dict[str, tuple]:
    """``members`` (stage -> (config, inputs, validate)) with every missing output that another
    experiment on the same shared runs already produced copied in from the cache (and adopted)."""
    if not p.exp.shared_runs_dir:
        return members
    cache = Path(p.exp.shared_runs_dir) / RESULTS_CACHE
    out = {}
    for stage, (config, inputs, validate) in members.items():
        kept = cache / f"{keys[stage]}.json"
        if not outputs[stage].exists() and kept.is_file():
            outputs[stage].parent.mkdir(parents=True, exist_ok=True)
            fmt.write_text_atomic(outputs[stage], kept.read_text())
            validate = (lambda v: lambda: dataclasses.replace(v(), adoptable=True))(validate)
        out[stage] = (config, inputs, validate)
    return out


def keep_results(p: "Pipeline", members: dict[str, tuple], outputs: dict[str, Path], keys: dict[str, str]) -> None:
    """Keep every valid result in the shared cache (see :func:`shared_results`)."""
    if not p.exp.shared_runs_dir:
        return
    cache = Path(p.exp.shared_runs_dir) / RESULTS_CACHE
    for stage, (_, _, validate) in members.items():
        kept = cache / f"{keys[stage]}.json"
        if not kept.exists() and validate().ok:
            cache.mkdir(parents=True, exist_ok=True)
            fmt.write_text_atomic(kept, outputs[stage].read_text())


def eval_num_samples(p: "Pipeline") -> int:
    gbs = p.plans[p.branch_names[0]].config.train.global_batch_size
    return p.exp.evaluation.eval_iters * gbs


def stage_evaluate(p: "Pipeline", fps: dict[str, dict]) -> dict[str, str]:
    models = eval_models(p)
    common = {"domains": {k: [v] for k, v in p.exp.eval_domains.items()},
              "tokenizer_type": p.exp.tokenizer_type, "tokenizer_model": p.exp.tokenizer_model,
              "num_samples": eval_num_samples(p)}
    members = {f"evaluate:{name}": ({**common, **model}, {"model": fps[name]},
                                    eval_check(p.eval_dir / f"{name}.json", list(p.exp.eval_domains)))
               for name, model in models.items()}
    outputs = {f"evaluate:{name}": p.eval_dir / f"{name}.json" for name in models}
    keys = {f"evaluate:{name}": _result_key("evaluate", {**common, **model}, fps[name]) for name, model in models.items()}
    members = shared_results(p, members, outputs, keys)

    def build(checks: dict[str, Check]) -> None:
        names = [stage.split(":", 1)[1] for stage in checks]
        p.eval_dir.mkdir(parents=True, exist_ok=True)
        for n in names:
            (p.eval_dir / f"{n}.json").unlink(missing_ok=True)
        spec = {**common, "models": {n: models[n] for n in names},
                "outputs": {n: str(p.eval_dir / f"{n}.json") for n in names}}
        p._job("evaluate", spec, "evaluate", "evaluation")

    out = p.runner.ensure_group("evaluate", members, build, label="evaluate")
    keep_results(p, members, outputs, keys)
    return {stage.split(":", 1)[1]: fp["result"] for stage, fp in out.items()}


def task_models(p: "Pipeline") -> dict[str, str]:
    """The models of the downstream-task table (an ensemble and forced routing are not run
    through the harness)."""
    return {name: m["path"] for name, m in eval_models(p).items() if "path" in m and "force_expert" not in m}


def stage_tasks(p: "Pipeline", fps: dict[str, dict]) -> dict[str, str]:
    root = p.corpora_dir()
    if not p.exp.evaluation.tasks or root is None:
        return {}
    models = task_models(p)
    task_dir = p.out / "eval" / "tasks"
    common = {"corpora": str(root), "task_dir": str(task_dir / "data"), "num_items": p.exp.evaluation.task_items,
              "max_tokens": p.plans[p.branch_names[0]].config.model.seq_length,
              "tokenizer_type": p.exp.tokenizer_type, "tokenizer_model": p.exp.tokenizer_model}

    def validate(path: Path) -> Callable[[], Check]:
        def check() -> Check:
            data = read_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("domains"), dict) or not data["domains"]:
                return Check(False, f"{path} is missing or has no per-domain accuracies")
            return Check(True, fingerprint={"result": file_fingerprint(path)})
        return check

    members = {f"tasks:{n}": ({**common, "model": path}, {"model": fps[n]}, validate(task_dir / f"{n}.json"))
               for n, path in models.items()}
    outputs = {f"tasks:{n}": task_dir / f"{n}.json" for n in models}
    # The task data is made from the corpora alone; where this experiment keeps it is not part of the key.
    keys = {f"tasks:{n}": _result_key("tasks", {**common, "task_dir": None, "model": path}, fps[n])
            for n, path in models.items()}
    members = shared_results(p, members, outputs, keys)

    def build(checks: dict[str, Check]) -> None:
        names = [stage.split(":", 1)[1] for stage in checks]
        spec = {**common, "models": {n: models[n] for n in names},
                "outputs": {n: str(task_dir / f"{n}.json") for n in names}}
        p._job("tasks", spec, "tasks", "downstream tasks")

    out = p.runner.ensure_group("tasks", members, build, label="tasks")
    keep_results(p, members, outputs, keys)
    return {stage.split(":", 1)[1]: fp["result"] for stage, fp in out.items()}


def stage_routing(p: "Pipeline", mix_fp: dict) -> dict[str, str]:
    out = p.report_dir / "routing"
    domains = list(p.exp.eval_domains)
    spec = {"load": str(p.plans[MIX_NAME].save_dir), "domains": {n: [prefix] for n, prefix in p.exp.eval_domains.items()},
            "output": str(out), "overwrite": True, "num_batches": max(2, p.exp.evaluation.eval_iters),
            "micro_batch_size": 4, "tokenizer_type": p.exp.tokenizer_type,
            "tokenizer_model": p.exp.tokenizer_model}

    def validate() -> Check:
        report = read_json(out / "routing.json")
        if not isinstance(report, dict) or set(report.get("domains", {})) != set(domains):
            return Check(False, f"{out / 'routing.json'} is missing or does not cover {', '.join(domains)}")
        missing = [d for d in domains if not (out / f"routing_{d}.png").is_file()]
        if missing:
            return Check(False, f"routing heatmaps missing for {', '.join(missing)}")
        return Check(True, fingerprint={"routing": file_fingerprint(out / "routing.json")})

    return p.runner.ensure("routing", "routing", spec, {"mix": mix_fp}, validate,
                           lambda _: p._job("routing", spec, "routing", "routing analysis"))


__all__ = ["MERGED_ROW", "ORACLE_ROW", "eval_models", "eval_num_samples", "stage_evaluate", "stage_routing",
           "stage_tasks", "task_models"]
