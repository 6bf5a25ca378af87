"""Sweeps over an experiment file: many configurations, repeated over random seeds, one table.

    python tools/run_sweep.py examples/tiny/sweep.yaml

A sweep file names the experiment, the configurations (named ``--set`` override sets and/or a
grid over override keys) and the seeds::

    experiment: examples/tiny/experiment.yaml
    output: runs/sweep                 # OUT/<config>-s<seed>/ per run, OUT/runs/ shared runs
    shared_runs: runs/study/runs       # optional: share another sweep's seed/branch/baseline runs
    seeds: [1234, 2025]                # each sets seed_keys (default: every training seed, router seed)
    base: {evaluation.eval_iters: 8}   # applied to every configuration
    configurations:                    # one table row each ...
      paper: {}
      centroid: {merge.router_init: centroid}
    grid:                              # ... times every combination of these values
      mix.train_iters: [150, 300]

Every configuration of every seed is an ordinary pipeline run in its own directory; the seed,
branch, dense-baseline and upcycling runs (and the upcycled model) live in the content-addressed
``OUT/runs`` (the experiment's ``shared_runs_dir``), so configurations that agree on them (the
same seed recipe, the same branches with another merge or mix, the same mix with another merge)
train them once. Interrupted sweeps continue where they
stopped. The result is ``OUT/sweep.md`` / ``sweep.json`` (mean and standard deviation over seeds
of every model's average perplexity and of BTX - dense, BTX - upcycling, BTX - BTM) and, per
swept factor (a grid key, or a key that named configurations change on their own, such as
``mix.train_iters`` in ``mix-300: {mix.train_iters: 300}``), a PNG of BTX - dense against it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as fmt
from ..config.experiment import ExperimentError
from ..config.experiment_file import read_experiment_document, value_at
from .pipeline import PipelineError, load_pipeline

DEFAULT_SEED_KEYS = ("branch_defaults.train.seed", "merge.router_seed")
COMPARED = {"dense": "BTX - dense", "upcycling": "BTX - upcycling", "btm": "BTX - BTM"}
SWEEP_KEYS = ("experiment", "output", "shared_runs", "seeds", "seed_keys", "base", "configurations", "grid")


@dataclass
class Sweep:
    experiment: str
    output: Path
    seeds: list[int]
    seed_keys: list[str]
    configurations: dict[str, dict[str, Any]]       # name -> overrides (base included)
    factors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {grid key: value}
    shared_runs: Path | None = None  # the seed/branch/baseline runs (default OUT/runs)
    named: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> its own overrides (no base, no grid)

    def runs(self) -> list[tuple[str, int, dict[str, Any]]]:
        """(configuration, seed, overrides) of every pipeline run, configurations outermost."""
        out = []
        for name, overrides in self.configurations.items():
            for seed in self.seeds:
                run = {**overrides, **{k: seed for k in self.seed_keys}}
                run.update(output_dir=str(self.output / f"{name}-s{seed}"),
                           shared_runs_dir=str(self.shared_runs or self.output / "runs"))
                out.append((name, seed, run))
        return out


def _label_hash(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_sweep(path: str | Path, output: str | None = None, only: list[str] | None = None,
               seeds: list[int] | None = None, shared_runs: str | None = None) -> Sweep:
    """Read and check a sweep file (see the module docstring). ``only``: run just these
    configurations; ``seeds``: just these of the file's seeds (the runs and the shared ones are
    the same as in the whole sweep, so a later run of the whole sweep reuses them)."""
    raw = read_experiment_document(path)
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ExperimentError(f"{path}: unknown sweep key(s) {', '.join(unknown)}; allowed: {', '.join(SWEEP_KEYS)}.")
    if "experiment" not in raw:
        raise ExperimentError(f"{path}: name the experiment file (experiment: examples/tiny/experiment.yaml).")
    file_seeds = raw.get("seeds") or [1234]
    if not isinstance(file_seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in file_seeds):
        raise ExperimentError(f"{path}: seeds must be a list of integers, got {file_seeds!r}.")
    if seeds is not None:
        if not seeds or not set(seeds) <= set(file_seeds):
            raise ExperimentError(f"{path}: the sweep's seeds are {file_seeds}; choose among them, not {seeds}.")
        file_seeds = [s for s in file_seeds if s in seeds]
    base = dict(raw.get("base") or {})
    named = raw.get("configurations") or ({} if raw.get("grid") else {"base": {}})
    grid = raw.get("grid") or {}
    if not isinstance(named, dict) or not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ExperimentError(f"{path}: configurations is a mapping NAME: {{KEY: VALUE}}; grid a mapping KEY: [VALUES].")
    configurations: dict[str, dict[str, Any]] = {}
    factors: dict[str, dict[str, Any]] = {}
    own: dict[str, dict[str, Any]] = {}
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    for name, overrides in (named or {"": {}}).items():
        if not isinstance(overrides, dict):
            raise ExperimentError(f"{path}: configurations.{name} must map override keys to values.")
        for combo in combos:
            label = ",".join(f"{k.rsplit('.', 1)[-1]}={_label(v)}" for k, v in combo.items())
            full = "+".join(x for x in (str(name), label) if x) or "base"
            configurations[full] = {**base, **overrides, **combo}
            factors[full] = dict(combo)
            own[full] = dict(overrides)
    if only:
        missing = [name for name in only if name not in configurations]
        if missing:
            raise ExperimentError(f"{path}: no configuration named {', '.join(map(repr, missing))}; "
                                  f"the sweep has {', '.join(configurations)}.")
        configurations = {name: configurations[name] for name in configurations if name in only}
        factors = {name: factors[name] for name in configurations}
        own = {name: own[name] for name in configurations}
    out = Path(output or raw.get("output") or Path("runs") / Path(path).stem)
    shared = shared_runs or raw.get("shared_runs")
    return Sweep(str(raw["experiment"]), out.resolve(), file_seeds, list(raw.get("seed_keys") or DEFAULT_SEED_KEYS),
                 configurations, factors, Path(shared).resolve() if shared else None, own)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def run_sweep(sweep: Sweep, *, data_dir: str | None = None, echo: Callable[[str], None] = print,
              max_concurrent: int | None = None, table_only: bool = False) -> dict[str, Any]:
    """Run every configuration x seed (finished ones are reused), then write the table.
    ``table_only``: train nothing; the table covers the runs that have finished (each row says
    over how many seeds), and the others are listed as not run."""
    sweep.output.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, Any]] = {name: {} for name in sweep.configurations}
    errors: dict[str, str] = {}
    not_run: list[str] = []
    runs = sweep.runs()
    for i, (name, seed, overrides) in enumerate(runs, 1):
        if table_only:
            finished = Path(overrides["output_dir"]) / "report" / "results.json"
            if finished.is_file():
                results[name][seed] = json.loads(finished.read_text())
            else:
                not_run.append(f"{name}-s{seed}")
            continue
        echo(f"\n[sweep] {i}/{len(runs)}: {name}, seed {seed}")
        corpora = {k: v for k, v in overrides.items() if k.startswith("corpora.")}
        # Configurations with other corpora options get their own corpora directory (the others'
        # must not be rebuilt under them).
        run_data = str(sweep.output / ("data-" + _label_hash(corpora))) if corpora else data_dir
        try:
            pipeline = load_pipeline(sweep.experiment, data_dir=run_data, overrides=overrides, echo=echo,
                                     max_concurrent=max_concurrent)
            results[name][seed] = pipeline.run()
        except (ValueError, PipelineError) as exc:
            errors[f"{name}-s{seed}"] = str(exc)[-2000:]
            echo(f"[sweep] {name}, seed {seed} failed: {str(exc).splitlines()[0]}")
    summary = summarize(sweep, {k: v for k, v in results.items() if v or not table_only}, errors)
    summary["not_run"] = not_run
    write_sweep_report(sweep, summary)
    echo("\n" + (sweep.output / "sweep.md").read_text())
    return summary


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _per_model(result: dict[str, Any]) -> dict[str, float]:
    """model key -> average perplexity, from a pipeline's results.json."""
    return {m: r["average_ppl"] for m, r in zip(result.get("models", []), result.get("rows", []))}


BRANCH_EDGE = "branch vs dense, own domain"


def branch_edge(result: dict[str, Any]) -> float | None:
    """How much better each branch is than the compute-matched dense model on the branch's own
    domain, in percent of dense's perplexity there (mean over the domains; < 0: the branches are
    better). BTX's experts are these branches' FFNs, so this bounds what specialising bought."""
    rows = dict(zip(result.get("models", []), result.get("rows", [])))
    dense = rows.get("dense", {}).get("domains", {})
    edges = [100.0 * (rows[d]["domains"][d]["ppl"] / dense[d]["ppl"] - 1.0)
             for d in result.get("domains", []) if d in dense and d in rows.get(d, {}).get("domains", {})]
    return statistics.fmean(edges) if edges else None


def own_expert_share(routing: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per domain with an expert of its own name: the fraction of its expert slots that go to
    that expert, per layer and on average (``routing.json`` of the routing analysis)."""
    out: dict[str, dict[str, float]] = {}
    if not routing:
        return out
    names = routing.get("expert_names", [])
    for domain, summary in routing.get("domains", {}).items():
        # Split experts are named DOMAIN.c: every chunk of the domain's FFN counts as its own.
        own = [i for i, n in enumerate(names) if n == domain or n.startswith(f"{domain}.")]
        if not own:
            continue
        layers = {layer: sum(fig["token_fraction"][i] for i in own) for layer, fig in summary["layers"].items()}
        out[domain] = {**layers, "mean": statistics.fmean(layers.values())}
    return out


def summarize(sweep: Sweep, results: dict[str, dict[int, Any]], errors: dict[str, str]) -> dict[str, Any]:
    rows = {}
    for name, by_seed in results.items():
        per_seed = {seed: _per_model(r) for seed, r in by_seed.items() if r}
        models = sorted({m for ppl in per_seed.values() for m in ppl})
        row = {"models": {m: _mean_std([ppl.get(m) for ppl in per_seed.values()]) for m in models},
               "factors": sweep.factors.get(name, {}), "seeds": sorted(per_seed)}
        for other, label in COMPARED.items():
            diffs = [ppl["btx"] - ppl[other] for ppl in per_seed.values() if "btx" in ppl and other in ppl]
            row[label] = _mean_std(diffs)
        row[BRANCH_EDGE] = _mean_std([branch_edge(r) for r in by_seed.values() if r])
        shares = []
        for seed in by_seed:
            path = sweep.output / f"{name}-s{seed}" / "report" / "routing" / "routing.json"
            shares.append(own_expert_share(json.loads(path.read_text()) if path.is_file() else None))
        domains = sorted({d for share in shares for d in share})
        row["own_expert_share"] = {d: _mean_std([share[d]["mean"] for share in shares if d in share]) for d in domains}
        row["own_expert_share_per_layer"] = shares
        claims = [r.get("shape_checks", {}) for r in by_seed.values() if r]
        row["claims_held"] = {k: sum(1 for c in claims if c.get(k) is True) for k in (claims[0] if claims else {})
                              if isinstance(claims[0][k], bool)}
        rows[name] = row
    return {"experiment": sweep.experiment, "seeds": sweep.seeds, "rows": rows, "errors": errors}


def _cell(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if stat["n"] > 1 else f"{stat['mean']:.2f}"


def _percent(stat: dict[str, Any]) -> str:
    if stat.get("mean") is None:
        return "-"
    return _cell({**stat, "mean": 100 * stat["mean"], "std": 100 * stat["std"]}) + "%"


def format_table(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    models = [m for m in ("seed", "dense", "upcycling", "btm", "btx_merged", "btx_oracle", "btx")
              if any(m in r["models"] for r in rows.values())]
    edge = any(r.get(BRANCH_EDGE, {}).get("mean") is not None for r in rows.values())
    header = ["configuration", *(f"{m} avg ppl" for m in models), *COMPARED.values(),
              *([f"{BRANCH_EDGE} (%)"] if edge else []), "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name, *(_cell(r["models"].get(m, {})) for m in models), *(_cell(r[c]) for c in COMPARED.values()),
                 *([_cell(r.get(BRANCH_EDGE, {}))] if edge else []), str(len(r["seeds"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_layer_share_table(summary: dict[str, Any]) -> list[str]:
    """Markdown rows: configuration x domain, the own-expert share in each layer (mean over seeds)."""
    rows = []
    layers: list[str] = []
    for name, row in summary["rows"].items():
        for domain in sorted(row["own_expert_share"]):
            per_seed = [s[domain] for s in row["own_expert_share_per_layer"] if domain in s]
            names = sorted({k for s in per_seed for k in s if k != "mean"}, key=lambda k: (len(k), k))
            layers = layers if len(layers) >= len(names) else names
            rows.append((name, domain, {k: statistics.fmean(s[k] for s in per_seed if k in s) for k in names}))
    lines = ["| configuration | domain | " + " | ".join(f"layer {k}" for k in layers) + " |",
             "|" + "---|" * (len(layers) + 2)]
    for name, domain, shares in rows:
        lines.append(f"| {name} | {domain} | " + " | ".join(f"{100 * shares[k]:.0f}%" if k in shares else "-"
                                                            for k in layers) + " |")
    return lines


def write_sweep_report(sweep: Sweep, summary: dict[str, Any]) -> None:
    md = [f"# Sweep of {sweep.experiment}", "",
          f"Mean ± standard deviation over the seeds ({', '.join(map(str, sweep.seeds))}; the last column says how "
          "many a row has) of each model's average validation perplexity over the domains; BTX - X < 0 means BTX "
          "is better.", "",
          format_table(summary), ""]
    if any(row["own_expert_share"] for row in summary["rows"].values()):
        md += ["", "Share of each domain's expert slots routed to the expert of the same name (mean over layers "
               "and seeds; top-k routing spreads k slots per token, so top-2 can reach at most 50%):", ""]
        domains = sorted({d for row in summary["rows"].values() for d in row["own_expert_share"]})
        md += ["| configuration | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
        for name, row in summary["rows"].items():
            cells = [_percent(row["own_expert_share"].get(d, {})) for d in domains]
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        md += ["", "The same share per MoE layer (mean over seeds):", "", *per_layer_share_table(summary), ""]
    for name, row in summary["rows"].items():
        if row["claims_held"]:
            held = ", ".join(f"{k}: {v}/{len(row['seeds'])}" for k, v in row["claims_held"].items())
            md.append(f"- **{name}**: {held}")
    for run, error in summary["errors"].items():
        md.append(f"- **{run} failed**: {error.splitlines()[0]}")
    if summary.get("not_run"):
        md.append(f"- not run yet: {', '.join(summary['not_run'])}")
    for png in plot_factors(sweep, summary):
        md.append(f"\n![{png.stem}]({png.name})")
    fmt.write_text_atomic(sweep.output / "sweep.md", "\n".join(md) + "\n")
    fmt.write_json_atomic(sweep.output / "sweep.json", summary)


def _one_factor(overrides: dict[str, Any]) -> tuple[str, Any, list[str]] | None:
    """(factor, value, override paths) when a configuration changes one factor: one key, or the
    same key of every domain to one value (``domains.*.train_iters``); scalars only."""
    if not overrides or not all(isinstance(v, (int, float, str, bool)) for v in overrides.values()):
        return None
    if len(overrides) == 1:
        (key, value), = overrides.items()
        return key, value, [key]
    parts = [k.split(".") for k in overrides]
    if len(set(map(str, overrides.values()))) == 1 and all(len(p) == 3 and p[0] == "domains" for p in parts) \
            and len({p[2] for p in parts}) == 1:
        return f"domains.*.{parts[0][2]}", next(iter(overrides.values())), list(overrides)
    return None


def one_factor_series(sweep: Sweep, names: list[str]) -> dict[str, list[tuple[Any, str]]]:
    """For each factor that named configurations change on their own (see :func:`_one_factor`):
    ``[(value, configuration), ...]`` sorted by value, with the configuration that changes nothing
    at the experiment file's value. Factors with fewer than two values are left out."""
    try:
        raw = read_experiment_document(sweep.experiment)
    except ExperimentError:
        raw = None
    unchanged = [n for n in names if not sweep.named.get(n) and not sweep.factors.get(n)]
    series: dict[str, list[tuple[Any, str]]] = {}
    paths: dict[str, list[str]] = {}
    for name in names:
        factor = None if sweep.factors.get(name) else _one_factor(sweep.named.get(name, {}))
        if factor is not None:
            series.setdefault(factor[0], []).append((factor[1], name))
            paths[factor[0]] = factor[2]
    out = {}
    for key, points in series.items():
        base = {json.dumps(value_at(raw, p)) for p in paths[key]} if raw is not None and unchanged else set()
        if len(base) == 1 and (value := json.loads(base.pop())) is not None:
            points = [(value, unchanged[0]), *points]
        if len({json.dumps(v) for v, _ in points}) >= 2:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in points)
            out[key] = sorted(points, key=lambda p: p[0]) if numeric else points
    return out


def plot_factors(sweep: Sweep, summary: dict[str, Any]) -> list[Path]:
    """BTX - dense (mean ± std over seeds) against each swept grid factor, one PNG each; for
    named configurations without a grid, one bar per configuration and, for each factor that
    configurations change on their own, BTX - dense against its value (the configuration that
    changes nothing at the experiment file's value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    keys = sorted({k for r in rows.values() for k in r["factors"]})
    pngs = []
    groups = {k: [(r["factors"][k], r["BTX - dense"]) for r in rows.values() if k in r["factors"]] for k in keys}
    if not keys:
        groups = {"configuration": [(name, r["BTX - dense"]) for name, r in rows.items()]}
        for key, points in one_factor_series(sweep, list(rows)).items():
            groups[key] = [(f"{_label(value)}\n{name}", rows[name]["BTX - dense"]) for value, name in points]
    for key, points in groups.items():
        points = [(x, s) for x, s in points if s.get("mean") is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(points)), 3.2))
        labels = [_label(x) for x, _ in points]
        ax.errorbar(range(len(points)), [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points],
                    fmt="o", capsize=4)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(points)), labels, rotation=30 if key == "configuration" else 0,
                      ha="right" if key == "configuration" else "center")
        ax.set_xlabel(key)
        ax.set_ylabel("BTX - dense (avg ppl)")
        ax.set_title("below 0: BTX beats the dense baseline")
        fig.tight_layout()
        png = sweep.output / f"btx_minus_dense_{key.replace('.', '_').replace('*', 'all')}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        pngs.append(png)
    return pngs
