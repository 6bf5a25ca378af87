"""Run a whole BTX experiment end to end: corpora, seed, branches, merge, mix, baselines,
evaluation, routing heatmaps and the results table.

    python tools/run_experiment.py examples/tiny/experiment.yaml                 # the built-in experiment
    python tools/run_experiment.py examples/tiny/experiment.yaml --output runs/x  # another run directory
    python tools/run_experiment.py EXP.yaml --stages corpora seed branches        # only these stages
    python tools/run_experiment.py EXP.yaml --set mix.train_iters=300 --set branch_defaults.train.lr=3e-4
    python tools/run_experiment.py EXP.yaml --overrides small.yaml                # many --set at once
    python tools/run_experiment.py EXP.yaml --router-variants sample-top1 soft    # more BTX rows
    python tools/run_experiment.py EXP.yaml --stages grow                          # + a domain, - a domain

Re-running continues: finished stages whose outputs still validate are reused (OUT/stages.json);
a damaged or incomplete output is rebuilt. SIGTERM/SIGINT reach the running stage, which saves
and exits; run the same command again to continue. See btx_megatron/experiment/pipeline.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    from btx_megatron.experiment import OPTIONAL_STAGES, STAGE_GROUPS, STAGES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("experiment", help="experiment YAML file (e.g. examples/tiny/experiment.yaml)")
    p.add_argument("--output", help="run directory (default: the experiment's output_dir)")
    p.add_argument("--data-dir", help="corpora directory (sets BTX_DATA_DIR for the experiment file)")
    p.add_argument("--stages", nargs="+", metavar="STAGE",
                   help=f"run only these stages ({', '.join(STAGES)}; {', '.join(STAGE_GROUPS)}); "
                        "the others must already be up to date. Optional, run only when named: "
                        f"{', '.join(OPTIONAL_STAGES)} (grow: add a fourth domain to the finished BTX model "
                        "and remove domains again, btx_megatron/experiment/grow.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="overrides",
                   help="override one value of the experiment file (YAML value; domains by name: "
                        "domains.math.train_iters=100); repeatable")
    p.add_argument("--overrides", dest="overrides_file", metavar="FILE",
                   help="YAML mapping of KEY.PATH: VALUE overrides, applied before --set")
    p.add_argument("--router-variants", nargs="+", metavar="TYPE", default=None,
                   help="also mix the merged model with these router types (switch, sample-top1, soft) and "
                        "add them to the table (paper, Table 4)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="training runs at a time (default: CPU cores or GPUs / processes per run)")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
    from btx_megatron.config.experiment import ExperimentError
    from btx_megatron.config.experiment_file import parse_override, read_experiment_document

    overrides: dict = {}
    if args.overrides_file:
        overrides.update(read_experiment_document(args.overrides_file))
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key] = value
    if any(not isinstance(k, str) for k in overrides):
        raise ExperimentError(f"--overrides {args.overrides_file}: keys must be dotted paths (KEY.PATH: VALUE).")
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from btx_megatron.experiment import PipelineError, load_pipeline

    try:
        pipeline = load_pipeline(args.experiment, output=args.output, data_dir=args.data_dir,
                                 overrides=overrides_from_args(args), stages=args.stages,
                                 max_concurrent=args.max_concurrent, router_variants=args.router_variants)
        pipeline.run()
    except ValueError as exc:  # a user error (the experiment file, --set, --output): nothing was run
        print(f"run_experiment: error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"run_experiment: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
