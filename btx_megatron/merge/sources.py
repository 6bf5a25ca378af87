"""The source checkpoints of a merge: inspect each (manifest, tensors, fingerprint) and check
that they can be merged (same architecture, same tensors, dense, no branch given twice).

Only metadata and a sampled fingerprint are read here; every message names the flag and path
the user gave, so a bad source is found before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import math

from .. import checkpoint as fmt
from ..checkpoint.verify import fingerprint, verify_files
from .units import LAYER_PREFIX, MODEL_PREFIXES, ROUTER_KEY


@dataclasses.dataclass
class Source:
    name: str
    path: str  # as given
    flag: str  # the flag that named it, for messages
    ckpt_dir: str = ""
    iteration: int = 0
    manifest: dict = dataclasses.field(default_factory=dict)
    tensors: dict = dataclasses.field(default_factory=dict)  # key -> (shape tuple, dtype str)
    content_hash: str = ""
    nbytes: int = 0

    @property
    def label(self) -> str:
        return f"{self.flag} {self.name}={self.path}" if self.flag == "--branch" else f"{self.flag} {self.path}"


def inspect_source(name: str, path: str, flag: str, full_hash: bool = False, allow_moe: bool = False) -> Source:
    """Resolve, verify and describe one source; ValueError naming ``flag`` when it is unusable."""
    from ..checkpoint.dcp_metadata import is_tensor

    src = Source(name=name, path=str(path), flag=flag)
    try:
        ckpt_dir, iteration = fmt.resolve(path, flag)
        src.manifest = fmt.read_manifest(ckpt_dir)
    except fmt.CheckpointError as exc:
        raise ValueError(f"{src.label}: {exc}") from exc
    src.ckpt_dir, src.iteration = str(ckpt_dir.resolve()), iteration
    model = src.manifest.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{src.label}: the manifest {ckpt_dir / fmt.MANIFEST} has no 'model' section.")
    if (src.manifest.get("kind") == "moe" or model.get("num_experts")) and not allow_moe:
        raise ValueError(
            f"{src.label} is already an MoE checkpoint (num_experts={model.get('num_experts')}); "
            "BTX merges dense branches. Give the dense branch checkpoints."
        )
    metadata = verify_files(ckpt_dir, src.label)
    for key, md in metadata.state_dict_metadata.items():
        if is_tensor(md) and key.startswith(MODEL_PREFIXES):
            src.tensors[key] = (tuple(md.size), str(md.properties.dtype).replace("torch.", ""))
            src.nbytes += math.prod(md.size) * md.properties.dtype.itemsize
    if not any(k.startswith(LAYER_PREFIX) for k in src.tensors):
        raise ValueError(f"{src.label}: no model tensors found in {ckpt_dir}; is it a model checkpoint?")
    if any(k.startswith("decoder.layers.mlp.experts.") or k == ROUTER_KEY for k in src.tensors) and not allow_moe:
        raise ValueError(f"{src.label} holds MoE expert tensors; BTX merges dense branches.")
    src.content_hash = fingerprint(ckpt_dir, full_hash)
    return src


def check_sources(sources: list[Source], allow_duplicates: bool = False) -> None:
    """Same architecture, same tensors, no source twice."""
    ref = sources[0]
    ref_arch = model_config(ref).architecture()
    seen_dirs: dict[str, Source] = {}
    seen_hash: dict[str, Source] = {}
    for s in sources:
        arch = model_config(s).architecture()
        for key, value in ref_arch.items():
            if arch.get(key) != value:
                raise ValueError(
                    f"{s.label} has {key}={arch.get(key)!r} but {ref.label} has {key}={value!r}; "
                    "branches must share the seed's architecture."
                )
        if s.ckpt_dir in seen_dirs and not allow_duplicates:
            raise ValueError(f"{s.label} is the same checkpoint as {seen_dirs[s.ckpt_dir].label}.")
        if s.content_hash in seen_hash and not allow_duplicates:
            raise ValueError(
                f"{s.label} has the same content ({s.content_hash}) as {seen_hash[s.content_hash].label}; "
                "the same branch is given twice."
            )
        seen_dirs[s.ckpt_dir] = s
        seen_hash[s.content_hash] = s
        if s.tensors != ref.tensors:
            diff = sorted(set(s.tensors.items()) ^ set(ref.tensors.items()))[:3]
            raise ValueError(f"{s.label} and {ref.label} hold different tensors (first differences: {diff}).")


def model_config(src: Source):
    """The source's :class:`~btx_megatron.config.ModelConfig` (from its manifest)."""
    from ..config.model import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in src.manifest["model"].items() if k in known})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{src.label}: the manifest's model section is invalid ({exc}).") from exc


__all__ = ["Source", "check_sources", "inspect_source", "model_config"]
