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

from btx_megatron import checkpoint as fmt
from btx_megatron.config import Config, parse_config, parse_options
from btx_megatron.pretrain import resolve_vocab
from btx_megatron.pretrain import run as pretrain_run
from btx_megatron.runtime.distributed import run_entrypoint
from btx_megatron.training.checkpointing import check_compatible
from btx_megatron.training.trainer import StageHooks

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


def inspect_source(load: str, save: str | None) -> MixSource:
    """Read the manifest the run will start from; refuse anything that is not a BTX MoE."""
    if not load:
        raise ValueError(
            "pretrain_mix needs --load MERGED_DIR: the MoE checkpoint written by "
            f"{MERGE_TOOL} (or a mix checkpoint to resume)."
        )
    if save and Path(save).is_dir():
        fmt.restore_tracked(save)  # a kill between the renames of a re-save (see plan_start)
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


def prepare(argv: Sequence[str], world_size: int | None = None) -> tuple[Config, MixSource]:
    """Parse the mix-phase command line against its checkpoint; raise ValueError on mismatch.

    With ``world_size`` the parallel layout is checked too (EP must divide the experts, ...).
    """
    argv = list(argv)
    explicit, _ = parse_options(argv)
    ck = explicit["checkpoint"]
    source = inspect_source(ck.get("load"), ck.get("save"))
    # argparse keeps the last occurrence, so the user's flags (after these) still win where
    # they agree; contradictions were refused above.
    cfg, _ = parse_config(_defaults_from_manifest(source, explicit) + argv)
    resolve_vocab(cfg)
    check_compatible(cfg, source.manifest, f"{'--save' if source.resuming_own else '--load'} {source.path}")
    if cfg.train.train_experts:
        cfg.train.trained_expert_ids = resolve_experts(cfg.train.train_experts, source)
    if world_size is not None:
        cfg.validate_layout(world_size)
    if source.from_merge:
        cfg.checkpoint.finetune = True
    return cfg, source


def resolve_experts(names: list[str], source: MixSource) -> tuple[int, ...]:
    """``--train-experts`` names (or indices) -> sorted expert indices of the checkpoint."""
    out = set()
    for name in names:
        if name in source.expert_names:
            out.add(source.expert_names.index(name))
        elif name.isdigit() and int(name) < len(source.expert_names):
            out.add(int(name))
        else:
            raise ValueError(f"--train-experts {name}: the checkpoint's experts are {', '.join(source.expert_names)} "
                             f"(or indices 0..{len(source.expert_names) - 1}).")
    if len(out) == len(source.expert_names):
        raise ValueError("--train-experts names every expert; drop it to train the whole model.")
    return tuple(sorted(out))


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
    if cfg.train.trained_expert_ids is not None:
        # Expert training against frozen shared weights: record which experts changed.
        btx.setdefault("expert_training", []).append({
            "experts": [source.expert_names[i] for i in cfg.train.trained_expert_ids],
            "router_rows": cfg.train.train_router, "started_from": str(source.checkpoint_dir)})
    return {"btx": btx, "stage": STAGE}


def stage_hooks(cfg: Config, source: MixSource):
    """The mix phase's additions to the training loop: provenance in every manifest, a banner."""
    m = cfg.model
    banner = (f"{STAGE}: {m.num_experts} experts ({', '.join(source.expert_names)}), router {m.moe_router_type}"
              + (f" top-{m.moe_router_topk}" if m.moe_router_type == "topk" else "")
              + (" | starting the merged model at iteration 0 with a fresh optimizer" if source.from_merge else ""))
    return StageHooks(name=STAGE, manifest_extra=mix_manifest(source, cfg), banner=banner)


def run(argv: Sequence[str]):
    """Prepare and train in this process (initialises distributed state); returns TrainResult."""
    cfg, source = prepare(argv)
    return pretrain_run(cfg, list(argv), hooks=stage_hooks(cfg, source))


def dry_run_plan(argv: Sequence[str]) -> str:
    """``--dry-run`` (see :func:`btx_megatron.pretrain.dry_run_plan`). With a readable ``--load``
    the expert shape comes from the merged checkpoint and is checked against it; without one
    (planning away from the cluster) ``--num-experts`` must be given."""
    from btx_megatron.training.memory import dry_run, split_dry_run_args

    plan, argv = split_dry_run_args(argv)
    load = parse_options(argv)[0]["checkpoint"].get("load")
    if load and Path(load).exists():
        cfg, _ = prepare(argv)
    else:
        cfg, _ = parse_config(argv)
        if not cfg.model.is_moe:
            raise ValueError("pretrain_mix --dry-run without a readable --load needs --num-experts "
                             "(the merged model's expert count); or pass --load MERGED_DIR.")
        if cfg.model.vocab_size is None:
            resolve_vocab(cfg)
    return dry_run(cfg, plan)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from btx_megatron.training.memory import wants_dry_run

    if wants_dry_run(argv):
        return run_entrypoint(lambda: print(dry_run_plan(argv)))
    return run_entrypoint(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
