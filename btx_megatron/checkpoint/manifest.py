"""The manifest every checkpoint carries (``iter_X/btx_checkpoint.json``).

One writer for the trainer, the merge and the converters: the architecture (the model config),
the layout it was saved at, what optimizer state it holds, the precision, and where it came
from (tool, git revision, and stage-specific provenance such as the merge's expert names).
Readers get the JSON as a dict (:func:`btx_megatron.checkpoint.format.read_manifest`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .format import FORMAT_VERSION, MANIFEST
from .io import write_json_atomic
from .provenance import git_revision


def offline_layout() -> dict[str, Any]:
    """The layout of a checkpoint written by an offline tool: whole global tensors and no
    per-rank state (RNG, optimizer), so there is no layout to match; ``world_size`` None means a
    resume never looks for per-rank RNG states."""
    return {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "virtual_pipeline_size": None,
            "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1, "data_parallel_size": None,
            "world_size": None, "use_distributed_optimizer": False}


@dataclass
class Manifest:
    model: dict[str, Any]
    """The ModelConfig fields (``dataclasses.asdict``): the architecture every reader checks."""
    tool: str
    """What wrote it: ``btx_megatron 0.1.0`` (the trainer) or ``... tools/merge_branches.py``."""
    iteration: int = 0
    consumed_samples: int = 0
    layout: dict[str, Any] = field(default_factory=offline_layout)
    """Parallel sizes at save time; weights load at any layout, per-rank state only at this one."""
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"saved": False, "distributed": False, "sharding_type": None})
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)
    """Stage provenance merged into the top level (``btx``: expert names and sources; ``stage``)."""
    git_revision: str = field(default_factory=git_revision)
    format_version: int = FORMAT_VERSION

    @property
    def kind(self) -> str:
        return "moe" if self.model.get("num_experts") else "dense"

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out["kind"] = self.kind
        out.update(self.extra)
        return out

    def write(self, ckpt_dir: str | Path) -> None:
        write_json_atomic(Path(ckpt_dir) / MANIFEST, self.to_dict())
