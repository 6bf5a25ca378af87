"""Mix-phase entrypoint: continue pretraining a merged BTX MoE (Branch-Train-MiX, stage 3).

    python -m btx_megatron.pretrain_mix --load ckpt/moe --save ckpt/mix <model flags> ...
    torchrun --nproc-per-node 8 -m btx_megatron.pretrain_mix --expert-model-parallel-size 8 ...
    srun python -m btx_megatron.pretrain_mix ...            # see slurm/mix.sh

Same flags and trainer as :mod:`btx_megatron.pretrain`. What this stage adds:

- ``--load`` must be an MoE checkpoint: the output of ``tools/merge_branches.py`` or a mix
  checkpoint of this entrypoint. A dense checkpoint is refused with a pointer to the merge tool.
- The expert count (``--num-experts``), the expert FFN size (``--moe-ffn-hidden-size``, split
  experts) and the merge's recommended ``--moe-router-topk`` come from the checkpoint manifest
  when the flags are not given; a flag that contradicts the checkpoint is an error, as is any
  architecture field that differs from the flags. All checked before any model is built.
- A merge output (iteration 0, no optimizer state) starts at iteration 0 with a fresh optimizer
  and LR schedule (``--finetune`` semantics, set automatically); a mix checkpoint resumes at its
  saved iteration with its optimizer, like any ``--load``. As in ``pretrain``, checkpoints
  already in ``--save`` take precedence (SLURM requeue).
- Every checkpoint this stage writes carries the merge provenance (``btx``: expert names,
  method, sources) in its manifest, so routing analysis and export keep the expert names.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

from btx_megatron import checkpoint_format as fmt
from btx_megatron.config import Config, parse_config

MERGE_TOOL = "tools/merge_branches.py"
STAGE = "mix"


@dataclasses.dataclass
class MixSource:
    """What the mix phase learned from the checkpoint it starts from or resumes."""

    path: str                       # the ROOT (or iter dir) read
    checkpoint_dir: Path            # the iteration directory
    manifest: dict[str, Any]
    from_merge: bool                # a merge output: start at iteration 0, fresh optimizer
    resuming_own: bool              # --save already holds this run's checkpoints
    expert_names: list[str]
    btx: dict[str, Any]             # provenance carried into this stage's manifests


def _explicit_options(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Options the user set (command line or ``--config`` YAML), by config section.

    The parser leaves absent flags out of its namespace (default ``SUPPRESS``), which is how a
    flag the user omitted is told apart from one set to its default value.
    """
    import yaml

    from btx_megatron.config import build_parser
    from btx_megatron.config.args import _yaml_to_sections
    from btx_megatron.config.schema import SECTIONS

    ns, _ = build_parser().parse_known_args(list(argv))
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if getattr(ns, "config", None):
        path = Path(ns.config)
        if path.is_file():
            for section, values in _yaml_to_sections(yaml.safe_load(path.read_text()) or {}, str(path)).items():
                out[section].update(values)
    for key, value in vars(ns).items():
        if "__" in key:
            section, name = key.split("__", 1)
            out[section][name] = value
    return out


def inspect_source(load: str, save: str | None) -> MixSource:
    """Read the manifest the run will start from; refuse anything that is not a BTX MoE."""
    if not load:
        raise ValueError(
            "pretrain_mix needs --load MERGED_DIR: the MoE checkpoint written by "
            f"{MERGE_TOOL} (or a mix checkpoint to resume)."
        )
    resuming_own = bool(save) and fmt.read_tracker(save) is not None
    path = save if resuming_own else load
    flag = "--save" if resuming_own else "--load"
    ckpt_dir, _ = fmt.resolve(path, flag)
    manifest = fmt.read_manifest(ckpt_dir)
    model = manifest.get("model", {})
    if manifest.get("kind") != "moe" or not model.get("num_experts"):
        raise ValueError(
            f"{flag} {path} is a dense checkpoint (kind={manifest.get('kind')!r}); the mix phase "
            f"trains a merged MoE. Merge the branches first: python {MERGE_TOOL} --branch "
            "math=DIR --branch code=DIR ... --output MERGED_DIR, then pass --load MERGED_DIR "
            "(to continue training a dense model use btx_megatron.pretrain)."
        )
    num_experts = int(model["num_experts"])
    btx = dict(manifest.get("btx") or {})
    names = list(btx.get("expert_names") or [])
    if not names:
        names = [f"expert_{i}" for i in range(num_experts)]
        btx["expert_names"] = names
    if len(names) != num_experts:
        raise ValueError(
            f"{flag} {path}: the manifest names {len(names)} experts ({', '.join(names)}) but the "
            f"model has num_experts={num_experts}; the checkpoint is inconsistent, re-run {MERGE_TOOL}."
        )
    opt = manifest.get("optimizer", {}) or {}
    from_merge = (
        not resuming_own
        and "btx" in manifest
        and int(manifest.get("iteration", 0)) == 0
        and not opt.get("saved", False)
    )
    return MixSource(str(path), ckpt_dir, manifest, from_merge, resuming_own, names, btx)


def _defaults_from_manifest(source: MixSource, explicit: dict[str, dict[str, Any]]) -> list[str]:
    """Flags to add in front of the user's: MoE shape and routing taken from the checkpoint."""
    saved = source.manifest["model"]
    given = explicit["model"]
    where = f"{'--save' if source.resuming_own else '--load'} {source.path}"
    extra: list[str] = []
    num_experts = int(saved["num_experts"])
    if "num_experts" in given:
        if given["num_experts"] != num_experts:
            raise ValueError(
                f"--num-experts {given['num_experts']} contradicts {where}, which has {num_experts} "
                f"experts ({', '.join(source.expert_names)}); drop --num-experts (it is read from the "
                "checkpoint) or load the matching checkpoint."
            )
    else:
        extra += ["--num-experts", str(num_experts)]
    if saved.get("moe_ffn_hidden_size") is not None and "moe_ffn_hidden_size" not in given:
        extra += ["--moe-ffn-hidden-size", str(saved["moe_ffn_hidden_size"])]
    # The merge recommends top-k (split experts route to k*C experts to keep the active compute).
    recommended = source.btx.get("recommended_topk") or saved.get("moe_router_topk")
    router_type = given.get("moe_router_type", "topk")
    if recommended and "moe_router_topk" not in given and router_type == "topk":
        extra += ["--moe-router-topk", str(min(int(recommended), num_experts))]
    return extra


def check_against_checkpoint(cfg: Config, source: MixSource) -> None:
    """Architecture, expert shape and layout checks that must pass before any compute."""
    from btx_megatron.training.checkpointing import check_compatible

    where = f"{'--save' if source.resuming_own else '--load'} {source.path}"
    check_compatible(cfg, source.manifest, where)
    saved = source.manifest["model"]
    saved_expert_ffn = saved.get("moe_ffn_hidden_size") or saved.get("ffn_hidden_size")
    if saved_expert_ffn is not None and saved_expert_ffn != cfg.model.expert_ffn_hidden_size:
        raise ValueError(
            f"{where} has experts of FFN size {saved_expert_ffn} but this run has "
            f"--moe-ffn-hidden-size {cfg.model.expert_ffn_hidden_size}; drop the flag (it is read "
            "from the checkpoint) or load the matching checkpoint."
        )


def check_router_options(cfg: Config) -> None:
    """Router/balancing combinations the routers refuse only once the model is built (after
    distributed start-up); caught here first. (Candidates for ModelConfig.__post_init__.)"""
    m = cfg.model
    if m.moe_router_type in ("soft", "sample-top1") and m.moe_router_load_balancing_type == "sinkhorn":
        raise ValueError(
            f"--moe-router-load-balancing-type sinkhorn chooses the experts itself and works with "
            f"--moe-router-type topk or switch only, not {m.moe_router_type}; use aux_loss, "
            "seq_aux_loss, global_aux_loss or none."
        )


def prepare(argv: Sequence[str], world_size: int | None = None) -> tuple[Config, MixSource]:
    """Parse the mix-phase command line against its checkpoint; raise ValueError on mismatch.

    With ``world_size`` the parallel layout is checked too (EP must divide the experts, ...).
    """
    argv = list(argv)
    explicit = _explicit_options(argv)
    ck = explicit["checkpoint"]
    source = inspect_source(ck.get("load"), ck.get("save"))
    # argparse keeps the last occurrence, so the user's flags (after these) still win where
    # they agree; contradictions were refused above.
    cfg, _ = parse_config(_defaults_from_manifest(source, explicit) + argv)
    from btx_megatron.pretrain import resolve_vocab

    resolve_vocab(cfg)
    check_against_checkpoint(cfg, source)
    check_router_options(cfg)
    if world_size is not None:
        cfg.validate_layout(world_size)
    if source.from_merge:
        cfg.checkpoint.finetune = True
    return cfg, source


def mix_manifest(source: MixSource, cfg: Config) -> dict[str, Any]:
    """The ``btx`` section of this stage's manifests: the merge provenance plus the mix run."""
    btx = copy.deepcopy(source.btx)
    btx["expert_names"] = list(source.expert_names)
    if not source.resuming_own and "mix" not in btx:
        btx["mix"] = {
            "started_from": str(source.checkpoint_dir),
            "started_at_iteration": int(source.manifest.get("iteration", 0)),
            "router_type": cfg.model.moe_router_type,
            "router_topk": cfg.model.moe_router_topk,
            "freeze_experts": cfg.train.freeze_experts,
            "freeze_router": cfg.train.freeze_router,
        }
    return {"btx": btx, "stage": STAGE}


def _trainer_class():
    from btx_megatron.training.trainer import Trainer

    class MixTrainer(Trainer):
        """The pretraining Trainer with the merge provenance written into every checkpoint."""

        def __init__(self, cfg, *, argv=None, stage=STAGE, source: MixSource):
            super().__init__(cfg, argv=argv, stage=stage)
            self.source = source
            self._extra_manifest = mix_manifest(source, cfg)
            self._log(
                f"{stage}: {cfg.model.num_experts} experts ({', '.join(source.expert_names)}), router "
                f"{cfg.model.moe_router_type}"
                + (f" top-{cfg.model.moe_router_topk}" if cfg.model.moe_router_type == "topk" else "")
                + (" | starting the merged model at iteration 0 with a fresh optimizer" if source.from_merge else "")
            )

    return MixTrainer


def run(argv: Sequence[str]):
    """Prepare and train in this process (initialises distributed state); returns TrainResult."""
    import functools

    from btx_megatron.pretrain import run as pretrain_run

    cfg, source = prepare(argv)
    trainer_cls = functools.partial(_trainer_class(), source=source)
    return pretrain_run(cfg, list(argv), stage=STAGE, trainer_cls=trainer_cls)


def main(argv: list[str] | None = None) -> int:
    from btx_megatron.runtime.distributed import run_entrypoint

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_entrypoint(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
