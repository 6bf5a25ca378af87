"""Launch the training runs of an experiment file: the BTX branches (default), the seed, the
dense baseline, the mix phase or the upcycling baseline's mix phase.

    python tools/launch_branches.py examples/tiny/experiment.yaml --local            # all branches here
    python tools/launch_branches.py examples/tiny/experiment.yaml --local --only seed # pretrain the seed
    python tools/launch_branches.py EXP.yaml --local --only math                      # (re)launch one branch
    python tools/launch_branches.py EXP.yaml --local --only dense                     # dense baseline
    python tools/launch_branches.py EXP.yaml --slurm --only mix                       # the mix phase (after the merge)
    python tools/launch_branches.py EXP.yaml --slurm [--dry-run]                      # one sbatch job per branch
    python tools/launch_branches.py EXP.yaml status                                   # one line per run

Each branch is an independent dense job from the seed (--load SEED --finetune) writing to
OUT/branches/NAME; a relaunch resumes from the branch's own latest checkpoint. See
btx_megatron/launch/plan.py for the run directory layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("command", nargs="?", choices=("launch", "status", "plan"), default="launch",
                   help="launch (default), status (one line per run), plan (print resolved commands)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run on this machine, one process group per run")
    where.add_argument("--slurm", action="store_true", help="submit one sbatch job per run")
    p.add_argument("--only", action="append", metavar="NAME", default=None,
                   help="run only NAME (a domain, 'seed', 'dense', 'mix' or 'upcycling'); repeatable. "
                        "Default: every domain branch")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch commands and scripts")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="--local: runs at a time (default: CPU cores or GPUs / processes per run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from btx_megatron.config.experiment import ExperimentError
    from btx_megatron.config.experiment_file import load_experiment
    from btx_megatron.launch import check_inputs, plan_runs, select
    from btx_megatron.launch.local import LocalRunner
    from btx_megatron.launch.slurm import submit_slurm
    from btx_megatron.launch.status import status_of

    try:
        exp = load_experiment(args.experiment)
        plans = plan_runs(exp)
        if args.command == "status":
            for run in select(plans, args.only, lambda p: True):
                print(status_of(run).line())
            return 0
        runs = select(plans, args.only, lambda p: p.kind == "branch")
        if args.command == "plan":
            for run in runs:
                print(f"# {run.name}: {run.target_iters} iterations, {run.target_iters * run.tokens_per_iter:,} tokens")
                print(" ".join(["python -m", run.module, *run.trainer_argv(resume=False)]))
            return 0
        if not (args.local or args.slurm):
            raise ExperimentError("choose where to run: --local (this machine) or --slurm (sbatch).")
        if args.dry_run and not args.slurm:
            raise ExperimentError("--dry-run applies to --slurm.")
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ExperimentError("--max-concurrent must be >= 1.")
        problems = check_inputs(exp, runs)
        if problems and not args.dry_run:
            raise ExperimentError("nothing was started:\n  - " + "\n  - ".join(problems))
        for msg in problems:  # a dry run prints what a real submission would refuse
            print(f"warning: {msg}", file=sys.stderr)
        if args.slurm:
            submit_slurm(exp, runs, REPO_ROOT, args.dry_run)
            return 0
        results = LocalRunner(exp, max_concurrent=args.max_concurrent).run(runs)
    except ValueError as exc:
        print(f"launch_branches: error: {exc}", file=sys.stderr)
        return 2
    failed = {n: c for n, c in results.items() if c != 0}
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
