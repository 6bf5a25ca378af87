"""Run planning: every training run of an experiment as one :class:`RunPlan`.

:func:`plan_runs` turns an :class:`~btx_megatron.config.experiment.Experiment` into one plan per
run: the seed (when the experiment pretrains it), each domain branch, the dense baseline, the
BTX mix phase (and its router variants) and the sparse-upcycling baseline's mix phase. A plan
holds the validated :class:`~btx_megatron.config.Config` (built here and nowhere else), the
launch layout and the exact ``python -m btx_megatron.pretrain[_mix]`` flags. Nothing is shared
between runs: each has its own directory, process group and rendezvous port, so a failure or a
restart touches one run only.

Run directory (``OUT/branches/NAME``, ``OUT/mix``, ``OUT/baselines/dense`` ...)::

    resolved_config.json   the Config, flags, launch layout, experiment file (written before start)
    command.sh             the exact command of the latest local start
    launch.json            pid / process group / MASTER_PORT / world size of the current attempt
    exit.json              return code of the last local attempt
    slurm.json             job id of the last submission (--slurm)
    logs/train.log         stdout+stderr of every local attempt (appended)
    checkpoints/           --save: iter_XXXXXXX/, metrics.jsonl, eval_summary.json, run_config.json

The first start of a branch or of the dense baseline loads the seed with ``--finetune``
(iteration 0, new optimizer); a mix run's first start loads the merged model (the mix
entrypoint starts a merge output at iteration 0). A restart resumes the run's own checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as fmt
from ..config import Config, config_to_argv
from ..data import build_tokenizer
from ..training.metrics import flops_per_token
from ..config.experiment import (
    DENSE_NAME, SEED_NAME, BlendEntry, Budget, Experiment, ExperimentError, Launch, StageOptions,
    blend_to_data_path,
)

MIX_NAME = "mix"
UPCYCLING_NAME = "upcycling"
DENSE_MODULE = "btx_megatron.pretrain"
MOE_MODULE = "btx_megatron.pretrain_mix"
# The paper's Switch baseline (Table 4) uses capacity factor 1.5.
ROUTER_VARIANT_OVERRIDES = {"switch": {"moe_expert_capacity_factor": 1.5}}


@dataclass
class RunPlan:
    name: str
    kind: str                      # seed | branch | dense | mix | upcycling
    run_dir: Path
    config: Config                 # save set; how to start (--load/--finetune) is decided per start
    launch: Launch
    init_checkpoint: str | None    # the seed (branch, dense), the merged model (mix, upcycling)
    blend: list[BlendEntry]

    @property
    def save_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def module(self) -> str:
        return MOE_MODULE if self.config.model.is_moe else DENSE_MODULE

    @property
    def target_iters(self) -> int:
        return self.config.train.train_iters

    @property
    def tokens_per_iter(self) -> int:
        return self.config.train.global_batch_size * self.config.model.seq_length

    def base_argv(self) -> list[str]:
        """Every flag except how to start (``--load``/``--finetune``)."""
        return config_to_argv(self.config)

    def start_args(self, resume: bool | None = None) -> list[str]:
        """First start: the initial checkpoint; later starts: resume the run's own ``--save``.

        The trainer would also prefer its own checkpoints over ``--load`` (SLURM requeue), but
        the command says so explicitly, so a log shows which one was meant."""
        if resume is None:
            resume = fmt.read_tracker(self.save_dir) is not None
        if resume:
            return ["--load", str(self.save_dir)]
        if self.init_checkpoint is None:
            return []
        if self.config.model.is_moe:  # the mix entrypoint starts a merge output at iteration 0
            return ["--load", self.init_checkpoint]
        return ["--load", self.init_checkpoint, "--finetune"]

    def trainer_argv(self, resume: bool | None = None) -> list[str]:
        return self.base_argv() + self.start_args(resume)

    def local_command(self, master_port: int, python: str = sys.executable, resume: bool | None = None) -> list[str]:
        k = self.launch.nproc_per_node
        if k == 1:
            # Plain python with an explicit single-rank env: no rendezvous process to outlive us.
            return [python, "-m", self.module, *self.trainer_argv(resume)]
        # A static rendezvous on our own port (not --standalone) so the port is recorded and
        # distinct per run: no process group can span two runs.
        return [python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(k),
                "--master-addr", "127.0.0.1", "--master-port", str(master_port),
                "-m", self.module, *self.trainer_argv(resume)]

    def resolved(self, exp: Experiment) -> dict[str, Any]:
        return {
            "experiment": exp.name,
            "experiment_file": os.path.abspath(exp.source),
            "run": self.name,
            "kind": self.kind,
            "module": self.module,
            "launch": dataclasses.asdict(self.launch),
            "init_checkpoint": self.init_checkpoint,
            "save": str(self.save_dir),
            "train_iters": self.target_iters,
            "tokens_per_iter": self.tokens_per_iter,
            "tokens": self.target_iters * self.tokens_per_iter,
            "blend": [dataclasses.asdict(b) for b in self.blend],
            "flags": self.base_argv(),
            "first_start": self.start_args(resume=False),
            "resume": self.start_args(resume=True),
            "config": self.config.to_dict(),
        }


# ---------------------------------------------------------------------------------------------
# The one Config builder for experiment runs
# ---------------------------------------------------------------------------------------------

def build_run_config(exp: Experiment, opts: StageOptions, blend: list[BlendEntry], save: Path, budget: Budget,
                     where: str, model: dict[str, Any] | None = None,
                     default_iters: Callable[[], int] | None = None) -> Config:
    """A run's Config: the experiment's model (+ ``model`` overrides), data and tokenizer, the
    stage's options, ``--save``, and ``train_iters`` from the budget (tokens -> iterations at
    this batch size; without a budget ``default_iters()``)."""
    data = dict(exp.data_options)
    data.update(data_path=blend_to_data_path(blend), eval_domains={k: [v] for k, v in exp.eval_domains.items()},
                tokenizer_type=exp.tokenizer_type, tokenizer_model=exp.tokenizer_model)
    sections = {s: dict(v) for s, v in opts.sections.items()}
    sections["train"]["train_iters"] = budget.train_iters or 1
    sections["checkpoint"]["save"] = str(save)
    world = opts.launch.world_size
    try:
        cfg = Config.from_dict({"model": {**exp.model, **(model or {})}, "data": data, **sections})
        cfg.validate_layout(world)  # fills global_batch_size = micro * DP when unset
    except (TypeError, ValueError) as exc:
        raise ExperimentError(f"{where}: with {world} processes ({opts.launch.nodes} node(s) x "
                              f"{opts.launch.nproc_per_node}): {exc}") from None
    if budget.tokens is not None:
        cfg.train.train_iters = max(1, math.ceil(budget.tokens / (cfg.train.global_batch_size * cfg.model.seq_length)))
    elif not budget.train_iters:
        if default_iters is None:
            raise ExperimentError(f"{where}: missing the token budget (tokens or train_iters).")
        cfg.train.train_iters = default_iters()
    return cfg


def num_btx_experts(exp: Experiment) -> int:
    m = exp.merge
    n = len(exp.domains) + (1 if m.with_seed_expert else 0)
    return n * (m.split_experts or 2) if m.method == "split" else n


def mix_topk(exp: Experiment) -> int:
    return int(exp.mix.model.get("moe_router_topk", 2))


def router_variant_dir(exp: Experiment, router_type: str) -> Path:
    return exp.mix_dir.with_name(f"{exp.mix_dir.name}_{router_type}")


def upcycling_spec(exp: Experiment, seed_checkpoint: str) -> dict[str, Any]:
    """The merge options (``MergeOptions``, without the output) that make the upcycled MoE: the
    seed's FFN copied into every expert, a new random router."""
    return {"branches": [], "upcycle_from": seed_checkpoint, "num_experts": upcycling_num_experts(exp),
            "method": "upcycle", "upcycle_noise": exp.baselines.upcycling.noise or 0.0, "router_init": "random",
            "router_seed": exp.merge.router_seed, "topk": mix_topk(exp)}


def upcycled_dir(exp: Experiment, seed_checkpoint: str) -> Path:
    """The upcycled MoE before its mix phase (outside the run directory, which a changed run is
    moved away with). With ``shared_runs_dir``: content-addressed there like the seed and branch
    runs (named by a hash of :func:`upcycling_spec`), so configurations that differ only in the
    BTX merge share it, and the upcycling run that starts from it."""
    if not exp.shared_runs_dir:
        return Path(exp.output_dir) / "baselines" / "upcycled"
    return Path(exp.shared_runs_dir) / f"upcycled-{_content_key(upcycling_spec(exp, seed_checkpoint))}"


def upcycling_num_experts(exp: Experiment) -> int:
    return exp.baselines.upcycling.num_experts or num_btx_experts(exp)


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------

def plan_runs(exp: Experiment, router_variants: list[str] | tuple[str, ...] = (),
              dense_flops: float | None = None) -> dict[str, RunPlan]:
    """Every training run of the experiment, by name: [seed], each domain, the dense baseline,
    ``mix`` (and ``mix:<router>`` per router variant), ``upcycling``.

    The dense baseline sees the mix phase's data; its budget is ``baselines.dense`` when given,
    else ``dense_flops`` training FLOPs (the pipeline passes those of branches + mix: compute
    matched), else as many tokens as the branches and the mix phase together."""
    plans: dict[str, RunPlan] = {}
    seed_ckpt = str(exp.seed_checkpoint)
    if exp.seed.trained_here:
        cfg = build_run_config(exp, exp.seed.options, exp.seed.data, exp.checkpoint_dir(SEED_NAME),
                               exp.seed.budget, "seed")
        plans[SEED_NAME] = _placed(exp, RunPlan(SEED_NAME, "seed", exp.run_dir(SEED_NAME), cfg,
                                                exp.seed.options.launch, None, exp.seed.data))
        seed_ckpt = str(plans[SEED_NAME].save_dir)
    for d in exp.domains:
        cfg = build_run_config(exp, d.options, d.data, exp.checkpoint_dir(d.name), d.budget, f"domains ({d.name})")
        plans[d.name] = _placed(exp, RunPlan(d.name, "branch", exp.run_dir(d.name), cfg, d.options.launch,
                                             seed_ckpt, d.data))
    longest_branch = max(plans[d.name].target_iters for d in exp.domains)
    plans.update(_mix_plans(exp, router_variants, lambda: longest_branch, seed_ckpt))
    if exp.baselines.dense.enabled:
        plans[DENSE_NAME] = _dense_plan(exp, plans, seed_ckpt, dense_flops)
    return plans


def _mix_plans(exp: Experiment, router_variants, default_iters, seed_ckpt: str) -> dict[str, RunPlan]:
    mix = exp.mix
    blend = exp.mix_blend()
    n = num_btx_experts(exp)
    out: dict[str, RunPlan] = {}

    def plan(name: str, kind: str, run_dir: Path, init: Path, num_experts: int, router: dict) -> RunPlan:
        model = {**mix.model, **router, "num_experts": num_experts}
        cfg = build_run_config(exp, mix.options, blend, run_dir / "checkpoints", mix.budget, name, model, default_iters)
        return RunPlan(name, kind, run_dir, cfg, mix.options.launch, str(init), blend)

    out[MIX_NAME] = plan(MIX_NAME, "mix", exp.mix_dir, exp.merged_dir, n, {})
    for rt in router_variants:
        if rt == mix.model.get("moe_router_type", "topk"):
            continue
        router = {"moe_router_type": rt, **ROUTER_VARIANT_OVERRIDES.get(rt, {})}
        out[f"{MIX_NAME}:{rt}"] = plan(f"{MIX_NAME}:{rt}", "mix", router_variant_dir(exp, rt), exp.merged_dir, n, router)
    if exp.baselines.upcycling.enabled:
        out[UPCYCLING_NAME] = _placed(exp, plan(UPCYCLING_NAME, "upcycling", Path(exp.output_dir) / "baselines" / "upcycling",
                                                upcycled_dir(exp, seed_ckpt), upcycling_num_experts(exp), {}))
    return out


def _dense_plan(exp: Experiment, plans: dict[str, RunPlan], seed_ckpt: str, flops: float | None) -> RunPlan:
    dense = exp.baselines.dense
    blend = dense.data if dense.data is not None else exp.mix_blend()
    budget = dense.budget
    opts = dense.options
    if not budget.given and flops is None:
        tokens = sum(plans[d.name].target_iters * plans[d.name].tokens_per_iter for d in exp.domains)
        tokens += plans[MIX_NAME].target_iters * plans[MIX_NAME].tokens_per_iter
        budget = dataclasses.replace(budget, tokens=float(tokens))
    cfg = build_run_config(exp, opts, blend, exp.checkpoint_dir(DENSE_NAME), budget, "baselines.dense",
                           default_iters=lambda: 1)
    if not dense.budget.given and flops is not None:
        model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or resolved_vocab_size(exp))
        per_iter = flops_per_token(model, model.seq_length) * cfg.train.global_batch_size * model.seq_length
        cfg.train.train_iters = max(1, round(flops / per_iter))
    return _placed(exp, RunPlan(DENSE_NAME, "dense", exp.run_dir(DENSE_NAME), cfg, opts.launch, seed_ckpt, blend))


def _placed(exp: Experiment, plan: RunPlan) -> RunPlan:
    """With ``shared_runs_dir``: the plan moved to its content-addressed directory, named by a
    hash of everything that determines the run (the configuration without ``--save``, the
    starting checkpoint, the layout)."""
    if not exp.shared_runs_dir:
        return plan
    config = plan.config.to_dict()
    config["checkpoint"]["save"] = None
    key = _content_key([config, plan.init_checkpoint, dataclasses.asdict(plan.launch)])
    plan.run_dir = Path(exp.shared_runs_dir) / f"{plan.name}-{key}"
    plan.config.checkpoint.save = str(plan.save_dir)
    return plan


def _content_key(value: Any) -> str:
    """The name suffix of a content-addressed run or model: a hash of what determines it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def select(plans: dict[str, RunPlan], only: list[str] | None, default: Callable[[RunPlan], bool]) -> list[RunPlan]:
    if not only:
        return [p for p in plans.values() if default(p)]
    unknown = [n for n in only if n not in plans]
    if unknown:
        raise ExperimentError(f"--only {', '.join(unknown)}: no such run; runs are {', '.join(plans)}.")
    return [plans[n] for n in only]


# ---------------------------------------------------------------------------------------------
# Input checks (before anything starts)
# ---------------------------------------------------------------------------------------------

def resolved_vocab_size(exp: Experiment) -> int | None:
    if exp.model.get("vocab_size") is not None:
        return exp.model["vocab_size"]
    if exp.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer") and exp.tokenizer_model \
            and os.path.exists(exp.tokenizer_model):
        return build_tokenizer(exp.tokenizer_type, exp.tokenizer_model, None).vocab_size
    return None


def check_inputs(exp: Experiment, runs: list[RunPlan]) -> list[str]:
    """Problems that would make a run fail at start-up: missing data, tokenizer or seed, a seed
    of another shape. Returns the messages (empty when all is well)."""
    problems: list[str] = []
    if exp.tokenizer_model and not os.path.exists(exp.tokenizer_model):
        problems.append(f"tokenizer.model {exp.tokenizer_model} does not exist.")
    seen: set[str] = set()
    for run in runs:
        prefixes = [(e.prefix, f"{run.name}: data") for e in run.blend]
        prefixes += [(p, f"evaluation domain {n}") for n, p in exp.eval_domains.items()]
        for prefix, what in prefixes:
            if prefix in seen:
                continue
            seen.add(prefix)
            missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
            if missing:
                problems.append(f"{what} prefix {prefix} does not exist (missing {' and '.join(prefix + s for s in missing)}); "
                                "build it with tools/preprocess_data.py or tools/build_corpora.py.")
    dense_runs = [r for r in runs if r.init_checkpoint and not r.config.model.is_moe]
    if dense_runs:
        problems += check_seed(exp, dense_runs)
    for run in runs:
        if run.config.model.is_moe and fmt.read_tracker(run.save_dir) is None:
            try:
                fmt.resolve(run.init_checkpoint, f"{run.name}: the merged model")
            except fmt.CheckpointError as exc:
                problems.append(f"{exc} Merge first: python tools/merge_branches.py ... --output {run.init_checkpoint} "
                                "(or run tools/run_experiment.py, which merges).")
    return problems


def check_seed(exp: Experiment, runs: list[RunPlan]) -> list[str]:
    seed = runs[0].init_checkpoint
    starting = [r for r in runs if r.init_checkpoint and fmt.read_tracker(r.save_dir) is None]
    if not starting:
        return []  # every run resumes from its own checkpoints
    try:
        ckpt_dir, _ = fmt.resolve(seed, "seed checkpoint")
        manifest = fmt.read_manifest(ckpt_dir)
    except fmt.CheckpointError as exc:
        hint = ""
        if exp.seed.trained_here:
            hint = (f" The experiment pretrains its seed: run `python tools/launch_branches.py {exp.source} "
                    "--local --only seed` first.")
        return [f"{exc}{hint}"]
    problems = []
    if manifest.get("kind", "dense") != "dense" or manifest.get("model", {}).get("num_experts"):
        problems.append(f"seed checkpoint {ckpt_dir} is an MoE checkpoint; branches start from a dense model.")
    declared = runs[0].config.model
    saved = manifest.get("model", {})
    want = dataclasses.replace(declared, vocab_size=declared.vocab_size or resolved_vocab_size(exp)).architecture()
    diffs = [f"{k}: seed {saved[k]!r} vs experiment {v!r}" for k, v in want.items()
             if k in saved and v is not None and saved[k] != v]
    if diffs:
        problems.append(f"seed checkpoint {ckpt_dir} does not match the experiment's model section ("
                        + "; ".join(diffs) + "). Fix model: in the experiment file or point seed.checkpoint elsewhere.")
    return problems
