"""Two-node torchrun, as the README's multi-node section writes it: two torchrun processes
(``--nnodes 2 --node-rank 0|1``, 2 processes each, static rendezvous on 127.0.0.1) train the
mix phase of a merged tiny MoE at EP2 with the alltoall dispatcher, and save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.slurm.slurm_harness import ROOT, TINY_MODEL_FLAGS, read_model_tensors, train_records

ITERS = 4


def test_torchrun_two_nodes_trains_and_saves_the_mix_phase(cluster_inputs, tmp_path):
    from btx_megatron.runtime.distributed import free_port

    save = tmp_path / "mix"
    port = free_port()
    trainer = [
        "-m", "btx_megatron.pretrain_mix", *TINY_MODEL_FLAGS,
        "--load", str(cluster_inputs["merged"]), "--save", str(save), "--mock-data",
        "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
        "--lr", "2e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    nodes = [
        subprocess.Popen([torchrun, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), *trainer],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=900)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{out[-4000:]}"

    run_config = json.loads((save / "run_config.json").read_text())
    assert run_config["world_size"] == 4
    records = train_records(save)
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert records[-1]["loss"] < records[0]["loss"], "the mix phase must learn"
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    manifest = json.loads((save / f"iter_{ITERS:07d}" / "btx_checkpoint.json").read_text())
    assert manifest["btx"]["expert_names"] == ["math", "code", "wiki", "seed"]
    # Every expert was trained: the saved experts differ from the merged ones.
    before, after = read_model_tensors(cluster_inputs["merged"]), read_model_tensors(save)
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert not torch_equal_rows(before[key], after[key])


def torch_equal_rows(a, b) -> bool:
    """True if any expert ([L, E, ...]) kept exactly its merged weights."""
    import torch

    return any(torch.equal(a[:, e], b[:, e]) for e in range(a.shape[1]))
