"""The BTX paper's qualitative claims, checked on a results table.

The paper's shape (Sukhbaatar et al. 2024): each branch is the best dense model on its own
domain; BTX beats the compute-matched dense model on the average, and sparse upcycling and BTM
too; the merge keeps the branches' gains when routing sends each domain to its own expert.
Rows are dicts with ``model``, per-domain ``loss``/``ppl`` and ``average_loss`` (as the
experiment report builds them); models are named ``seed``, the domains, ``dense``,
``upcycling``, ``btm``, ``btx`` and ``btx_oracle``.
"""

from __future__ import annotations

from typing import Any


def check_claims(rows: list[dict], domains: list[str], branches: list[str]) -> dict[str, Any]:
    by = {r["model"]: r for r in rows}
    dense_models = [m for m in ("seed", *branches, "dense") if m in by]
    out: dict[str, Any] = {}
    for d in domains:
        if d in by:
            best = min(dense_models, key=lambda m: by[m]["loss"][d])
            out[f"branch {d} best dense model on {d}"] = best == d
    if "dense" in by and "btx" in by:
        out["BTX beats dense on the average"] = by["btx"]["average_loss"] < by["dense"]["average_loss"]
    if "btx" in by:
        gaps = {d: by["btx"]["ppl"][d] / min(by[m]["ppl"][d] for m in branches) - 1 for d in domains}
        out["BTX ppl gap to the best branch per domain (%)"] = {d: round(100 * g, 1) for d, g in gaps.items()}
    # How much of each branch's gain over the seed survives the merge (averaged shared weights)
    # when routing is perfect: 100% = the branch itself, 0% = the seed.
    if "btx_oracle" in by and "seed" in by:
        kept = {}
        for d in domains:
            if d in by and by["seed"]["loss"][d] != by[d]["loss"][d]:
                gain = by["seed"]["loss"][d] - by[d]["loss"][d]
                kept[d] = round(100 * (by["seed"]["loss"][d] - by["btx_oracle"]["loss"][d]) / gain, 1)
        out["share of each branch's loss gain kept by the merge, oracle routing (%)"] = kept
    return out
