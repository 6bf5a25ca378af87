"""The BTX experiment file: one YAML document that describes a whole Branch-Train-MiX run.

Every stage (seed pretraining, the domain branches, the merge, the mix phase, the baselines and
the evaluation) reads this file, so a run is reproducible from it alone. Sections that configure
training use the trainer's own option names (the fields of :mod:`btx_megatron.config.schema`,
i.e. Megatron-LM flags with ``_`` for ``-``), so ``train: {lr: 1e-4, lr_warmup_iters: 100}``
means ``--lr 1e-4 --lr-warmup-iters 100``.

```yaml
name: tiny-btx
output_dir: ${BTX_RUN_DIR:-runs/tiny}   # OUT; every stage writes below it
tokenizer: {type: SentencePieceTokenizer, model: DATA/tokenizer/tokenizer.model}
model: {num_layers: 4, hidden_size: 128, ...}          # ModelConfig fields (dense seed shape)
seed:                                                  # either an existing checkpoint ...
  checkpoint: /ckpt/llama2-7b
# seed: {data: [...], train_iters: 300, train: {...}}  # ... or pretrained by the pipeline
branch_defaults:                                        # shared by every branch
  launch: {nodes: 1, nproc_per_node: 8}
  parallel: {...}  precision: {...}  train: {...}  checkpoint: {...}  logging: {...}
domains:
  - name: math
    data: [{prefix: DATA/math_train, weight: 1.0}]      # or "PREFIX", or Megatron tokens
    eval_data: DATA/math_valid
    tokens: 2.0e8                                       # or train_iters: 48000
    train: {lr: 1e-4}                                   # overrides of branch_defaults
merge: {with_seed_expert: true, router_init: random}
mix: {model: {moe_router_topk: 2}, data: {math: 0.3016, code: 0.4031, wiki: 0.1030, seed: 0.1923}}
baselines: {dense: {enabled: true}, upcycling: {enabled: true}, btm: {enabled: true, top_k: 2}}
evaluation: {eval_iters: 8}
slurm: {account: ..., partition: ..., time: "48:00:00"}
```

This module holds the file's typed form (the dataclasses below); reading and validating it,
``${VAR}`` expansion and ``--set`` overrides are in :mod:`btx_megatron.config.experiment_file`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Config sections a stage may override; ``model`` and ``data`` are owned by the experiment.
STAGE_SECTIONS = ("parallel", "precision", "train", "checkpoint", "logging")
SEED_NAME = "seed"
DENSE_NAME = "dense"
RESERVED_NAMES = (SEED_NAME, DENSE_NAME, "mix", "merged", "upcycling", "btm")
class ExperimentError(ValueError):
    """A mistake in the experiment file (the message names the file and the key)."""


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

@dataclass
class BlendEntry:
    prefix: str
    weight: float = 1.0


def blend_to_data_path(entries: list[BlendEntry]) -> list[str]:
    """Megatron ``--data-path`` tokens for a blend (one prefix: no weight)."""
    if len(entries) == 1:
        return [entries[0].prefix]
    return [tok for e in entries for tok in (repr(float(e.weight)), e.prefix)]


@dataclass
class Launch:
    """How many processes one run uses: ``nodes * nproc_per_node`` (GPUs, or CPU processes)."""

    nodes: int = 1
    nproc_per_node: int = 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


@dataclass
class StageOptions:
    """Per-stage launch layout and trainer options (parallel/precision/train/checkpoint/logging)."""

    launch: Launch = field(default_factory=Launch)
    sections: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in STAGE_SECTIONS})



BUDGET_KEYS = ("train_iters", "tokens")
STAGE_KEYS = ("launch", *STAGE_SECTIONS)


@dataclass
class Budget:
    train_iters: int | None = None
    tokens: float | None = None

    @property
    def given(self) -> bool:
        return self.train_iters is not None or self.tokens is not None


@dataclass
class Domain:
    name: str
    data: list[BlendEntry]
    eval_data: str
    budget: Budget
    options: StageOptions
    output_dir: str | None = None  # default OUT/branches/NAME

    KEYS = ("name", "data", "eval_data", "output_dir", *BUDGET_KEYS, *STAGE_KEYS)


@dataclass
class SeedSpec:
    """Either an existing dense ``checkpoint`` or a pretraining run (data + budget) to make one."""

    checkpoint: str | None
    data: list[BlendEntry] | None
    budget: Budget
    options: StageOptions
    KEYS = ("checkpoint", "data", *BUDGET_KEYS, *STAGE_KEYS)

    @property
    def trained_here(self) -> bool:
        return self.checkpoint is None


@dataclass
class MergeSpec:
    """Options of ``tools/merge_branches.py`` (read by the pipeline)."""

    with_seed_expert: bool = True
    router_init: str = "random"            # random | centroid
    router_seed: int = 1234
    weights: dict[str, float] | None = None  # averaging weights of the non-expert weights
    method: str = "btx"                    # btx | split | blend
    split_experts: int | None = None
    output_dir: str | None = None          # default OUT/merged

    KEYS = ("with_seed_expert", "router_init", "router_seed", "weights", "method", "split_experts", "output_dir")


@dataclass
class MixSpec:
    """The MoE finetuning stage: model overrides (router), layout, budget and the data mix."""

    model: dict[str, Any]
    options: StageOptions
    budget: Budget
    data: dict[str, float]                 # domain name or "seed" -> weight
    output_dir: str | None = None          # default OUT/mix

    KEYS = ("model", "data", "output_dir", *BUDGET_KEYS, *STAGE_KEYS)


@dataclass
class DenseBaselineSpec:
    enabled: bool = True
    budget: Budget = field(default_factory=Budget)  # default: the sum of the branch budgets
    data: list[BlendEntry] | None = None             # default: every domain, weighted by budget
    options: StageOptions | None = None
    match: str = "compute"
    """Without an explicit budget: ``compute`` trains as many FLOPs as the branches and the mix
    phase together (the pipeline reads them from those runs); ``data`` as many tokens (the paper's
    data-matched dense baseline; fewer steps, since a top-k MoE token costs more than a dense one)."""

    KEYS = ("enabled", "data", "match", *BUDGET_KEYS, *STAGE_KEYS)


@dataclass
class UpcyclingBaselineSpec:
    """Sparse upcycling: the seed's FFN copied into every expert, a new router, the mix phase."""

    enabled: bool = True
    num_experts: int | None = None        # default: as many experts as the BTX model
    noise: float | None = None            # relative noise added to each copy (breaks symmetry)

    KEYS = ("enabled", "num_experts", "noise")


@dataclass
class BTMBaselineSpec:
    """Branch-Train-Merge: the branches kept apart, ensembled by tf-idf similarity."""

    enabled: bool = True
    top_k: int = 2

    KEYS = ("enabled", "top_k")


@dataclass
class BaselinesSpec:
    dense: DenseBaselineSpec = field(default_factory=DenseBaselineSpec)
    upcycling: UpcyclingBaselineSpec = field(default_factory=UpcyclingBaselineSpec)
    btm: BTMBaselineSpec = field(default_factory=BTMBaselineSpec)


@dataclass
class CorporaSpec:
    """Options of the built-in corpora (``btx_megatron.data.corpora``), used when the
    experiment's data lives in a corpora directory that the pipeline builds itself."""

    tokens_per_domain: int = 2_000_000
    vocab_size: int = 8000
    seed: int = 1234

    KEYS = ("tokens_per_domain", "vocab_size", "seed")


@dataclass
class EvaluationSpec:
    eval_iters: int = 8
    domains: dict[str, str] = field(default_factory=dict)  # default: each domain's eval_data
    tasks: bool = True
    """Downstream accuracy on the built-in tasks (built-in corpora only): every model, per domain."""
    task_items: int = 40
    """Items per built-in task."""

    KEYS = ("eval_iters", "domains", "tasks", "task_items")


@dataclass
class SlurmSpec:
    """``#SBATCH`` values for ``--slurm`` submissions (per-run node counts come from ``launch``)."""

    account: str | None = None
    partition: str | None = None
    time: str = "48:00:00"
    qos: str | None = None
    gpus_per_node: int = 8
    cpus_per_task: int | None = None
    signal_grace_s: int = 300
    extra_sbatch: list[str] = field(default_factory=list)  # further #SBATCH lines, e.g. "--exclusive"
    env: dict[str, str] = field(default_factory=dict)      # exported before srun
    setup: list[str] = field(default_factory=list)         # shell lines, e.g. "module load cuda"

    KEYS = ("account", "partition", "time", "qos", "gpus_per_node", "cpus_per_task", "signal_grace_s",
            "extra_sbatch", "env", "setup")


@dataclass
class Experiment:
    name: str
    output_dir: str
    source: str                            # the experiment file
    tokenizer_type: str | None
    tokenizer_model: str | None
    model: dict[str, Any]                  # ModelConfig field overrides (dense seed shape)
    data_options: dict[str, Any]           # DataConfig options shared by all stages (split, cache)
    seed: SeedSpec
    branch_defaults: StageOptions
    domains: list[Domain]
    merge: MergeSpec
    mix: MixSpec
    baselines: BaselinesSpec
    evaluation: EvaluationSpec
    slurm: SlurmSpec
    raw: dict[str, Any]                    # the parsed YAML (for provenance)
    corpora: CorporaSpec = dataclasses.field(default_factory=CorporaSpec)
    shared_runs_dir: str | None = None
    """Content-addressed home of the seed, branch, dense and upcycling runs (and the upcycled
    model): a run lives in
    ``shared_runs_dir/NAME-<hash of its configuration and starting point>``, so experiments
    (sweep configurations) that agree on a run train it once."""

    KEYS = ("name", "output_dir", "shared_runs_dir", "tokenizer", "corpora", "model", "data", "seed", "branch_defaults", "domains",
            "merge", "mix", "baselines", "evaluation", "slurm")

    # ----------------------------------------------------------------- derived paths
    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise ExperimentError(f"{self.source}: no domain named {name!r} (domains: {', '.join(self.domain_names)}).")

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def run_dir(self, name: str) -> Path:
        """Directory of a dense run (seed, a branch, or the dense baseline)."""
        if name == SEED_NAME:
            return Path(self.output_dir) / "seed"
        if name == DENSE_NAME:
            return Path(self.output_dir) / "baselines" / "dense"
        d = self.domain(name)
        return Path(d.output_dir) if d.output_dir else Path(self.output_dir) / "branches" / name

    def checkpoint_dir(self, name: str) -> Path:
        return self.run_dir(name) / "checkpoints"

    @property
    def seed_checkpoint(self) -> Path:
        return Path(self.seed.checkpoint) if self.seed.checkpoint else self.checkpoint_dir(SEED_NAME)

    @property
    def merged_dir(self) -> Path:
        return Path(self.merge.output_dir or Path(self.output_dir) / "merged")

    @property
    def mix_dir(self) -> Path:
        return Path(self.mix.output_dir or Path(self.output_dir) / "mix")

    @property
    def eval_domains(self) -> dict[str, str]:
        return dict(self.evaluation.domains) or {d.name: d.eval_data for d in self.domains}

    def mix_blend(self) -> list[BlendEntry]:
        """The mix-phase data: each named domain's blend scaled to its weight ("seed": the seed's data)."""
        out = []
        for name, weight in self.mix.data.items():
            entries = self.seed.data if name == SEED_NAME else self.domain(name).data
            total = sum(e.weight for e in entries)
            out += [BlendEntry(e.prefix, weight * e.weight / total) for e in entries]
        return out
