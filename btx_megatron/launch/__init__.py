"""Starting training runs: one :class:`RunPlan` per run of an experiment (seed, branches, dense
baseline, mix phase, upcycling), run locally (:mod:`.local`) or as SLURM jobs (:mod:`.slurm`),
and their status (:mod:`.status`)."""

from .plan import RunPlan, check_inputs, plan_runs, select

__all__ = ["RunPlan", "check_inputs", "plan_runs", "select"]
