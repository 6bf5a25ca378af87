"""Growing and pruning the experiment's BTX model: the optional pipeline stage ``grow``.

    python tools/run_experiment.py examples/tiny/experiment.yaml --stages grow    # after a normal run

BTX's promise is modularity: a domain can be added to a finished BTX model without redoing it,
and removed again (data withdrawn: FlexOlmo's opt-out). This stage measures both on the
experiment's own model, the mix phase's output ``(a)``:

1. a fourth domain (``headers``: C headers, :func:`btx_megatron.data.corpora.build_extra_domain`)
   is built into the corpora directory with the experiment's existing tokenizer;
2. its dense branch is trained from the seed exactly like the first domain's branch;
3. ``add`` (:mod:`btx_megatron.merge.edit`) makes it expert E, the router row from the BTX
   model's own hidden states: the new domain's centroid minus the mean of the old domains'
   (``--centroid-contrast``), at the norm of the trained rows  -> ``(b)``;
4. ``(c)``: a short mix phase of N steps (default: a third of the experiment's mix phase) on
   every domain, the new one included at the mean domain weight. It continues a trained model,
   so its peak LR is the LR the experiment's mix phase ended at (its ``min_lr``), not the mix
   phase's own peak; ``(c')`` runs the same steps at the mix phase's own schedule to show what
   re-warming to the peak costs the old domains;
5. ``(d)``: N steps of expert training against frozen shared weights (``--train-experts NEW
   --train-router``: only the new expert and its router rows move) on the new domain alone, at
   the mix phase's own LR schedule (like a branch, it trains new weights); ``(d0)`` the same with
   the router rows frozen (``--train-experts NEW``), ``(d*)`` with the router rows on every
   domain's data (the old domains' tokens are the router row's negative examples);
6. the alternative at the same added compute: BTX rebuilt from the four branches and the seed
   (the existing branches reused), mixed for the same N steps;
7. removal: the new expert removed from ``(d)`` and from ``(c)`` (compared with ``(a)``, the BTX
   model without it), and an original domain removed from ``(a)`` (compared with BTX merged and
   mixed without that domain, its data left out of the mix phase).

Every model is evaluated on the same held-out sequences of all four domains; the report
(:mod:`.grow_report`: ``OUT/grow/report/grow.md``, ``grow.json``, ``grow.png``, ``remove.png``) gives
the tables, each old domain's change against ``(a)`` (the 2% / 1% targets say how much they moved, not
pass/fail), the removed domain's gap to its reference, and the added training FLOPs.

Sub-stages are ordinary stage records (``grow:branch``, ``grow:add``, ...), reused when their
inputs and outputs are unchanged. Training runs through the local runner; edits, the corpora
job, merges and evaluation run in child processes through :mod:`.worker`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config.experiment import SEED_NAME, BlendEntry, Budget, StageOptions
from ..launch import plan as planning
from ..launch.plan import MIX_NAME, RunPlan
from .evaluation import eval_num_samples
from .grow_report import (
    GROWN, OLD_DOMAIN_TOLERANCE, REMAINING_TOLERANCE, relative, removal_row, same_model_tensors, write_grow_report,
)
from .state import Check, PipelineError, check_checkpoint_root, eval_check, file_fingerprint, read_json

STAGE = "grow"


@dataclasses.dataclass
class GrowOptions:
    domain: str = "headers"
    """The new domain (a built-in extra domain of btx_megatron.data.corpora)."""
    steps: int | None = None
    """N: steps of the short mix phase, of the expert training and of the rebuild's mix phase
    (default: a third of the experiment's mix phase, at least 1)."""
    router_init: str = "centroid"
    """Router row of the added expert: centroid (the BTX model's hidden states) or random."""
    contrast: bool = True
    """With centroid: the row points away from the experiment's domains (their training data as
    --centroid-contrast), not only at the new one."""
    remove_domain: str | None = "wiki"
    """An original domain removed from (a) and compared with BTX built without it (None: skip)."""
    centroid_samples: int = 64
    """Sequences of the new domain's training data for the centroid router row."""
    continue_lr: float | None = None
    """Peak LR of (c), which continues the trained model (default: the mix phase's min_lr, where
    its schedule ended); it decays to a tenth of that."""
    peak_lr_row: bool = True
    """Also run (c') = (c) at the mix phase's own LR schedule."""


@dataclasses.dataclass
class _Model:
    key: str     # eval file name
    short: str   # how other rows refer to it
    label: str   # table row
    path: Path


class Grow:
    """The grow stage of one pipeline (see the module docstring)."""

    def __init__(self, pipeline, opts: GrowOptions | None = None):
        self.p = pipeline
        self.exp = pipeline.exp
        self.opts = opts or GrowOptions()
        self.out = pipeline.out / STAGE
        root = pipeline.corpora_dir()
        if root is None:
            raise PipelineError("grow builds its new domain into the experiment's built-in corpora directory "
                                "(tokenizer DIR/tokenizer/tokenizer.model and data under DIR/data/); this experiment's "
                                "data lives elsewhere.")
        from ..data.documents import EXTRA_DOMAINS
        from ..data.extra_domains import extra_domain_prefix

        d = self.opts.domain
        if d in self.exp.domain_names:
            raise PipelineError(f"grow: the experiment already has a domain named {d!r}.")
        if d not in EXTRA_DOMAINS:
            raise PipelineError(f"grow: the new domain {d!r} is not a built-in extra domain ({', '.join(EXTRA_DOMAINS)}).")
        if self.opts.remove_domain is not None and self.opts.remove_domain not in self.exp.domain_names:
            raise PipelineError(f"grow: remove_domain {self.opts.remove_domain!r} is not one of the experiment's domains "
                                f"({', '.join(self.exp.domain_names)}).")
        self.corpora = root
        self.train_prefix = extra_domain_prefix(str(root), d, "train")
        self.valid_prefix = extra_domain_prefix(str(root), d, "valid")
        mix = pipeline.plans[MIX_NAME]
        self.steps = self.opts.steps or max(1, mix.target_iters // 3)
        self.continue_lr = self.opts.continue_lr or mix.config.train.min_lr or mix.config.train.lr / 10
        self.num_experts = planning.num_btx_experts(self.exp)
        if self.exp.merge.method != "btx":
            raise PipelineError(f"grow: the experiment merges with method {self.exp.merge.method!r}; growing and "
                                "pruning are measured on the plain BTX merge (method: btx).")

    # ------------------------------------------------------------------ paths
    def _dir(self, name: str) -> Path:
        return self.out / name

    @property
    def added_dir(self) -> Path:
        return self._dir("added")

    @property
    def eval_domains(self) -> dict[str, str]:
        return {**self.exp.eval_domains, self.opts.domain: self.valid_prefix}

    # ------------------------------------------------------------------ plans
    def _mix_model(self, num_experts: int) -> dict[str, Any]:
        return {**self.exp.mix.model, "num_experts": num_experts}

    def grown_blend(self) -> list[BlendEntry]:
        """The mix phase's data plus the new domain at the mean weight of the experiment's domains."""
        weights = [w for n, w in self.exp.mix.data.items() if n != SEED_NAME]
        return self.exp.mix_blend() + [BlendEntry(self.train_prefix, sum(weights) / len(weights))]

    def reduced_blend(self, removed: str) -> list[BlendEntry]:
        """The mix phase's data without ``removed``: its share and its prefixes in the seed's share dropped."""
        gone = {e.prefix for e in self.exp.domain(removed).data}
        return [e for e in self.exp.mix_blend() if e.prefix not in gone]

    def plans(self) -> dict[str, RunPlan]:
        exp, d, first = self.exp, self.opts.domain, self.exp.domains[0]
        plans: dict[str, RunPlan] = {}
        branch_blend = [BlendEntry(self.train_prefix)]
        branch_budget = Budget(train_iters=self.p.plans[first.name].target_iters)
        run = self._dir(f"branch_{d}")
        cfg = planning.build_run_config(exp, first.options, branch_blend, run / "checkpoints", branch_budget,
                                        f"grow ({d} branch)")
        plans["branch"] = RunPlan(f"{STAGE}:branch", "branch", run, cfg, first.options.launch,
                                  str(self.p.seed_checkpoint), branch_blend)

        def mix(key: str, init: Path, num_experts: int, blend: list[BlendEntry], iters: int,
                **train: Any) -> RunPlan:
            run = self._dir(key)
            sections = {s: dict(v) for s, v in exp.mix.options.sections.items()}
            sections["train"] = {**sections.get("train", {}), **train}
            options = StageOptions(launch=exp.mix.options.launch, sections=sections)
            cfg = planning.build_run_config(exp, options, blend, run / "checkpoints", Budget(train_iters=iters),
                                            f"grow ({key})", self._mix_model(num_experts))
            return RunPlan(f"{STAGE}:{key}", "mix", run, cfg, options.launch, str(init), blend)

        grown = self.num_experts + 1
        lr = self.continue_lr
        plans["mix"] = mix("mix", self.added_dir, grown, self.grown_blend(), self.steps, lr=lr, min_lr=lr / 10)
        if self.opts.peak_lr_row:
            plans["mix_peak"] = mix("mix_peak", self.added_dir, grown, self.grown_blend(), self.steps)
        plans["expert"] = mix("expert", self.added_dir, grown, branch_blend, self.steps, train_experts=[d],
                              train_router=True)
        plans["expert_only"] = mix("expert_only", self.added_dir, grown, branch_blend, self.steps, train_experts=[d])
        plans["expert_all"] = mix("expert_all", self.added_dir, grown, self.grown_blend(), self.steps,
                                  train_experts=[d], train_router=True)
        plans["rebuild"] = mix("rebuild", self._dir("rebuild_merged"), grown, self.grown_blend(), self.steps)
        if self.opts.remove_domain:
            r = self.opts.remove_domain
            plans["without"] = mix(f"without_{r}", self._dir(f"merged_without_{r}"), self.num_experts - 1,
                                   self.reduced_blend(r), self.p.plans[MIX_NAME].target_iters)
        for plan in plans.values():
            self.p.plans[plan.name] = plan  # the pipeline's failure messages look runs up by name
        return plans

    # ------------------------------------------------------------------ jobs
    def _ensure_edit(self, name: str, job: str, spec: dict, inputs: dict, num_experts: int) -> dict[str, str]:
        out = Path(spec["output"])
        return self.p.runner.ensure(name, STAGE, spec, inputs, self.p._merge_check(out, name, num_experts),
                                    lambda _: self.p._job(job, spec, name.replace(":", "_"), f"{name} ({job})"))

    def _required(self) -> dict[str, dict]:
        """Fingerprints of the finished BTX run this stage starts from."""
        p, fps = self.p, {}
        names = [MIX_NAME, *self.exp.domain_names] + ([SEED_NAME] if self.exp.seed.trained_here else [])
        for name in names:
            check = p._train_check(p.plans[name])()
            if not check.ok:
                raise PipelineError(f"grow needs the finished BTX run ({check.reason}); run "
                                    f"tools/run_experiment.py {self.exp.source} first.")
            fps[name] = check.fingerprint
        if not self.exp.seed.trained_here:
            fps[SEED_NAME] = check_checkpoint_root(p.seed_checkpoint, "seed checkpoint", kind="dense").fingerprint
        return fps

    # ------------------------------------------------------------------ the stage
    def run(self) -> dict[str, Any]:
        p, d, r = self.p, self.opts.domain, self.opts.remove_domain
        runs = self._required()
        self.out.mkdir(parents=True, exist_ok=True)
        corpora_fp = {"manifest": file_fingerprint(self.corpora / "manifest.json")}
        data_fp = self._extra_domain(corpora_fp)
        plans = self.plans()
        branch_fp = p._train_stage(plans["branch"].name, STAGE, plans["branch"], {"seed": runs[SEED_NAME],
                                                                                   "data": data_fp})
        btx_ckpt = str(p.plans[MIX_NAME].save_dir)
        add_spec = {"load": btx_ckpt, "output": str(self.added_dir), "branch": [d, str(plans["branch"].save_dir)],
                    "router_init": self.opts.router_init, "router_seed": self.exp.merge.router_seed,
                    "overwrite": True, "progress": False}
        if self.opts.router_init == "centroid":
            add_spec.update(centroid_data={d: [self.train_prefix]}, centroid_samples=self.opts.centroid_samples,
                            tokenizer_type=self.exp.tokenizer_type, tokenizer_model=self.exp.tokenizer_model)
            if self.opts.contrast:
                add_spec["contrast_data"] = {x.name: [e.prefix for e in x.data] for x in self.exp.domains}
        grown = self.num_experts + 1
        added_fp = self._ensure_edit(f"{STAGE}:add", "add", add_spec, {"btx": runs[MIX_NAME], "branch": branch_fp},
                                     grown)
        fps = {"added": added_fp}
        for key in ("mix", "mix_peak", "expert", "expert_only", "expert_all"):
            if key in plans:
                fps[key] = p._train_stage(plans[key].name, STAGE, plans[key], {"added": added_fp, "data": data_fp})
        # The alternative at the same added compute: BTX merged again from all four branches.
        rebuild = p.merge_spec()
        rebuild["branches"] = rebuild["branches"] + [[d, str(plans["branch"].save_dir)]]
        rebuild["output"] = str(self._dir("rebuild_merged"))
        if rebuild.get("centroid_data"):
            rebuild["centroid_data"] = {**rebuild["centroid_data"], d: [self.train_prefix]}
        merged_fp = p.runner.ensure(
            f"{STAGE}:rebuild_merge", STAGE, rebuild, {"branches": {n: runs[n] for n in self.exp.domain_names},
                                                       "new": branch_fp, "seed": runs[SEED_NAME]},
            p._merge_check(Path(rebuild["output"]), "rebuilt BTX checkpoint", grown),
            lambda _: p._job("merge", rebuild, "grow_rebuild_merge", "grow: rebuild merge (btx_megatron.merge)"))
        fps["rebuild"] = p._train_stage(plans["rebuild"].name, STAGE, plans["rebuild"], {"merged": merged_fp})
        # Removal of the new expert (from (d) and from (c)), and of an original domain.
        for key in ("expert", "mix"):
            spec = {"load": str(plans[key].save_dir), "output": str(self._dir(f"{key}_minus_{d}")), "experts": [d],
                    "overwrite": True, "progress": False}
            fps[f"{key}_minus"] = self._ensure_edit(f"{STAGE}:remove_{d}_from_{key}", "remove", spec,
                                                    {"model": fps[key]}, self.num_experts)
        if r:
            spec = {"load": btx_ckpt, "output": str(self._dir(f"btx_minus_{r}")), "experts": [r], "overwrite": True,
                    "progress": False}
            fps["btx_minus"] = self._ensure_edit(f"{STAGE}:remove_{r}", "remove", spec, {"btx": runs[MIX_NAME]},
                                                 self.num_experts - 1)
            without = p.merge_spec()
            without["branches"] = [b for b in without["branches"] if b[0] != r]
            without["output"] = str(self._dir(f"merged_without_{r}"))
            if without.get("centroid_data"):
                without["centroid_data"] = {k: v for k, v in without["centroid_data"].items() if k != r}
                if SEED_NAME in without["centroid_data"]:
                    gone = {e.prefix for e in self.exp.domain(r).data}
                    without["centroid_data"][SEED_NAME] = [x for x in without["centroid_data"][SEED_NAME]
                                                           if x not in gone]
            wfp = p.runner.ensure(
                f"{STAGE}:merge_without_{r}", STAGE, without,
                {"branches": {n: runs[n] for n in self.exp.domain_names if n != r}, "seed": runs[SEED_NAME]},
                p._merge_check(Path(without["output"]), f"BTX merged without {r}", self.num_experts - 1),
                lambda _: p._job("merge", without, f"grow_merge_without_{r}", f"grow: merge without {r}"))
            fps["without"] = p._train_stage(plans["without"].name, STAGE, plans["without"], {"merged": wfp})
        models = self.models(plans)
        fps["btx"], fps["branch"] = runs[MIX_NAME], branch_fp
        eval_fps = self._evaluate(models, fps)
        return self._report(models, plans, eval_fps)

    def _extra_domain(self, corpora_fp: dict) -> dict[str, str]:
        from ..data.extra_domains import extra_domain_manifest_path

        manifest = Path(extra_domain_manifest_path(str(self.corpora), self.opts.domain))
        spec = {"corpora": str(self.corpora), "domain": self.opts.domain}

        def validate() -> Check:
            data = read_json(manifest)
            if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
                return Check(False, f"{manifest} is missing or does not parse")
            missing = [p + s for p in (self.train_prefix, self.valid_prefix) for s in (".bin", ".idx")
                       if not Path(p + s).is_file()]
            if missing:
                return Check(False, f"missing {', '.join(missing)}")
            return Check(True, fingerprint={"manifest": file_fingerprint(manifest)})

        return self.p.runner.ensure(f"{STAGE}:corpora", STAGE, spec, {"corpora": corpora_fp}, validate,
                                    lambda _: self.p._job("extra_domain", spec, "grow_corpora",
                                                          f"grow: {self.opts.domain} domain (btx_megatron.data.corpora)"))

    # ------------------------------------------------------------------ evaluation and report
    def models(self, plans: dict[str, RunPlan]) -> list[_Model]:
        d, r, n = self.opts.domain, self.opts.remove_domain, self.steps
        out = [_Model("btx", "(a)", "(a) BTX, before the add", self.p.plans[MIX_NAME].save_dir),
               _Model("added", "(b)", f"(b) + {d} expert (add, no training)", self.added_dir),
               _Model("mix", "(c)", f"(c) (b) + {n} mix steps, all domains, LR {self.continue_lr:g}",
                      plans["mix"].save_dir),
               _Model("expert_only", "(d0)", f"(d0) (b) + {n} steps training only the {d} expert (router frozen), "
                      f"{d} data", plans["expert_only"].save_dir),
               _Model("expert", "(d)", f"(d) (b) + {n} steps training only the {d} expert and its router rows, "
                      f"{d} data", plans["expert"].save_dir),
               _Model("expert_all", "(d*)", "(d*) as (d) on every domain's data", plans["expert_all"].save_dir),
               _Model("rebuild", "rebuild", f"rebuild: BTX merged from all four branches + {n} mix steps",
                      plans["rebuild"].save_dir),
               _Model("branch", f"{d} branch", f"{d} branch alone (dense)", plans["branch"].save_dir),
               _Model("expert_minus", f"(d) - {d}", f"(d) - {d} (remove)", self._dir(f"expert_minus_{d}")),
               _Model("mix_minus", f"(c) - {d}", f"(c) - {d} (remove)", self._dir(f"mix_minus_{d}"))]
        if "mix_peak" in plans:
            peak = plans["mix_peak"].config.train.lr
            out.insert(3, _Model("mix_peak", "(c')", f"(c') as (c) at the mix phase's LR schedule (peak {peak:g})",
                                 plans["mix_peak"].save_dir))
        if r:
            out += [_Model("btx_minus", f"(a) - {r}", f"(a) - {r} (remove)", self._dir(f"btx_minus_{r}")),
                    _Model("without", f"BTX without {r}", f"BTX merged and mixed without {r}",
                           plans["without"].save_dir)]
        return out

    def _evaluate(self, models: list[_Model], fps: dict[str, dict]) -> dict[str, str]:
        p = self.p
        eval_dir = self.out / "eval"
        common = {"domains": {k: [v] for k, v in self.eval_domains.items()},
                  "tokenizer_type": self.exp.tokenizer_type, "tokenizer_model": self.exp.tokenizer_model,
                  "num_samples": eval_num_samples(p)}
        members = {f"{STAGE}:evaluate:{m.key}": ({**common, "path": str(m.path)}, {"model": fps[m.key]},
                                                 eval_check(eval_dir / f"{m.key}.json", list(self.eval_domains)))
                   for m in models}

        def build(checks: dict[str, Check]) -> None:
            keys = [s.rsplit(":", 1)[1] for s in checks]
            eval_dir.mkdir(parents=True, exist_ok=True)
            for k in keys:
                (eval_dir / f"{k}.json").unlink(missing_ok=True)
            by_key = {m.key: m for m in models}
            spec = {**common, "models": {k: {"path": str(by_key[k].path)} for k in keys},
                    "outputs": {k: str(eval_dir / f"{k}.json") for k in keys}}
            p._job("evaluate", spec, "grow_evaluate", "grow: evaluation")

        out = p.runner.ensure_group(STAGE, members, build, label=f"{STAGE}:evaluate")
        return {s.rsplit(":", 1)[1]: fp["result"] for s, fp in out.items()}

    def _report(self, models: list[_Model], plans: dict[str, RunPlan], eval_fps: dict[str, str]) -> dict[str, Any]:
        report_dir = self.out / "report"
        files = ["grow.md", "grow.json", "grow.png", "remove.png"]

        def validate() -> Check:
            missing = [f for f in files if not (report_dir / f).is_file()]
            if missing:
                return Check(False, f"missing {', '.join(missing)} in {report_dir}")
            return Check(True, fingerprint={f: file_fingerprint(report_dir / f) for f in files})

        def build(_: Check) -> None:
            results = {m.key: read_json(self.out / "eval" / f"{m.key}.json") for m in models}
            flops = {k: _flops(plans[k].save_dir) for k in plans}
            # (d) trains only the new expert (and its router rows): removing it must give (a) back.
            identical = same_model_tensors(self._dir(f"expert_minus_{self.opts.domain}"),
                                           self.p.plans[MIX_NAME].save_dir)
            write_grow_report(report_dir, self.summary(models, results, flops, identical))

        self.p.runner.ensure(f"{STAGE}:report", STAGE, {"files": files, "steps": self.steps}, {"eval": eval_fps},
                             validate, build)
        text = (report_dir / "grow.md").read_text()
        self.p.echo("\n" + text)
        return read_json(report_dir / "grow.json")

    def summary(self, models: list[_Model], results: dict[str, dict], flops: dict[str, float],
                identical: bool | None) -> dict[str, Any]:
        """Everything the report prints, as plain data (see :func:`write_grow_report`)."""
        d, r = self.opts.domain, self.opts.remove_domain
        old = list(self.exp.eval_domains)
        ppl = {m.key: {dom: results[m.key]["domains"][dom]["ppl"] for dom in self.eval_domains} for m in models}
        labels = {m.key: m.label for m in models}
        short = {m.key: m.short for m in models}
        branch = flops.get("branch", 0.0)
        added = {"btx": 0.0, "added": branch, "branch": branch}
        added.update({k: branch + flops[k] for k in GROWN if k in flops})
        grow_rows = [{"key": k, "label": labels[k], "ppl": ppl[k], "added_flops": added[k],
                      "old_change": {o: relative(ppl[k][o], ppl["btx"][o]) for o in old}}
                     for k in ("btx", "added", *GROWN, "branch") if k in labels]
        remove_rows = [removal_row(labels["expert_minus"], "expert_minus", ppl, d, ref="btx", before="expert",
                                   domains=[*old, d], identical=identical),
                       removal_row(labels["mix_minus"], "mix_minus", ppl, d, ref="btx", before="mix", domains=[*old, d])]
        if r:
            # (a) was built on the old domains only: the new one is no remaining domain of it.
            remove_rows.append(removal_row(labels["btx_minus"], "btx_minus", ppl, r, ref="without", before="btx",
                                           domains=old))
        return {"domain": d, "old_domains": old, "remove_domain": r, "steps": self.steps,
                "router_init": self.opts.router_init + (" (contrast)" if self.opts.contrast else ""),
                "labels": labels, "short": short, "ppl": ppl, "grow": grow_rows, "remove": remove_rows,
                "flops": flops, "tolerances": {"old_domains_after_add": OLD_DOMAIN_TOLERANCE,
                                               "remaining_after_remove": REMAINING_TOLERANCE}}


def _flops(save_dir: Path) -> float:
    summary = read_json(Path(save_dir) / "eval_summary.json") or {}
    return float(summary.get("flops", 0.0))


def stage_grow(pipeline, opts: GrowOptions | None = None) -> dict[str, Any]:
    """The pipeline's hook: run the grow stage of ``pipeline`` (see the module docstring)."""
    return Grow(pipeline, opts).run()


__all__ = ["Grow", "GrowOptions", "STAGE", "stage_grow"]
