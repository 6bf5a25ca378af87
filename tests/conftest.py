import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")

# `make test` runs two pytest workers, each taking whole files (`-n 2 --dist loadfile`: a file's
# module fixtures are built once) in collection order (`--no-loadscope-reorder`; xdist would
# otherwise sort files by their number of tests). The longest files start first, so that neither worker is left
# with a long one at the end while the other has nothing to do. Measured wall seconds of the
# default tier, longest first; every other file follows in its usual order.
LONGEST_FIRST = (
    "e2e/test_pipeline_e2e.py",
    "slurm/test_slurm_scripts.py",
    "training/test_fault_injection.py",
    "training/test_faults.py",
    "slurm/test_torchrun_multinode.py",
    "distributed/test_layouts.py",
    "distributed/test_cluster_paths.py",
    "mix/test_mix_phase.py",
    "training/test_bad_inputs.py",
    "eval/test_harness.py",
    "distributed/test_planner.py",
    "eval/test_routing_analysis.py",
    "eval/test_evaluation.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        path = Path(str(item.path)).resolve()
        try:
            name = path.relative_to(ROOT / "tests").as_posix()
        except ValueError:
            name = path.as_posix()
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: tests keep their order within a file and among the rest
