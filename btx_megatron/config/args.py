"""Command line (Megatron-LM flag names) and YAML option files -> :class:`Config`.

The parser is generated from the dataclass fields in :mod:`schema` (the model section in
:mod:`model`), so a flag exists exactly when a config field does. A YAML file given with
``--config`` holds the same options (flat, ``num-layers: 4`` or ``num_layers: 4``); flags on
the command line override it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from .schema import SECTIONS, Config


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag_name") or "--" + f.name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``list[str]`` -> list; ``dict[...]`` -> dict."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list, "dict": dict})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return origin or annotation


class _KeyValueAction(argparse.Action):
    """``--eval-domain math=PREFIX`` (repeatable) -> {"math": ["PREFIX"]}."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                parser.error(f"{option_string} expects NAME=PREFIX, got {item!r}")
            if name in current:
                parser.error(f"{option_string} names {name!r} twice")
            current[name] = value.split()
        setattr(namespace, self.dest, current)


def _dest(section: str, name: str) -> str:
    return f"{section}__{name}"


def build_parser(description: str = "btx-megatron pretraining") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of options (flags override it).")
    for section, section_cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(section_cls):
            if "help" not in f.metadata:
                continue
            kwargs: dict[str, Any] = {"dest": _dest(section, f.name), "help": f.metadata["help"], "default": argparse.SUPPRESS}
            kind = _base_type(f.type)
            if kind is bool:
                # Megatron-style store_true flags, plus --no-X for the ones that default on.
                # `--no-load-optim` style flags are plain switches: BooleanOptionalAction would
                # read their `--no-` prefix as a negation.
                kwargs["action"] = "store_true" if flag_name(f).startswith("--no-") else argparse.BooleanOptionalAction
            elif kind is list:
                kwargs["nargs"] = f.metadata.get("nargs", "+")
            elif kind is dict:
                kwargs["action"] = _KeyValueAction
                kwargs["nargs"] = 1
                kwargs["metavar"] = "NAME=PREFIX"
            else:
                kwargs["type"] = kind
                choices = f.metadata.get("choices")
                if choices is not None:
                    kwargs["choices"] = [c for c in choices if c is not None]
            group.add_argument(flag_name(f), **kwargs)
    return parser


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: ``line L, column C: problem`` (PyYAML's own text spans lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or ["unreadable"])[0]
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + problem


def _yaml_to_sections(data: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    lookup = {}
    for section, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            if "help" not in f.metadata:  # derived fields (DataConfig.vocab_size) are not options
                continue
            lookup[f.name] = section
            lookup[flag_name(f).lstrip("-").replace("-", "_")] = section
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in SECTIONS and isinstance(value, dict):  # nested form: {model: {...}}
            for k, v in _yaml_to_sections(value, source).items():
                out[k].update(v)
            continue
        if name not in lookup:
            raise ValueError(f"{source}: unknown option {key!r}.")
        if name == "eval_domain":
            name = "eval_domains"
        if name == "eval_domains" and isinstance(value, dict):
            value = {k: v.split() if isinstance(v, str) else list(v) for k, v in value.items()}
        if name == "data_path" and isinstance(value, str):
            value = value.split()
        out[lookup[name]][name] = value
    return out


def parse_options(argv: Sequence[str] | None = None, description: str = "btx-megatron pretraining",
                  extra: typing.Callable[[argparse.ArgumentParser], None] | None = None,
                  ) -> tuple[dict[str, dict[str, Any]], argparse.Namespace]:
    """The options a user gave (``--config`` YAML, then flags over it), by config section.

    Absent flags stay out (the parser's default is ``SUPPRESS``), which is how an option the user
    omitted is told apart from one set to its default value. ``extra`` may add
    entrypoint-specific flags; the returned namespace carries them.
    """
    parser = build_parser(description)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if ns.config:
        path = Path(ns.config)
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path} is not valid YAML ({yaml_problem(exc)}); fix the file.") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of options.")
        values = _yaml_to_sections(loaded, str(path))
    for key, value in vars(ns).items():
        if "__" in key:
            section, name = key.split("__", 1)
            values[section][name] = value
    return values, ns


def parse_config(argv: Sequence[str] | None = None, description: str = "btx-megatron pretraining",
                 extra: typing.Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse flags (and an optional ``--config`` YAML) into a validated :class:`Config`.

    The namespace carries ``extra``'s flags and ``explicit``: what :func:`parse_options` returns,
    the options the user set, by section.
    """
    values, ns = parse_options(argv, description, extra)
    ns.explicit = copy.deepcopy(values)
    return Config.from_dict(values), ns


def config_to_argv(config: Config) -> list[str]:
    """The flags that reproduce ``config`` (used by launchers to write exact commands)."""
    argv: list[str] = []
    for section, section_cls in SECTIONS.items():
        obj = getattr(config, section)
        for f in dataclasses.fields(section_cls):
            if "help" not in f.metadata:
                continue
            value, default = getattr(obj, f.name), section_cls.__dataclass_fields__[f.name]
            default_value = default.default if default.default is not dataclasses.MISSING else default.default_factory()
            if value == default_value:
                continue
            name = flag_name(f)
            if isinstance(value, bool):
                argv.append(name if value else "--no-" + name[2:])
            elif isinstance(value, list):
                argv += [name, *map(str, value)]
            elif isinstance(value, dict):
                for k, v in value.items():
                    argv += [name, f"{k}={' '.join(v)}"]
            else:
                argv += [name, str(value)]
    return argv
