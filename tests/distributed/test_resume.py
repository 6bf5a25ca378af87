"""Checkpoints: exact resume, resharding across layouts, and crash safety of saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from btx_megatron import checkpoint as fmt
from tests.dist_utils import run_distributed
from tests.distributed.workers import TINY_DENSE, TINY_MOE, train

ROOT = Path(__file__).resolve().parents[2]


def _weights(ckpt_root: str) -> dict[str, torch.Tensor]:
    """Model tensors of the latest checkpoint, read with PyTorch's own DCP reader."""
    ckpt_dir, _ = fmt.resolve(ckpt_root)
    out = Path(ckpt_root) / "consolidated.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith(("decoder.", "embedding.", "output_layer."))}


@pytest.mark.slow  # the fault-injection chains prove bit-exact resume in the default tier
@pytest.mark.parametrize(
    "model", [TINY_DENSE, TINY_MOE + ["--expert-model-parallel-size", "2"]], ids=["dense_dp2", "moe_ep2"]
)
def test_resume_is_bit_exact_with_distributed_optimizer(tmp_path, model):
    # --exit-interval stops the first job like a preemption would: the LR schedule (sized by
    # --train-iters) is the same in all three runs, so only the checkpoint can make them differ.
    argv = model + ["--use-distributed-optimizer", "--save-interval", "100", "--train-iters", "6"]
    full = run_distributed(train, 2, argv + ["--save", str(tmp_path / "full")])[0]
    first = run_distributed(train, 2, argv + ["--exit-interval", "3", "--save", str(tmp_path / "split")])[0]
    second = run_distributed(train, 2, argv + ["--save", str(tmp_path / "split"), "--load", str(tmp_path / "split")])[0]
    assert first["iteration"] == 3 and second["iteration"] == 6
    # Two steps after the resume depend on the restored Adam moments, step and fp32 main params.
    assert first["losses"] + second["losses"] == full["losses"]  # bit-identical floats
    a, b = _weights(str(tmp_path / "full")), _weights(str(tmp_path / "split"))
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory):
    """3 steps at TP1/PP1 saved, and the uninterrupted continuation to 5 steps."""
    base = tmp_path_factory.mktemp("reshard")
    argv = TINY_DENSE + ["--save-interval", "3"]
    run_distributed(train, 1, argv + ["--train-iters", "3", "--save", str(base / "ckpt")])
    reference = run_distributed(
        train, 1, argv + ["--train-iters", "5", "--load", str(base / "ckpt"), "--save", str(base / "ref")]
    )[0]
    return base, reference["losses"]


@pytest.mark.slow  # three more 2-process runs; the default tier reshards weights (tests/merge/test_edit.py: EP1 -> EP2)
@pytest.mark.parametrize(
    "layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]], ids=["tp2", "pp2"]
)
def test_checkpoint_reshards_to_other_layouts(tp1_run, layout, tmp_path):
    base, reference = tp1_run
    resumed = run_distributed(
        train, 2,
        TINY_DENSE + layout + ["--train-iters", "5", "--load", str(base / "ckpt"), "--save", str(tmp_path / "out")],
    )[0]
    assert resumed["iteration"] == 5
    # Weights, optimizer state and scheduler all resharded: the next steps match.
    assert resumed["losses"] == pytest.approx(reference, rel=2e-5, abs=2e-5)


@pytest.mark.slow  # an error path of a 2-process run
def test_dp_reshardable_optimizer_state_refuses_layout_change(tmp_path):
    argv = TINY_DENSE + ["--use-distributed-optimizer"]
    run_distributed(train, 2, argv + ["--train-iters", "1", "--save", str(tmp_path / "a")])
    with pytest.raises(AssertionError, match="--no-load-optim"):
        run_distributed(train, 2, argv + ["--tensor-model-parallel-size", "2", "--train-iters", "2",
                                          "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b")])
    # The suggested fix works.
    out = run_distributed(train, 2, argv + ["--tensor-model-parallel-size", "2", "--train-iters", "2", "--no-load-optim",
                                            "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b")])[0]
    assert out["iteration"] == 2


@pytest.mark.slow  # three 2-process runs (81 s); the default tier reshards weights in tests/merge/test_edit.py
def test_fully_reshardable_optimizer_state_changes_layout(tmp_path):
    argv = TINY_DENSE + ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]
    run_distributed(train, 2, argv + ["--train-iters", "3", "--save", str(tmp_path / "a")])
    ref = run_distributed(train, 2, argv + ["--train-iters", "5", "--load", str(tmp_path / "a"), "--save", str(tmp_path / "r")])[0]
    moved = run_distributed(train, 2, argv + ["--tensor-model-parallel-size", "2", "--train-iters", "5",
                                              "--load", str(tmp_path / "a"), "--save", str(tmp_path / "m")])[0]
    assert moved["losses"] == pytest.approx(ref["losses"], rel=2e-5, abs=2e-5)


HANG_SAVE = """
import sys, time
import btx_megatron.checkpoint as fmt
original = fmt.publish
def publish(staging, root, iteration):
    if iteration == 4:
        print("SAVE-IN-PROGRESS", flush=True)
        time.sleep(600)
    return original(staging, root, iteration)
fmt.publish = publish
from btx_megatron.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # tests/training/test_fault_injection.py kills saves in the default tier
def test_save_killed_midway_never_becomes_latest(tmp_path):
    save = tmp_path / "run"
    argv = TINY_DENSE + ["--train-iters", "6", "--save-interval", "2", "--save", str(save)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", HANG_SAVE, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            if "SAVE-IN-PROGRESS" in line or time.time() > deadline:
                break
        # The iteration-4 files are fully written to staging; the process dies before publishing.
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert fmt.read_tracker(save) == 2
    assert not fmt.iteration_dir(save, 4).exists()
    assert list(save.glob(".staging-iter_0000004-*")), "the interrupted save should be in staging"
    # Restarting resumes from iteration 2 and cleans the stale staging directory.
    resumed = run_distributed(train, 1, argv + ["--load", str(save)])[0]
    assert resumed["iteration"] == 6 and len(resumed["losses"]) == 4
    assert not list(save.glob(".staging-*"))
    assert fmt.read_tracker(save) == 6
