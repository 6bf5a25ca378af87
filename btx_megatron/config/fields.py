"""Shared building blocks of the config dataclasses: flag fields and user-facing checks.

A :func:`flag` is a dataclass field whose ``help=`` metadata becomes the command-line help
(:mod:`btx_megatron.config.args`); :func:`require` and :func:`require_positive` raise the
``ValueError`` that names the flag and the fix.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def flag(default: Any = None, help: str = "", **extra: Any) -> Any:
    """A dataclass field that is also a command-line flag."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        factory = type(default)
        return field(default_factory=lambda: factory(default), metadata=meta)
    return field(default=default, metadata=meta)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def require_positive(section: Any, names: tuple[str, ...], *, optional: tuple[str, ...] = (),
                     at_least_zero: tuple[str, ...] = ()) -> None:
    """Numeric options that must be > 0 (``optional``: also None, the derived default) or >= 0
    (``at_least_zero``); a zero here would otherwise end in a division by zero (or SIGFPE) deep
    inside model construction."""
    for name in names + optional + at_least_zero:
        value = getattr(section, name)
        if value is None and name in optional:
            continue
        default = section.__dataclass_fields__[name].default
        hint = f" (default {default})" if default is not None else " (or leave it out for the default)"
        if name in at_least_zero:
            require(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}{hint}.")
        else:
            require(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}{hint}.")
