"""``tools/edit_experts.py list``: the experts of a checkpoint, the checkpoint each came from
(iteration, content hash), its mix phases and its edit history (:func:`describe`), and the
human-readable table of them (:func:`format_description`).
"""

from __future__ import annotations

from .. import checkpoint as fmt
from .edit_options import source_of



def describe(path: str, full_hash: bool = False) -> dict:
    """The experts of a checkpoint, where each came from, and the edit history."""
    ckpt_dir, iteration = fmt.resolve(path, "--load")
    manifest = fmt.read_manifest(ckpt_dir)
    model = manifest.get("model", {})
    btx = manifest.get("btx") or {}
    num = model.get("num_experts") or 0
    names = list(btx.get("expert_names") or [f"expert_{i}" for i in range(num)])
    sources = {s.get("name"): s for s in btx.get("sources", [])}
    experts = []
    for i, name in enumerate(names):
        src = sources.get(source_of(name)) or sources.get(name) or {}
        experts.append({"index": i, "name": name, "source": src.get("name"), "path": src.get("checkpoint_dir")
                        or src.get("path"), "iteration": src.get("iteration"),
                        "content_hash": src.get("content_hash"), "added_by_edit": bool(src.get("added_by_edit"))})
    from ..checkpoint.verify import fingerprint

    return {"checkpoint": str(ckpt_dir), "iteration": iteration, "kind": manifest.get("kind"),
            "stage": manifest.get("stage"), "content_hash": fingerprint(ckpt_dir, full_hash),
            "num_experts": num, "router_topk": btx.get("recommended_topk") or model.get("moe_router_topk"),
            "method": btx.get("method"), "experts": experts, "edits": list(btx.get("edits", [])),
            "mix": list(btx.get("mix_history", [])) + ([btx["mix"]] if btx.get("mix") else []),
            "expert_training": btx.get("expert_training", [])}


def _short(h: str | None) -> str:
    if not h:
        return "-"
    kind, _, digest = h.partition(":")
    return f"{kind.replace('sha256-', '')}:{digest[:12]}"


def format_description(info: dict) -> str:
    lines = [f"{info['checkpoint']}  (iteration {info['iteration']}, {info['kind']}"
             + (f", stage {info['stage']}" if info.get("stage") else "") + f", {_short(info['content_hash'])})"]
    if info["kind"] != "moe":
        return "\n".join(lines + ["dense checkpoint: no experts"])
    lines.append(f"{info['num_experts']} experts, top-{info['router_topk']}, method {info['method'] or '-'}")
    lines.append("")
    lines.append(f"{'#':>2}  {'expert':<14} {'iteration':>9}  {'content hash':<22} source")
    for e in info["experts"]:
        it = "-" if e["iteration"] is None else str(e["iteration"])
        lines.append(f"{e['index']:>2}  {e['name']:<14} {it:>9}  {_short(e['content_hash']):<22} {e['path'] or '-'}"
                     + ("  (added)" if e["added_by_edit"] else ""))
    lines += ["", "mix phases:"] + ([f"  - from {m.get('started_from')} (router {m.get('router_type')} "
                                     f"top-{m.get('router_topk')})" for m in info["mix"]] or ["  none"])
    lines += ["expert training against frozen shared weights:"] + (
        [f"  - {', '.join(t.get('experts', []))}" + (" with their router rows" if t.get("router_rows") else "")
         + f", from {t.get('started_from')}" for t in info["expert_training"]] or ["  none"])
    lines.append("edits, oldest first:")
    for i, ed in enumerate(info["edits"]):
        what = f"{ed['op']} {', '.join(ed.get('names', []))}"
        if ed["op"] == "add":
            src = ed.get("source", {})
            what += (f" from {src.get('checkpoint_dir')} (iteration {src.get('iteration')}, "
                     f"{_short(src.get('content_hash'))}), router {ed.get('router_init')}"
                     + (f", shared weights blended at {ed['blend_shared']}" if ed.get("blend_shared") else ""))
        base = ed.get("base", {})
        lines.append(f"  {i + 1}. {what}; base {base.get('checkpoint_dir')} ({_short(base.get('content_hash'))}); "
                     f"{ed.get('time')}, git {str(ed.get('git_revision'))[:12]}")
    if not info["edits"]:
        lines.append("  none")
    return "\n".join(lines)


__all__ = ["describe", "format_description"]
