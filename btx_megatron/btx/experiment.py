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

Paths may use ``${VAR}`` and ``${VAR:-default}``; relative paths are relative to the directory
the tools are started from (as with Megatron-LM scripts) and are stored absolute in every
resolved config. Unknown keys are errors that name the key's full path
(``domains[1].train.lrr``), because a silently ignored typo wastes a cluster allocation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config.schema import SECTIONS

# Config sections a stage may override; ``model`` and ``data`` are owned by the experiment.
STAGE_SECTIONS = ("parallel", "precision", "train", "checkpoint", "logging")
SEED_NAME = "seed"
DENSE_NAME = "dense"
RESERVED_NAMES = (SEED_NAME, DENSE_NAME, "mix", "merged", "upcycling", "btm")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Options the launcher sets itself; a stage section may not set them.
_LAUNCHER_OWNED = {
    "checkpoint": ("save", "load", "finetune", "overwrite_save"),
    "data": ("data_path", "eval_domains", "tokenizer_type", "tokenizer_model", "mock_data"),
}


class ExperimentError(ValueError):
    """A mistake in the experiment file (the message names the file and the key)."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def expand_vars(text: str, where: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` -> environment value; an unset ``${VAR}`` is an error."""

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise ExperimentError(f"{where}: environment variable ${{{name}}} is not set (or use ${{{name}:-default}}).")

    return _VAR_RE.sub(sub, text)


def _path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ExperimentError(f"{where}: expected a path string, got {value!r}.")
    return os.path.abspath(os.path.expanduser(expand_vars(value, where)))


def _check_keys(data: Any, allowed: set[str] | tuple[str, ...], where: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExperimentError(f"{where}: expected a mapping, got {type(data).__name__}.")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ExperimentError(
            f"{where}: unknown key(s) {', '.join(f'{where}.{k}' if where else str(k) for k in unknown)}; "
            f"allowed: {', '.join(sorted(allowed))}."
        )
    return dict(data)


def _section_fields(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(SECTIONS[section])}


def _overrides(data: Any, section: str, where: str) -> dict[str, Any]:
    """A mapping of ``section`` field names (``num_layers`` or ``num-layers``) -> values."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExperimentError(f"{where}: expected a mapping of {section} options, got {type(data).__name__}.")
    known = _section_fields(section)
    owned = _LAUNCHER_OWNED.get(section, ())
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = [k for k in known if k.startswith(name[:4])][:5]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ExperimentError(f"{where}: unknown {section} option {where}.{key}{hint}")
        if name in owned:
            raise ExperimentError(
                f"{where}.{key}: set by the launcher from the experiment (seed, output_dir, domains); remove it."
            )
        out[name] = value
    return out


def _positive_int(value: Any, where: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ExperimentError(f"{where}: expected a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}.")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ExperimentError(f"{where}: expected a number, got {value!r}.")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

@dataclass
class BlendEntry:
    prefix: str
    weight: float = 1.0


def parse_blend_spec(value: Any, where: str) -> list[BlendEntry]:
    """``"PREFIX"`` | ``[W1, PREFIX1, W2, PREFIX2]`` | ``[PREFIX, ...]`` | ``[{prefix, weight}, ...]``."""
    if isinstance(value, str):
        return [BlendEntry(_path(value, where))]
    if not isinstance(value, list) or not value:
        raise ExperimentError(f"{where}: expected a data prefix or a non-empty list (blend), got {value!r}.")
    if all(isinstance(v, dict) for v in value):
        out = []
        for i, item in enumerate(value):
            item = _check_keys(item, ("prefix", "weight"), f"{where}[{i}]")
            if "prefix" not in item:
                raise ExperimentError(f"{where}[{i}]: missing 'prefix'.")
            out.append(BlendEntry(_path(item["prefix"], f"{where}[{i}].prefix"),
                                  _number(item.get("weight", 1.0), f"{where}[{i}].weight")))
        return _checked_weights(out, where)
    if all(isinstance(v, str) for v in value):
        return [BlendEntry(_path(v, f"{where}[{i}]")) for i, v in enumerate(value)]
    # Megatron-LM tokens: weight, prefix, weight, prefix ...
    if len(value) % 2:
        raise ExperimentError(f"{where}: a Megatron blend is W1 PREFIX1 W2 PREFIX2 ...; got {len(value)} items.")
    out = [BlendEntry(_path(value[i + 1], f"{where}[{i + 1}]"), _number(value[i], f"{where}[{i}]"))
           for i in range(0, len(value), 2)]
    return _checked_weights(out, where)


def _checked_weights(entries: list[BlendEntry], where: str) -> list[BlendEntry]:
    for e in entries:
        if not (e.weight > 0 and math.isfinite(e.weight)):
            raise ExperimentError(f"{where}: blend weight {e.weight} for {e.prefix} must be positive.")
    return entries


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

    @classmethod
    def parse(cls, data: Any, where: str, base: "Launch | None" = None) -> "Launch":
        data = _check_keys(data, ("nodes", "nproc_per_node"), where)
        base = base or cls()
        return cls(
            nodes=_positive_int(data.get("nodes", base.nodes), f"{where}.nodes"),
            nproc_per_node=_positive_int(data.get("nproc_per_node", base.nproc_per_node), f"{where}.nproc_per_node"),
        )

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


@dataclass
class StageOptions:
    """Per-stage launch layout and trainer options (parallel/precision/train/checkpoint/logging)."""

    launch: Launch = field(default_factory=Launch)
    sections: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in STAGE_SECTIONS})

    @classmethod
    def parse(cls, data: dict, where: str, base: "StageOptions | None" = None) -> "StageOptions":
        """Reads the ``launch`` and section keys of ``data``; values override ``base``."""
        base = base or cls()
        sections = copy.deepcopy(base.sections)
        for s in STAGE_SECTIONS:
            sections[s].update(_overrides(data.get(s), s, f"{where}.{s}" if where else s))
        return cls(Launch.parse(data.get("launch"), f"{where}.launch" if where else "launch", base.launch), sections)


_BUDGET_KEYS = ("train_iters", "tokens")
_STAGE_KEYS = ("launch", *STAGE_SECTIONS)


@dataclass
class Budget:
    train_iters: int | None = None
    tokens: float | None = None

    @classmethod
    def parse(cls, data: dict, where: str, required: bool) -> "Budget":
        iters, tokens = data.get("train_iters"), data.get("tokens")
        if iters is not None and tokens is not None:
            raise ExperimentError(f"{where}: give train_iters or tokens, not both.")
        if iters is None and tokens is None:
            if required:
                raise ExperimentError(f"{where}: missing the token budget: set {where}.tokens or {where}.train_iters.")
            return cls()
        if iters is not None:
            return cls(train_iters=_positive_int(iters, f"{where}.train_iters"))
        value = _number(tokens, f"{where}.tokens")
        if value <= 0:
            raise ExperimentError(f"{where}.tokens must be positive, got {tokens!r}.")
        return cls(tokens=value)

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

    KEYS = ("name", "data", "eval_data", "output_dir", *_BUDGET_KEYS, *_STAGE_KEYS)


@dataclass
class SeedSpec:
    """Either an existing dense ``checkpoint`` or a pretraining run (data + budget) to make one."""

    checkpoint: str | None
    data: list[BlendEntry] | None
    budget: Budget
    options: StageOptions
    KEYS = ("checkpoint", "data", *_BUDGET_KEYS, *_STAGE_KEYS)

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

    KEYS = ("model", "data", "output_dir", *_BUDGET_KEYS, *_STAGE_KEYS)


@dataclass
class DenseBaselineSpec:
    enabled: bool = True
    budget: Budget = field(default_factory=Budget)  # default: the sum of the branch budgets
    data: list[BlendEntry] | None = None             # default: every domain, weighted by budget
    options: StageOptions | None = None

    KEYS = ("enabled", "data", *_BUDGET_KEYS, *_STAGE_KEYS)


@dataclass
class BaselinesSpec:
    dense: DenseBaselineSpec = field(default_factory=DenseBaselineSpec)
    upcycling: dict[str, Any] = field(default_factory=lambda: {"enabled": True, "num_experts": None})
    btm: dict[str, Any] = field(default_factory=lambda: {"enabled": True, "top_k": 2})


@dataclass
class EvaluationSpec:
    eval_iters: int = 8
    domains: dict[str, str] = field(default_factory=dict)  # default: each domain's eval_data

    KEYS = ("eval_iters", "domains")


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
    corpora: dict[str, int] = dataclasses.field(default_factory=dict)  # tools/build_corpora.py options

    CORPORA_KEYS = ("tokens_per_domain", "vocab_size", "seed")

    KEYS = ("name", "output_dir", "tokenizer", "corpora", "model", "data", "seed", "branch_defaults", "domains",
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


def _parse_domain(item: Any, index: int, defaults: StageOptions) -> Domain:
    where = f"domains[{index}]"
    data = _check_keys(item, Domain.KEYS, where)
    for key in ("name", "data", "eval_data"):
        if key not in data:
            label = f" ({data['name']})" if "name" in data else ""
            raise ExperimentError(f"{where}{label}: missing required field '{key}'.")
    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ExperimentError(f"{where}.name: {name!r} is not a valid name (letters, digits, _ . -).")
    if name in RESERVED_NAMES:
        raise ExperimentError(f"{where}.name: {name!r} is reserved for another stage; rename the domain.")
    where = f"domains[{index}] ({name})"
    return Domain(
        name=name,
        data=parse_blend_spec(data["data"], f"{where}.data"),
        eval_data=_path(data["eval_data"], f"{where}.eval_data"),
        budget=Budget.parse(data, where, required=True),
        options=StageOptions.parse(data, where, defaults),
        output_dir=_path(data["output_dir"], f"{where}.output_dir") if data.get("output_dir") else None,
    )


def _parse_seed(data: Any, defaults: StageOptions) -> SeedSpec:
    if data is None:
        raise ExperimentError("missing 'seed': give seed.checkpoint (an existing dense checkpoint) or "
                              "seed.data + seed.train_iters/tokens (pretrain one).")
    if isinstance(data, str):
        data = {"checkpoint": data}
    data = _check_keys(data, SeedSpec.KEYS, "seed")
    checkpoint = data.get("checkpoint")
    if checkpoint is not None:
        # seed.data may name the seed's own pretraining data (the mix phase's "seed" share).
        extra = [k for k in data if k not in ("checkpoint", "data")]
        if extra:
            raise ExperimentError(f"seed: with seed.checkpoint the seed is not trained here; remove seed.{extra[0]}.")
        seed_data = parse_blend_spec(data["data"], "seed.data") if data.get("data") is not None else None
        return SeedSpec(_path(checkpoint, "seed.checkpoint"), seed_data, Budget(), defaults)
    if "data" not in data:
        raise ExperimentError("seed: give seed.checkpoint, or seed.data and a budget to pretrain the seed.")
    return SeedSpec(None, parse_blend_spec(data["data"], "seed.data"), Budget.parse(data, "seed", required=True),
                    StageOptions.parse(data, "seed", defaults))


def _parse_mix(data: Any, exp_domains: list[str], has_seed_data: bool, defaults: StageOptions) -> MixSpec:
    data = _check_keys(data, MixSpec.KEYS, "mix")
    model = _check_keys_model(data.get("model"), "mix.model")
    weights_raw = data.get("data")
    if weights_raw is None:
        weights = {n: 1.0 for n in exp_domains}
        if has_seed_data:
            weights[SEED_NAME] = 1.0
    else:
        weights_raw = _check_keys(weights_raw, (*exp_domains, SEED_NAME), "mix.data")
        weights = {k: _number(v, f"mix.data.{k}") for k, v in weights_raw.items()}
        if SEED_NAME in weights and not has_seed_data:
            raise ExperimentError("mix.data.seed: the seed's data is unknown (seed.checkpoint given); "
                                  "add its prefixes as a domain-like entry or drop mix.data.seed.")
        for k, v in weights.items():
            if v <= 0:
                raise ExperimentError(f"mix.data.{k}: weight must be positive, got {v}.")
    return MixSpec(model, StageOptions.parse(data, "mix", defaults), Budget.parse(data, "mix", required=False),
                   weights, _path(data["output_dir"], "mix.output_dir") if data.get("output_dir") else None)


def _check_keys_model(data: Any, where: str) -> dict[str, Any]:
    return _overrides(data, "model", where)


def _parse_merge(data: Any, domains: list[str], seed_expert_default: bool) -> MergeSpec:
    data = _check_keys(data, MergeSpec.KEYS, "merge")
    spec = MergeSpec(with_seed_expert=seed_expert_default)
    if "with_seed_expert" in data:
        if not isinstance(data["with_seed_expert"], bool):
            raise ExperimentError("merge.with_seed_expert: expected true or false.")
        spec.with_seed_expert = data["with_seed_expert"]
    if "router_init" in data:
        if data["router_init"] not in ("random", "centroid"):
            raise ExperimentError(f"merge.router_init: {data['router_init']!r} is not one of random, centroid.")
        spec.router_init = data["router_init"]
    if "router_seed" in data:
        spec.router_seed = _positive_int(data["router_seed"], "merge.router_seed", allow_zero=True)
    if "method" in data:
        if data["method"] not in ("btx", "split", "blend"):
            raise ExperimentError(f"merge.method: {data['method']!r} is not one of btx, split, blend.")
        spec.method = data["method"]
    if "split_experts" in data and data["split_experts"] is not None:
        spec.split_experts = _positive_int(data["split_experts"], "merge.split_experts")
        if spec.method != "split":
            raise ExperimentError("merge.split_experts needs merge.method: split.")
    if data.get("weights") is not None:
        allowed = (*domains, SEED_NAME)
        w = _check_keys(data["weights"], allowed, "merge.weights")
        spec.weights = {k: _number(v, f"merge.weights.{k}") for k, v in w.items()}
    if data.get("output_dir"):
        spec.output_dir = _path(data["output_dir"], "merge.output_dir")
    return spec


def _parse_baselines(data: Any, defaults: StageOptions) -> BaselinesSpec:
    data = _check_keys(data, ("dense", "upcycling", "btm"), "baselines")
    spec = BaselinesSpec()
    dense = _check_keys(data.get("dense"), DenseBaselineSpec.KEYS, "baselines.dense")
    spec.dense = DenseBaselineSpec(
        enabled=bool(dense.get("enabled", True)),
        budget=Budget.parse(dense, "baselines.dense", required=False),
        data=parse_blend_spec(dense["data"], "baselines.dense.data") if dense.get("data") is not None else None,
        options=StageOptions.parse(dense, "baselines.dense", defaults),
    )
    up = _check_keys(data.get("upcycling"), ("enabled", "num_experts", "noise"), "baselines.upcycling")
    spec.upcycling.update(up)
    if spec.upcycling.get("num_experts") is not None:
        _positive_int(spec.upcycling["num_experts"], "baselines.upcycling.num_experts")
    btm = _check_keys(data.get("btm"), ("enabled", "top_k"), "baselines.btm")
    spec.btm.update(btm)
    _positive_int(spec.btm["top_k"], "baselines.btm.top_k")
    return spec


def _parse_slurm(data: Any) -> SlurmSpec:
    data = _check_keys(data, SlurmSpec.KEYS, "slurm")
    spec = SlurmSpec(**{k: v for k, v in data.items()})
    _positive_int(spec.gpus_per_node, "slurm.gpus_per_node")
    _positive_int(spec.signal_grace_s, "slurm.signal_grace_s")
    if not isinstance(spec.extra_sbatch, list) or not isinstance(spec.setup, list) or not isinstance(spec.env, dict):
        raise ExperimentError("slurm.extra_sbatch and slurm.setup are lists of strings; slurm.env is a mapping.")
    return spec


def parse_experiment(raw: Any, source: str = "<experiment>") -> Experiment:
    """Validate a parsed YAML document (see the module docstring for the schema)."""
    try:
        return _parse(raw, source)
    except ExperimentError as exc:
        raise ExperimentError(f"{source}: {exc}") from None


def _parse(raw: Any, source: str) -> Experiment:
    data = _check_keys(raw, Experiment.KEYS, "")
    for key in ("name", "output_dir", "model", "seed", "domains"):
        if key not in data:
            raise ExperimentError(f"missing required top-level key '{key}'.")
    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ExperimentError(f"name: {name!r} is not a valid experiment name (letters, digits, _ . -).")
    tok = _check_keys(data.get("tokenizer"), ("type", "model"), "tokenizer")
    tokenizer_type = tok.get("type")
    tokenizer_model = _path(tok["model"], "tokenizer.model") if tok.get("model") else None
    if tokenizer_type is not None and tokenizer_type not in ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"):
        raise ExperimentError(f"tokenizer.type: {tokenizer_type!r} is not one of SentencePieceTokenizer, "
                              "HuggingFaceTokenizer, NullTokenizer.")
    if tokenizer_type is None:
        raise ExperimentError("tokenizer: set tokenizer.type (and tokenizer.model) for the domains' data.")
    model = _overrides(data["model"], "model", "model")
    if model.get("num_experts") is not None:
        raise ExperimentError("model.num_experts: the model section is the dense seed/branch shape; "
                              "set the MoE options under mix.model.")
    data_options = _overrides(data.get("data"), "data", "data")
    defaults = StageOptions.parse(_check_keys(data.get("branch_defaults"), _STAGE_KEYS, "branch_defaults"),
                                  "branch_defaults")
    seed = _parse_seed(data["seed"], defaults)
    if not isinstance(data["domains"], list) or not data["domains"]:
        raise ExperimentError("domains: expected a non-empty list of domains.")
    domains = [_parse_domain(item, i, defaults) for i, item in enumerate(data["domains"])]
    names = [d.name for d in domains]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExperimentError(f"domains: the name(s) {', '.join(dupes)} appear more than once.")
    merge = _parse_merge(data.get("merge"), names, seed_expert_default=True)
    mix = _parse_mix(data.get("mix"), names, seed.data is not None, defaults)
    ev = _check_keys(data.get("evaluation"), EvaluationSpec.KEYS, "evaluation")
    evaluation = EvaluationSpec(
        eval_iters=_positive_int(ev.get("eval_iters", 8), "evaluation.eval_iters"),
        domains={k: _path(v, f"evaluation.domains.{k}") for k, v in (ev.get("domains") or {}).items()},
    )
    exp = Experiment(
        name=name, output_dir=_path(data["output_dir"], "output_dir"), source=source,
        tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, model=model, data_options=data_options,
        seed=seed, branch_defaults=defaults, domains=domains, merge=merge, mix=mix,
        baselines=_parse_baselines(data.get("baselines"), defaults), evaluation=evaluation,
        slurm=_parse_slurm(data.get("slurm")), raw=raw,
        corpora={k: _positive_int(v, f"corpora.{k}")
                 for k, v in _check_keys(data.get("corpora"), Experiment.CORPORA_KEYS, "corpora").items()},
    )
    _check_distinct_outputs(exp)
    return exp


def _check_distinct_outputs(exp: Experiment) -> None:
    """Two runs writing one directory would resume each other's checkpoints: refuse early."""
    owners: dict[Path, str] = {}
    runs = [SEED_NAME] if exp.seed.trained_here else []
    runs += exp.domain_names + [DENSE_NAME]
    for name in runs:
        path = exp.run_dir(name).resolve()
        if path in owners:
            raise ExperimentError(
                f"domains: {owners[path]!r} and {name!r} both write to {path}; give each a distinct output_dir."
            )
        owners[path] = name
    for path, name in owners.items():
        for other_path, other in owners.items():
            if other != name and other_path in path.parents:
                raise ExperimentError(f"{name!r} writes to {path}, inside {other!r}'s directory {other_path}.")


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read and validate an experiment YAML file; :class:`ExperimentError` names the bad key."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"experiment file {p} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{p}: not valid YAML: {exc}") from None
    return parse_experiment(raw, str(p))
