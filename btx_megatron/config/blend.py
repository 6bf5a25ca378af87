"""Megatron-LM's ``--data-path`` blend syntax, parsed strictly (the one parser of it: the
trainer's flag and the experiment file's Megatron-style blends both use it).

``[PREFIX]`` or ``[W1, PREFIX1, W2, PREFIX2, ...]``. Megatron-LM falls back to "all tokens are
prefixes" when a weight does not parse; here a token in a weight position that is not a number is
an error, because a typo such as ``0,3 math`` would otherwise silently become a dataset path.
Several prefixes without weights are accepted only when every token names an existing dataset
(the weights are then the datasets' sizes, as in Megatron-LM).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Blend:
    """Dataset prefixes and their (unnormalised) weights; ``weights`` None means size-weighted."""

    prefixes: list[str]
    weights: list[float] | None

    def as_megatron(self) -> tuple[list[str], list[float] | None]:
        """The ``(prefixes, weights)`` tuple ``BlendedMegatronDatasetConfig.blend`` expects."""
        return (list(self.prefixes), None if self.weights is None else list(self.weights))


def _as_number(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value


def _looks_like_dataset(prefix: str) -> bool:
    return os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx")


def parse_blend(tokens: list[str] | tuple[str, ...] | str, flag: str = "--data-path") -> Blend:
    """Parses Megatron blend tokens into a :class:`Blend`; ValueError names ``flag`` on mistakes."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    tokens = [str(t) for t in tokens]
    if not tokens:
        raise ValueError(f"{flag} is empty: pass PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    if len(tokens) == 1:
        if _as_number(tokens[0]) is not None and not _looks_like_dataset(tokens[0]):
            raise ValueError(
                f"{flag} {tokens[0]!r} is a number, not a dataset prefix: pass PREFIX or "
                "W1 PREFIX1 W2 PREFIX2 ..."
            )
        return Blend([tokens[0]], None)

    first_is_weight = _as_number(tokens[0]) is not None and not _looks_like_dataset(tokens[0])
    if not first_is_weight and all(_looks_like_dataset(t) for t in tokens):
        return Blend(tokens, None)

    if len(tokens) % 2 != 0:
        raise ValueError(
            f"{flag} has {len(tokens)} entries ({' '.join(tokens)}); a weighted blend needs pairs "
            "W1 PREFIX1 W2 PREFIX2 ...: every prefix must be preceded by its weight."
        )
    weights: list[float] = []
    prefixes: list[str] = []
    for i in range(0, len(tokens), 2):
        weight_token, prefix = tokens[i], tokens[i + 1]
        weight = _as_number(weight_token)
        if weight is None:
            raise ValueError(
                f"{flag}: blend weight {weight_token!r} (entry {i + 1}) is not a number; the "
                "syntax is W1 PREFIX1 W2 PREFIX2 ... with numeric weights such as 0.3."
            )
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"{flag}: blend weight {weight_token!r} for {prefix!r} must be a finite number >= 0."
            )
        if _as_number(prefix) is not None and not _looks_like_dataset(prefix):
            raise ValueError(
                f"{flag}: {prefix!r} (entry {i + 2}) is in a prefix position but is a number; "
                "the syntax is W1 PREFIX1 W2 PREFIX2 ..."
            )
        weights.append(weight)
        prefixes.append(prefix)
    if sum(weights) <= 0:
        raise ValueError(f"{flag}: the blend weights sum to 0; give at least one positive weight.")
    return Blend(prefixes, weights)
