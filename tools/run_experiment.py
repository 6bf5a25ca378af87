"""Run a whole BTX experiment end to end: corpora, seed, branches, merge, mix, baselines,
evaluation, routing heatmaps and the results table.

    python tools/run_experiment.py examples/tiny/experiment.yaml                 # the built-in experiment
    python tools/run_experiment.py examples/tiny/experiment.yaml --output runs/x  # another run directory
    python tools/run_experiment.py EXP.yaml --stages corpora seed branches        # only these stages
    python tools/run_experiment.py EXP.yaml --scale test --output /tmp/btx-test   # minutes, for tests
    python tools/run_experiment.py EXP.yaml --router-variants sample-top1 soft    # more BTX rows

Re-running continues: finished stages whose outputs still validate are reused (OUT/stages.json);
a damaged or incomplete output is rebuilt. See btx_megatron/btx/pipeline.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def build_parser() -> argparse.ArgumentParser:
    from btx_megatron.btx.pipeline import STAGE_GROUPS, STAGES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("experiment", help="experiment YAML file (e.g. examples/tiny/experiment.yaml)")
    p.add_argument("--output", help="run directory (default: the experiment's output_dir)")
    p.add_argument("--data-dir", help="corpora directory (sets BTX_DATA_DIR for the experiment file)")
    p.add_argument("--stages", nargs="+", metavar="STAGE",
                   help=f"run only these stages ({', '.join(STAGES)}; {', '.join(STAGE_GROUPS)}); "
                        "the others must already be up to date")
    p.add_argument("--scale", choices=("tiny", "test"), default="tiny",
                   help="tiny: the experiment as written; test: the same stages shrunk to minutes")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary when the pipeline builds the corpora (default: the "
                        "experiment's corpora.vocab_size, else 8000; test scale 400)")
    p.add_argument("--tokens-per-domain", type=int, default=None,
                   help="corpora size when the pipeline builds them (default: the experiment's "
                        "corpora.tokens_per_domain, else 2M; test scale 20k)")
    p.add_argument("--router-variants", nargs="+", metavar="TYPE", default=None,
                   help="also mix the merged model with these router types (switch, sample-top1, soft) and "
                        "add them to the table (paper, Table 4)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="branches trained at a time (default: CPU cores or GPUs / processes per run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from btx_megatron.btx.pipeline import PipelineError, load_pipeline

    try:
        pipeline = load_pipeline(args.experiment, output=args.output, scale=args.scale, data_dir=args.data_dir,
                                 stages=args.stages, max_concurrent=args.max_concurrent,
                                 router_variants=args.router_variants, corpora_vocab_size=args.vocab_size,
                                 corpora_tokens_per_domain=args.tokens_per_domain)
        pipeline.run()
    except (ValueError, PipelineError) as exc:
        print(f"run_experiment: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
