"""The grow stage's report (:mod:`.grow`): per-domain perplexities of every grown and pruned
model as tables (``grow.md``, ``grow.json``) and figures (``grow.png``, ``remove.png``), the old
domains' changes after an add, a removed domain's gap to its reference, and the bit-for-bit
comparison of a removal with the model it should give back. Pure helpers, tested without any
training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as fmt
from ..checkpoint.dcp_reader import CheckpointReader
from ..checkpoint.verify import dcp_metadata
from ..eval.report import ResultRow, _human, plot_perplexities

GROWN = ("mix", "mix_peak", "expert_only", "expert", "expert_all", "rebuild")  # rows trained after the add
OLD_DOMAIN_TOLERANCE = 0.02  # old domains after an add: at most 2% relative change
REMAINING_TOLERANCE = 0.01   # remaining domains after a remove: at most 1% relative change


def relative(value: float, reference: float) -> float:
    """Relative change ``value / reference - 1``."""
    return value / reference - 1.0


def removal_row(label: str, key: str, ppl: dict[str, dict[str, float]], removed: str, *, ref: str, before: str,
                domains: list[str], identical: bool | None = None) -> dict[str, Any]:
    """A removal: the removed domain's gap to ``ref`` (the model without that domain) and the
    change of every remaining domain against ``before`` (the model it was removed from).

    ``domains``: the domains ``before`` was built on (one expert each). Only those are its
    remaining domains; a domain it never had (the new one, for a removal from ``(a)``) is
    evaluated too, but its change is kept apart in ``other_change``: it is no domain of the model."""
    remaining = [x for x in domains if x != removed]
    others = [x for x in ppl[key] if x not in domains]
    row = {"key": key, "label": label, "removed": removed, "reference": ref, "before": before,
           "ppl": ppl[key], "removed_gap": relative(ppl[key][removed], ppl[ref][removed]),
           "remaining_change": {x: relative(ppl[key][x], ppl[before][x]) for x in remaining},
           "other_change": {x: relative(ppl[key][x], ppl[before][x]) for x in others}}
    if identical is not None:
        row["bit_identical_to_reference"] = identical
    return row


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _worst(changes: dict[str, float]) -> tuple[str, float]:
    name = max(changes, key=lambda k: abs(changes[k]))
    return name, changes[name]


def format_grow_markdown(s: dict[str, Any]) -> str:
    d, old = s["domain"], s["old_domains"]
    doms = [*old, d]
    tol = s["tolerances"]
    lines = [f"# Growing and pruning the BTX model: + {d}, - {s['remove_domain'] or '(none)'}", "",
             f"## Add a domain: {d} (N = {s['steps']} steps, router row: {s['router_init']})", "",
             "| model | " + " | ".join(f"{x} ppl" for x in doms) + " | old domains vs (a) | added training FLOPs |",
             "|---|" + "---:|" * (len(doms) + 2)]
    for row in s["grow"]:
        if row["key"] == "btx":
            change = "-"
        else:
            name, worst = _worst(row["old_change"])
            flag = "" if abs(worst) <= tol["old_domains_after_add"] else " (over 2%)"
            change = f"max {_pct(worst)} ({name}){flag}"
        lines.append(f"| {row['label']} | " + " | ".join(f"{row['ppl'][x]:.2f}" for x in doms)
                     + f" | {change} | {_human(row['added_flops']) if row['added_flops'] else '-'} |")
    lines += ["", "Old domains vs (a): the largest relative perplexity change over "
              f"{', '.join(old)} against the BTX model before the add (target: within "
              f"{100 * tol['old_domains_after_add']:.0f}%). Added training FLOPs: the {d} branch plus what "
              "each row trained after it ((b) trains nothing after the branch); the rebuild reuses the three "
              "existing branches and trains the same N mix steps as (c).", "",
              "## Remove a domain", "",
              "| model | " + " | ".join(f"{x} ppl" for x in doms) + " | removed domain vs reference | "
              "remaining domains vs before |", "|---|" + "---:|" * (len(doms) + 2)]
    labels, short = s["labels"], s.get("short", {})
    for row in s["remove"]:
        name, worst = _worst(row["remaining_change"])
        flag = "" if abs(worst) <= tol["remaining_after_remove"] else " (over 1%)"
        same = " (bit-identical to it)" if row.get("bit_identical_to_reference") else ""
        ref, before = (short.get(row[k], labels[row[k]]) for k in ("reference", "before"))
        lines.append(f"| {row['label']} | " + " | ".join(f"{row['ppl'][x]:.2f}" for x in doms)
                     + f" | {row['removed']}: {_pct(row['removed_gap'])} vs {ref}{same}"
                     + f" | max {_pct(worst)} ({name}) vs {before}{flag}"
                     + "".join(f"; {x}, not a domain of it: {_pct(c)}" for x, c in row.get("other_change", {}).items())
                     + " |")
    if s["remove_domain"]:
        without = s["ppl"]["without"]
        lines.append(f"| {labels['without']} | " + " | ".join(f"{without[x]:.2f}" for x in doms) + " | reference | - |")
    lines += ["", "Removed domain vs reference: its perplexity after the removal relative to the model that never "
              "had that expert (for the new domain: (a); for an original domain: BTX merged from the other "
              "branches and mixed as long as (a), without that domain's data). Remaining domains: the largest "
              "relative change over the domains the model the expert was removed from was built on (target: "
              f"within {100 * tol['remaining_after_remove']:.0f}%); a domain it never had is shown apart.", "", "![grow](grow.png)", "", "![remove](remove.png)"]
    return "\n".join(lines) + "\n"


def write_grow_report(report_dir: Path, s: dict[str, Any]) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    doms = [*s["old_domains"], s["domain"]]

    def rows(keys):
        return [ResultRow(s["labels"][k], "other", {x: {"ppl": s["ppl"][k][x]} for x in doms}) for k in keys]

    grown = [k for k in ("btx", "added", *GROWN) if k in s["labels"]]
    plot_perplexities(rows(grown), report_dir / "grow.png", doms)
    remove_keys = ["btx", "expert_minus", "mix_minus"] + (["btx_minus", "without"] if s["remove_domain"] else [])
    plot_perplexities(rows(remove_keys), report_dir / "remove.png", doms)
    fmt.write_json_atomic(report_dir / "grow.json", s)
    fmt.write_text_atomic(report_dir / "grow.md", format_grow_markdown(s))


def same_model_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same model tensors, bit for bit (any saved layouts)."""
    readers = []
    for root in (a, b):
        ckpt_dir, _ = fmt.resolve(root)
        readers.append(CheckpointReader(ckpt_dir, dcp_metadata(ckpt_dir), str(root)))
    try:
        keys = [{k for k in r.tensors if k.startswith(("embedding.", "decoder.", "output_layer."))} for r in readers]
        if keys[0] != keys[1]:
            return False
        for k in sorted(keys[0]):
            (shape, dtype), other = readers[0].tensors[k], readers[1].tensors[k]
            if (shape, dtype) != other:
                return False
            x, y = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
            readers[0].read(k, (0,) * len(shape), x)
            readers[1].read(k, (0,) * len(shape), y)
            if not torch.equal(x, y):
                return False
        return True
    finally:
        for r in readers:
            r.close()


__all__ = ["GROWN", "OLD_DOMAIN_TOLERANCE", "REMAINING_TOLERANCE", "format_grow_markdown", "relative", "removal_row",
           "same_model_tensors", "write_grow_report"]
