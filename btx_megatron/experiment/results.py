"""The experiment's results: one row per model (per-domain perplexity, training tokens and
FLOPs after the seed), the paper's claims checked on them, loss curves of every training stage,
written by :mod:`btx_megatron.eval.report` as ``results.md``/``results.json`` and PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.experiment import DENSE_NAME, SEED_NAME
from ..eval import report
from ..eval.claims import check_claims
from ..launch import plan as planning
from ..launch.plan import MIX_NAME, UPCYCLING_NAME
from .evaluation import MERGED_ROW, ORACLE_ROW, eval_models
from .state import read_json

if TYPE_CHECKING:
    from .pipeline import Pipeline


def _summary(save: Path) -> dict:
    return read_json(save / "eval_summary.json") or {}


def results_rows(p: "Pipeline") -> tuple[list[dict[str, Any]], tuple[float, float]]:
    """One row per model: per-domain perplexity, average, training tokens/FLOPs after the seed."""
    exp = p.exp
    domains = list(exp.eval_domains)
    cost: dict[str, tuple[float, float]] = {}

    def stage_cost(save: Path) -> tuple[float, float]:
        s = _summary(save)
        return float(s.get("tokens", 0)), float(s.get("flops", 0.0))

    seed_cost = stage_cost(p.seed_checkpoint) if exp.seed.trained_here else (0.0, 0.0)
    branch_cost = {n: stage_cost(p.plans[n].save_dir) for n in p.branch_names}
    mix_cost = stage_cost(p.plans[MIX_NAME].save_dir)
    branches_total = (sum(c[0] for c in branch_cost.values()), sum(c[1] for c in branch_cost.values()))
    cost[SEED_NAME] = (0.0, 0.0)
    cost.update(branch_cost)
    if exp.baselines.dense.enabled:
        cost[DENSE_NAME] = stage_cost(p.plans[DENSE_NAME].save_dir)
    if exp.baselines.upcycling.enabled:
        cost["upcycling"] = stage_cost(p.plans[UPCYCLING_NAME].save_dir)
    cost["btm"] = branches_total
    cost["btx"] = (branches_total[0] + mix_cost[0], branches_total[1] + mix_cost[1])
    cost[MERGED_ROW] = cost[ORACLE_ROW] = branches_total
    for rt, plan in p.variant_plans().items():
        c = stage_cost(plan.save_dir)
        cost[f"btx_{rt}"] = (branches_total[0] + c[0], branches_total[1] + c[1])
    dense = exp.baselines.dense
    labels = {SEED_NAME: "seed", DENSE_NAME: "dense" if dense.budget.given else f"dense ({dense.match}-matched)",
              "upcycling": "sparse upcycling",
              "btm": f"BTM top-{exp.baselines.btm.top_k}",
              "btx": f"BTX {exp.mix.model.get('moe_router_type', 'topk')}-{planning.mix_topk(exp)}",
              MERGED_ROW: "BTX merged, before the mix phase",
              ORACLE_ROW: "BTX merged, oracle routing (domain -> own expert)"}
    rows = []
    for name in eval_models(p):
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


def _kind(model: str, branches: list[str]) -> str:
    if model in branches:
        return "branch"
    if model.startswith("btx"):
        return "btx"
    return model if model in (SEED_NAME, DENSE_NAME, "upcycling", "btm") else "other"


def write_report(p: "Pipeline") -> None:
    """results.md / results.json / perplexity.png / loss_curves.png via :mod:`.report`."""
    exp = p.exp
    domains = list(exp.eval_domains)
    rows, seed_cost = results_rows(p)
    checks = check_claims(rows, domains, p.branch_names)
    result_rows = []
    for r in rows:
        data = read_json(p.eval_dir / f"{r['model']}.json") or {}
        # report's convention: a row's cost includes the stages it starts from (the seed).
        result_rows.append(report.row_from_eval(
            r["label"], _kind(r["model"], p.branch_names), data,
            train_tokens=r["tokens"] + seed_cost[0], train_flops=r["flops"] + seed_cost[1],
            notes="evaluation-only ensemble of the branches" if r["model"] == "btm" else ""))
    accuracy = {r["model"]: (read_json(p.eval_dir / "tasks" / f"{r['model']}.json") or {}).get("domains")
                for r in rows}
    accuracy = {m: a for m, a in accuracy.items() if a}
    metrics, offsets = stage_curves(p)
    notes = [f"Seed pretraining (in every row's cost): {seed_cost[0] / 1e6:.3f}M tokens, {seed_cost[1]:.3e} FLOPs; "
             "BTX = seed + branches + mix; the dense baseline is FLOP-matched to branches + mix."]
    notes += [f"shape check: {k}: {v}" for k, v in checks.items()]
    report.write_report(
        result_rows, p.report_dir, stage_metrics=metrics, stage_offsets=offsets,
        routing_dir=p.report_dir / "routing", title=f"{exp.name}: per-domain validation perplexity",
        notes=notes, echo=False, sections=[accuracy_table(rows, accuracy)] if accuracy else None,
        extra={"experiment": exp.name, "models": [r["model"] for r in rows],
               "seed": {"tokens": seed_cost[0], "flops": seed_cost[1]}, "shape_checks": checks,
               "accuracy": accuracy})


def accuracy_table(rows: list[dict], accuracy: dict[str, dict[str, float]]) -> str:
    """Markdown: per-domain accuracy on the built-in downstream tasks, one row per model."""
    domains = sorted({d for a in accuracy.values() for d in a})
    lines = ["## Downstream accuracy (built-in tasks, lm-evaluation-harness)", "",
             "| model | " + " | ".join(domains) + " | avg |", "|---|" + "---:|" * (len(domains) + 1)]
    best = {d: max(a.get(d, 0.0) for a in accuracy.values()) for d in domains}
    for r in rows:
        a = accuracy.get(r["model"])
        if not a:
            continue
        cells = [f"**{a[d]:.3f}**" if d in a and a[d] == best[d] else (f"{a[d]:.3f}" if d in a else "-") for d in domains]
        avg = sum(a.get(d, 0.0) for d in domains) / len(domains)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {avg:.3f} |")
    lines += ["", "Tasks: math worksheet answers (exact match after greedy generation), code next line and "
              "prose cloze (4-way multiple choice by log-likelihood), from held-out corpora documents; "
              "the ensemble row (BTM) and forced routing are not run on them."]
    return "\n".join(lines)


def stage_curves(p: "Pipeline") -> tuple[dict[str, Path], dict[str, float]]:
    """Each training stage's metrics.jsonl and its x offset (tokens since the seed's start)."""
    exp = p.exp
    metrics: dict[str, Path] = {}
    offsets: dict[str, float] = {}

    def add(label: str, save: Path, offset: float) -> None:
        if (save / "metrics.jsonl").is_file():
            metrics[label], offsets[label] = save / "metrics.jsonl", offset

    seed_tokens = float(_summary(p.seed_checkpoint).get("tokens", 0)) if exp.seed.trained_here else 0.0
    if exp.seed.trained_here:
        add("seed", p.seed_checkpoint, 0.0)
    for n in p.branch_names:
        add(f"branch {n}", p.plans[n].save_dir, seed_tokens)
    branch_tokens = sum(float(_summary(p.plans[n].save_dir).get("tokens", 0)) for n in p.branch_names)
    add("BTX mix", p.plans[MIX_NAME].save_dir, seed_tokens + branch_tokens)
    for rt, plan in p.variant_plans().items():
        add(f"BTX mix ({rt})", plan.save_dir, seed_tokens + branch_tokens)
    if exp.baselines.dense.enabled:
        add("dense", p.plans[DENSE_NAME].save_dir, seed_tokens)
    if exp.baselines.upcycling.enabled:
        add("upcycling mix", p.plans[UPCYCLING_NAME].save_dir, seed_tokens)
    return metrics, offsets
