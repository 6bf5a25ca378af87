"""Same weights, same data: every parallel layout trains to the same losses (fp32, CPU, gloo)."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.distributed.workers import TINY_DENSE, TINY_MOE, train

STEPS = 10


@pytest.fixture(scope="module")
def dense_init(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense_init")
    run_distributed(train, 1, TINY_DENSE + ["--train-iters", "0", "--save", str(path)])
    return str(path)


@pytest.fixture(scope="module")
def moe_init(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe_init")
    run_distributed(train, 1, TINY_MOE + ["--train-iters", "0", "--save", str(path)])
    return str(path)


def _losses(world, argv, init):
    results = run_distributed(train, world, argv + ["--train-iters", str(STEPS), "--load", init, "--finetune"])
    # Every rank reports the same global loss.
    for r in results[1:]:
        assert r["losses"] == results[0]["losses"]
    return results[0]["losses"]


@pytest.fixture(scope="module")
def dense_reference(dense_init):
    losses = _losses(1, TINY_DENSE, dense_init)
    assert losses[-1] < losses[0] - 0.05, "reference run must learn for the comparison to mean anything"
    return losses


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2"],
        pytest.param(["--pipeline-model-parallel-size", "2"], marks=pytest.mark.slow),  # pp2-interleaved: default tier
        ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
        pytest.param([], marks=pytest.mark.slow),  # DP2 (dp2-distopt runs in the default tier)
        ["--use-distributed-optimizer"],  # DP2 with the distributed optimizer
    ],
    ids=["tp2", "pp2", "pp2-interleaved", "dp2", "dp2-distopt"],
)
def test_dense_layouts_match_single_process(layout, dense_init, dense_reference):
    losses = _losses(2, TINY_DENSE + layout, dense_init)
    assert losses == pytest.approx(dense_reference, rel=2e-5, abs=2e-5)


@pytest.fixture(scope="module")
def moe_reference(moe_init):
    losses = _losses(1, TINY_MOE, moe_init)
    assert losses[-1] < losses[0] - 0.05
    return losses


@pytest.mark.parametrize(
    "layout",
    [
        ["--expert-model-parallel-size", "2"],
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ],
    ids=["ep2", "tp2-sp"],
)
def test_moe_layouts_match_single_process(layout, moe_init, moe_reference):
    losses = _losses(2, TINY_MOE + layout, moe_init)
    assert losses == pytest.approx(moe_reference, rel=2e-5, abs=2e-5)
