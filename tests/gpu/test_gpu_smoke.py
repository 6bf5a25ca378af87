"""GPU path checks (skipped without CUDA): the same trainer on CUDA/NCCL, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_single_gpu_training_matches_cpu_reference_and_learns(tmp_path):
    from tests.dist_utils import run_distributed
    from tests.distributed.workers import TINY_DENSE, train

    fp32 = run_distributed(train, 1, TINY_DENSE + ["--train-iters", "8"])[0]["losses"]
    bf16 = run_distributed(train, 1, TINY_DENSE + ["--train-iters", "8", "--bf16"])[0]["losses"]
    assert fp32[-1] < fp32[0] - 0.05
    # bf16 follows fp32 closely on a tiny model.
    assert bf16 == pytest.approx(fp32, abs=5e-2)
