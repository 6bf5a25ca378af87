"""Run a sweep of an experiment file: several configurations, each over several random seeds,
sharing every stage they agree on, and write one table (mean ± std over seeds) with plots.

    python tools/run_sweep.py examples/tiny/sweep.yaml
    python tools/run_sweep.py examples/tiny/sweep.yaml --output runs/my-sweep --data-dir data/btx_corpora
    python tools/run_sweep.py examples/tiny/sweep.yaml --only shipped centroid   # a subset of the rows
    python tools/run_sweep.py examples/tiny/sweep.yaml --seeds 1234             # one of the seeds
    python tools/run_sweep.py examples/tiny/sweep.yaml --table-only             # the table of what has finished

Re-running continues: finished runs are reused. See btx_megatron/experiment/sweep.py for the
sweep file.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("sweep", help="sweep YAML file (e.g. examples/tiny/sweep.yaml)")
    p.add_argument("--output", help="sweep directory (default: the sweep file's output)")
    p.add_argument("--data-dir", help="corpora directory (sets BTX_DATA_DIR for the experiment file)")
    p.add_argument("--max-concurrent", type=int, default=None, help="training runs at a time")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations (the table covers them)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="run only these of the sweep's seeds")
    p.add_argument("--shared-runs", metavar="DIR",
                   help="where the shared seed/branch/baseline runs live (default: the file's shared_runs, else OUTPUT/runs)")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: write the table from the runs that have finished")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from btx_megatron.experiment.sweep import load_sweep, run_sweep

    try:
        summary = run_sweep(load_sweep(args.sweep, args.output, args.only, args.seeds, args.shared_runs), data_dir=args.data_dir,
                            max_concurrent=args.max_concurrent, table_only=args.table_only)
    except ValueError as exc:
        print(f"run_sweep: error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
