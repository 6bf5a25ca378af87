"""The results table of a BTX experiment and its figures.

Rows: the seed, each branch, the dense baseline, sparse upcycling, BTM and BTX (one row per
router type run). Columns: each domain's perplexity, their average (unweighted mean over
domains), training tokens and training FLOPs. Written as ``results.md`` (the best figure of
each perplexity column in bold) and ``results.json``, and printed. Figures:
``perplexity.png`` (each row's perplexity change relative to the seed, per domain, as a coloured
table), ``loss_curves.png`` (training loss against tokens, one line per stage, read from each stage's
``metrics.jsonl``) and, when a routing-analysis directory is given, its ``routing_<domain>.png``
heatmaps (written by ``tools/analyze_routing.py``) are linked from the markdown.

Cost columns: what the row's model cost to train *including* the stages it starts from
(the caller sums them, see :func:`training_cost`): a branch row counts seed + branch, BTX
counts seed + all branches + mix, BTM counts seed + all branches. This is the "matched
compute" of the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

from .. import checkpoint as fmt

KINDS = ("seed", "branch", "dense", "upcycling", "btm", "btx", "other")


@dataclasses.dataclass
class ResultRow:
    name: str                                  # label in the table, e.g. "branch math", "BTX (top-2)"
    kind: str                                  # one of KINDS
    domains: dict[str, dict[str, float]]       # evaluate_checkpoint(...)["domains"]
    train_tokens: float | None = None
    train_flops: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"result row {self.name!r}: kind {self.kind!r} is not one of {KINDS}.")

    def ppl(self, domain: str) -> float | None:
        entry = self.domains.get(domain)
        return None if entry is None else float(entry["ppl"])

    def average_ppl(self, domains: list[str]) -> float | None:
        values = [self.ppl(d) for d in domains]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)

    def average_loss(self, domains: list[str]) -> float | None:
        values = [self.domains.get(d, {}).get("loss") for d in domains]
        if not values or any(v is None for v in values):
            return None
        return sum(values) / len(values)


def row_from_eval(name: str, kind: str, result: dict[str, Any], *, train_tokens: float | None = None,
                  train_flops: float | None = None, notes: str = "") -> ResultRow:
    """A row from :func:`.perplexity.evaluate_checkpoint` / :func:`btm.evaluate_btm` output."""
    return ResultRow(name, kind, dict(result["domains"]), train_tokens, train_flops, notes)


def training_cost(run_dirs: Iterable[str | os.PathLike]) -> tuple[float, float]:
    """(tokens, FLOPs) summed over the ``eval_summary.json`` files the trainer wrote in each save dir."""
    tokens = flops = 0.0
    for d in run_dirs:
        path = Path(d) / "eval_summary.json"
        if not path.is_file():
            raise ValueError(f"{d} has no eval_summary.json (is it a finished training run's --save directory?).")
        summary = json.loads(path.read_text())
        tokens += float(summary.get("tokens", 0))
        flops += float(summary.get("flops", 0))
    return tokens, flops


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def domain_names(rows: list[ResultRow]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for d in row.domains:
            if d not in names:
                names.append(d)
    return sorted(names)


def _human(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def table(rows: list[ResultRow], domains: list[str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """Header and raw values (None where missing) of the results table."""
    domains = domains or domain_names(rows)
    header = ["model", *[f"{d} ppl" for d in domains], "avg ppl", "train tokens", "train FLOPs"]
    body = [[r.name, *[r.ppl(d) for d in domains], r.average_ppl(domains), r.train_tokens, r.train_flops] for r in rows]
    return header, body


def format_markdown(rows: list[ResultRow], domains: list[str] | None = None) -> str:
    domains = domains or domain_names(rows)
    header, body = table(rows, domains)
    ppl_cols = range(1, len(domains) + 2)
    best = {c: min((b[c] for b in body if b[c] is not None), default=None) for c in ppl_cols}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for b in body:
        cells = [b[0]]
        for c in ppl_cols:
            text = "-" if b[c] is None else f"{b[c]:.2f}"
            cells.append(f"**{text}**" if b[c] is not None and b[c] == best[c] else text)
        cells += [_human(b[-2]), _human(b[-1])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_text(rows: list[ResultRow], domains: list[str] | None = None) -> str:
    """Fixed-width table for the terminal."""
    domains = domains or domain_names(rows)
    header, body = table(rows, domains)
    cells = [header] + [[b[0], *["-" if v is None else f"{v:.2f}" for v in b[1:-2]], _human(b[-2]), _human(b[-1])]
                        for b in body]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    out = []
    for i, r in enumerate(cells):
        out.append("  ".join(str(v).ljust(w) if j == 0 else str(v).rjust(w) for j, (v, w) in enumerate(zip(r, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def read_train_curve(metrics_path: str | os.PathLike) -> tuple[list[float], list[float]]:
    """(tokens, loss) of the ``type == "train"`` records of a metrics.jsonl (last record wins per
    iteration, so a resumed run's repeated iterations are drawn once)."""
    by_iter: dict[int, tuple[float, float]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; the rest of the file is still valid
        if rec.get("type") != "train" or "loss" not in rec or "tokens" not in rec:
            continue
        by_iter[int(rec.get("iteration", len(by_iter)))] = (float(rec["tokens"]), float(rec["loss"]))
    points = [by_iter[k] for k in sorted(by_iter)]
    return [p[0] for p in points], [p[1] for p in points]


def _save_png(fig, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp-{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, out_png)
    return out_png


def plot_loss_curves(stage_metrics: dict[str, str | os.PathLike], out_png: str | os.PathLike,
                     offsets: dict[str, float] | None = None, title: str = "Training loss") -> Path:
    """Training loss vs tokens, one line per stage (``{stage: metrics.jsonl}``).

    ``offsets`` shifts a stage's x axis by the tokens it starts from (e.g. a branch by the
    seed's tokens), so the curves continue one another; default 0 for every stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for stage, path in stage_metrics.items():
        if not Path(path).is_file():
            raise ValueError(f"loss curves: stage {stage!r} has no metrics file {path}.")
        tokens, loss = read_train_curve(path)
        if not tokens:
            continue
        shift = (offsets or {}).get(stage, 0.0)
        ax.plot([t + shift for t in tokens], loss, label=stage, marker="." if len(tokens) < 30 else None)
        drawn += 1
    if drawn == 0:
        plt.close(fig)
        raise ValueError(f"loss curves: no training records in {sorted(stage_metrics)}.")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return _save_png(fig, Path(out_png))
    finally:
        plt.close(fig)


CHANGE_CLIP_PERCENT = 20.0   # colour scale of perplexity.png: changes beyond +-20% saturate


def reference_row(rows: list[ResultRow], reference: str | None = None) -> ResultRow:
    """The row the figure's changes are relative to: the one named ``reference``, else the seed
    row, else the first row."""
    if reference is not None:
        for row in rows:
            if row.name == reference:
                return row
        raise ValueError(f"reference row {reference!r} is not among the rows {[r.name for r in rows]}.")
    return next((row for row in rows if row.kind == "seed"), rows[0])


def perplexity_changes(rows: list[ResultRow], domains: list[str], reference: ResultRow) -> list[list[float | None]]:
    """Per row, the percent change of each domain's perplexity (then of the average) relative to
    ``reference``: ``100 * (ppl / reference_ppl - 1)``; None where either value is missing."""
    ref = [reference.ppl(d) for d in domains] + [reference.average_ppl(domains)]
    out = []
    for row in rows:
        values = [row.ppl(d) for d in domains] + [row.average_ppl(domains)]
        out.append([None if v is None or r is None else 100.0 * (v / r - 1.0) for v, r in zip(values, ref)])
    return out


def plot_perplexities(rows: list[ResultRow], out_png: str | os.PathLike, domains: list[str] | None = None,
                      reference: str | None = None) -> Path:
    """A table you can see: one cell per row and domain (and the average), coloured by the
    perplexity's change relative to the reference row (:func:`reference_row`; blue better, red
    worse, saturating at +-20%), each cell labelled with the change and the perplexity. A change of
    a few percent on a domain near perplexity 2 is as visible as one on a domain near 20."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains = domains or domain_names(rows)
    ref = reference_row(rows, reference)
    changes = perplexity_changes(rows, domains, ref)
    groups = [*domains, "average"]
    grid = np.array([[np.nan if c is None else c for c in row] for row in changes], dtype=float)
    fig, ax = plt.subplots(figsize=(1.7 * len(groups) + 3.2, 0.42 * len(rows) + 1.6))
    image = ax.imshow(np.clip(grid, -CHANGE_CLIP_PERCENT, CHANGE_CLIP_PERCENT), cmap="RdBu_r", aspect="auto",
                      vmin=-CHANGE_CLIP_PERCENT, vmax=CHANGE_CLIP_PERCENT)
    for i, row in enumerate(rows):
        values = [row.ppl(d) for d in domains] + [row.average_ppl(domains)]
        for j, (change, value) in enumerate(zip(changes[i], values)):
            if value is None:
                text = "-"
            elif row is ref:
                text = f"{value:.2f}"
            else:
                text = f"{change:+.1f}%  ({value:.2f})"
            strong = change is not None and abs(change) > 0.6 * CHANGE_CLIP_PERCENT
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if strong else "black")
    ax.axvline(len(domains) - 0.5, color="black", lw=1.0)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title(f"perplexity change relative to {ref.name!r} (its perplexity in its row)", fontsize=9, pad=22)
    fig.colorbar(image, ax=ax, label="% change (clipped at +-20%)", fraction=0.04, pad=0.02)
    try:
        return _save_png(fig, Path(out_png))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def write_report(rows: list[ResultRow], output_dir: str | os.PathLike, *,
                 stage_metrics: dict[str, str | os.PathLike] | None = None,
                 stage_offsets: dict[str, float] | None = None,
                 routing_dir: str | os.PathLike | None = None, title: str = "BTX results",
                 notes: list[str] | None = None, extra: dict[str, Any] | None = None,
                 sections: list[str] | None = None, echo: bool = True) -> dict[str, Path]:
    """Write results.md, results.json, perplexity.png (+ loss_curves.png) into ``output_dir``.

    Returns ``{"markdown", "json", "perplexity_png", ["loss_curves_png"], ["routing_pngs"...]}``."""
    if not rows:
        raise ValueError("write_report: no result rows.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    domains = domain_names(rows)
    paths: dict[str, Any] = {"perplexity_png": plot_perplexities(rows, out / "perplexity.png", domains)}
    if stage_metrics:
        paths["loss_curves_png"] = plot_loss_curves(stage_metrics, out / "loss_curves.png", stage_offsets)
    routing_pngs = sorted(Path(routing_dir).glob("routing_*.png")) if routing_dir else []
    if routing_pngs:
        paths["routing_pngs"] = routing_pngs

    md = [f"# {title}", "", format_markdown(rows, domains)]
    md.append("Perplexity = exp(token-averaged validation loss) on the same held-out sequences for every "
              "model (softmax over the padded vocabulary, as in training); avg ppl = unweighted mean "
              "over domains. Training tokens/FLOPs include the stages a model starts from.")
    for row in rows:
        if row.notes:
            md.append(f"- **{row.name}**: {row.notes}")
    for note in notes or []:
        md.append(f"- {note}")
    md.append("")
    for section in sections or []:
        md += [section, ""]
    md.append(f"![perplexity]({paths['perplexity_png'].name})")
    if "loss_curves_png" in paths:
        md.append(f"![loss curves]({paths['loss_curves_png'].name})")
    for png in routing_pngs:
        md.append(f"![{png.stem}]({os.path.relpath(png, out)})")
    fmt.write_text_atomic(out / "results.md", "\n".join(md) + "\n")
    paths["markdown"] = out / "results.md"

    header, body = table(rows, domains)
    payload = {
        "title": title, "domains": domains, "columns": header,
        "rows": [{**dataclasses.asdict(r), "average_ppl": r.average_ppl(domains),
                  "average_loss": r.average_loss(domains)} for r in rows],
        "figures": {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in paths.items()
                    if k != "markdown"},
        **(extra or {}),
    }
    fmt.write_json_atomic(out / "results.json", payload)
    paths["json"] = out / "results.json"
    if echo:
        print(f"\n{title}\n" + format_text(rows, domains), flush=True)
    return paths
