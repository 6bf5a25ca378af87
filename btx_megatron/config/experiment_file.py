"""Reading an experiment file: YAML -> validated :class:`~btx_megatron.config.experiment.Experiment`.

Paths may use ``${VAR}`` and ``${VAR:-default}``; relative paths are relative to the directory
the tools are started from (as with Megatron-LM scripts) and are stored absolute in every
resolved config. Unknown keys are errors that name the key's full path
(``domains[1].train.lrr``), because a silently ignored typo wastes a cluster allocation.
``--set KEY.PATH=VALUE`` overrides (:func:`apply_overrides`) edit the document before it is
validated, so they are checked the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .experiment import (
    DENSE_NAME, RESERVED_NAMES, SEED_NAME, STAGE_KEYS, STAGE_SECTIONS, BaselinesSpec, BlendEntry, BTMBaselineSpec, Budget,
    CorporaSpec, DenseBaselineSpec, Domain, EvaluationSpec, Experiment, ExperimentError, Launch, MergeSpec, MixSpec,
    SeedSpec, SlurmSpec, StageOptions, UpcyclingBaselineSpec,
)
from .args import yaml_problem
from .blend import parse_blend
from .schema import SECTIONS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Options the launcher sets itself; a stage section may not set them.
_LAUNCHER_OWNED = {
    "checkpoint": ("save", "load", "finetune", "overwrite_save"),
    "data": ("data_path", "eval_domains", "tokenizer_type", "tokenizer_model", "mock_data"),
}


# ---------------------------------------------------------------------------------------------
# Values
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


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ExperimentError(f"{where}: expected true or false, got {value!r}.")
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
# Sections
# ---------------------------------------------------------------------------------------------

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
    try:
        blend = parse_blend([str(v) for v in value], flag=where)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    weights = blend.weights or [1.0] * len(blend.prefixes)
    out = [BlendEntry(_path(prefix, f"{where}[{2 * i + 1}]"), w) for i, (prefix, w) in enumerate(zip(blend.prefixes, weights))]
    return _checked_weights(out, where)


def _checked_weights(entries: list[BlendEntry], where: str) -> list[BlendEntry]:
    for e in entries:
        if not (e.weight > 0 and math.isfinite(e.weight)):
            raise ExperimentError(f"{where}: blend weight {e.weight} for {e.prefix} must be positive.")
    return entries


def parse_launch(data: Any, where: str, base: Launch | None = None) -> Launch:
    data = _check_keys(data, ("nodes", "nproc_per_node"), where)
    base = base or Launch()
    return Launch(
        nodes=_positive_int(data.get("nodes", base.nodes), f"{where}.nodes"),
        nproc_per_node=_positive_int(data.get("nproc_per_node", base.nproc_per_node), f"{where}.nproc_per_node"),
    )


def parse_stage_options(data: dict, where: str, base: StageOptions | None = None) -> StageOptions:
    """Reads the ``launch`` and section keys of ``data``; values override ``base``."""
    base = base or StageOptions()
    sections = copy.deepcopy(base.sections)
    for s in STAGE_SECTIONS:
        sections[s].update(_overrides(data.get(s), s, f"{where}.{s}" if where else s))
    return StageOptions(parse_launch(data.get("launch"), f"{where}.launch" if where else "launch", base.launch), sections)


def parse_budget(data: dict, where: str, required: bool) -> Budget:
    iters, tokens = data.get("train_iters"), data.get("tokens")
    if iters is not None and tokens is not None:
        raise ExperimentError(f"{where}: give train_iters or tokens, not both.")
    if iters is None and tokens is None:
        if required:
            raise ExperimentError(f"{where}: missing the token budget: set {where}.tokens or {where}.train_iters.")
        return Budget()
    if iters is not None:
        return Budget(train_iters=_positive_int(iters, f"{where}.train_iters"))
    value = _number(tokens, f"{where}.tokens")
    if value <= 0:
        raise ExperimentError(f"{where}.tokens must be positive, got {tokens!r}.")
    return Budget(tokens=value)


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
        budget=parse_budget(data, where, required=True),
        options=parse_stage_options(data, where, defaults),
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
    return SeedSpec(None, parse_blend_spec(data["data"], "seed.data"), parse_budget(data, "seed", required=True),
                    parse_stage_options(data, "seed", defaults))


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
    return MixSpec(model, parse_stage_options(data, "mix", defaults), parse_budget(data, "mix", required=False),
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
        enabled=_bool(dense.get("enabled", True), "baselines.dense.enabled"),
        budget=parse_budget(dense, "baselines.dense", required=False),
        data=parse_blend_spec(dense["data"], "baselines.dense.data") if dense.get("data") is not None else None,
        options=parse_stage_options(dense, "baselines.dense", defaults),
        match=dense.get("match", "compute"),
    )
    if spec.dense.match not in ("compute", "data"):
        raise ExperimentError(f"baselines.dense.match: {spec.dense.match!r} is not 'compute' (as many training FLOPs "
                              "as branches + mix) or 'data' (as many tokens).")
    up = _check_keys(data.get("upcycling"), UpcyclingBaselineSpec.KEYS, "baselines.upcycling")
    spec.upcycling = UpcyclingBaselineSpec(
        enabled=_bool(up.get("enabled", True), "baselines.upcycling.enabled"),
        num_experts=_positive_int(up["num_experts"], "baselines.upcycling.num_experts")
        if up.get("num_experts") is not None else None,
        noise=_number(up["noise"], "baselines.upcycling.noise") if up.get("noise") is not None else None,
    )
    btm = _check_keys(data.get("btm"), BTMBaselineSpec.KEYS, "baselines.btm")
    spec.btm = BTMBaselineSpec(enabled=_bool(btm.get("enabled", True), "baselines.btm.enabled"),
                               top_k=_positive_int(btm.get("top_k", 2), "baselines.btm.top_k"))
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
    defaults = parse_stage_options(_check_keys(data.get("branch_defaults"), STAGE_KEYS, "branch_defaults"),
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
        tasks=_bool(ev.get("tasks", True), "evaluation.tasks"),
        task_items=_positive_int(ev.get("task_items", 40), "evaluation.task_items"),
    )
    exp = Experiment(
        name=name, output_dir=_path(data["output_dir"], "output_dir"), source=source,
        tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, model=model, data_options=data_options,
        seed=seed, branch_defaults=defaults, domains=domains, merge=merge, mix=mix,
        baselines=_parse_baselines(data.get("baselines"), defaults), evaluation=evaluation,
        slurm=_parse_slurm(data.get("slurm")), raw=raw,
        shared_runs_dir=_path(data["shared_runs_dir"], "shared_runs_dir") if data.get("shared_runs_dir") else None,
        corpora=CorporaSpec(**{k: _positive_int(v, f"corpora.{k}", allow_zero=k == "seed")
                               for k, v in _check_keys(data.get("corpora"), CorporaSpec.KEYS, "corpora").items()}),
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


def read_experiment_document(path: str | os.PathLike) -> dict[str, Any]:
    """The experiment file as parsed YAML (not yet validated)."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"experiment file {p} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ExperimentError(f"{p}: not valid YAML ({yaml_problem(exc)}); fix the file.") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{p}: expected a mapping at the top level.")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """``branch_defaults.train.lr=3e-4`` -> ("branch_defaults.train.lr", 0.0003). The value is
    read as YAML, so numbers, booleans, lists and mappings keep their types."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ExperimentError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. branch_defaults.train.lr=3e-4.")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ExperimentError(f"--set {text!r}: the value is not valid YAML ({yaml_problem(exc)}).") from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the experiment document with dotted-path overrides applied.

    ``domains.math.train_iters`` addresses the domain named ``math`` (``domains[1]`` by index
    also works); ``a.b=null`` removes key ``b``. The result is validated like the file itself,
    so a mistyped key is still an error naming its full path."""
    raw = copy.deepcopy(raw)
    for path, value in overrides.items():
        node: Any = raw
        keys = path.split(".")
        for i, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: i + 1]), create=True)
        last = keys[-1]
        if isinstance(node, list):
            index = _list_index(node, last, path)
            node[index] = value
        elif value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


def value_at(raw: dict[str, Any], path: str) -> Any:
    """The value an override path (``mix.train_iters``, ``domains.math.train_iters``) has in the
    experiment document; None where the document does not set it."""
    node: Any = raw
    for key in path.split("."):
        try:
            node = _child(node, key, path, create=False)
        except (ExperimentError, KeyError):
            return None
    return node


def _list_index(items: list, key: str, where: str) -> int:
    if key.startswith("[") and key.endswith("]") and key[1:-1].isdigit():
        key = key[1:-1]
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise ExperimentError(f"--set {where}: no list item {key!r} (give an index or a domain name).")


def _child(node: Any, key: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, where)]
    if not isinstance(node, dict):
        raise ExperimentError(f"--set {where}: {where.rsplit('.', 1)[0]} is not a mapping.")
    if node.get(key) is None and create:
        node[key] = {}
    return node[key]


def load_experiment(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and validate an experiment YAML file (with ``--set`` overrides applied);
    :class:`ExperimentError` names the bad key."""
    raw = apply_overrides(read_experiment_document(path), overrides or {})
    return parse_experiment(raw, str(path))
