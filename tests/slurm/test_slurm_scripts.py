"""slurm/branch_math.sh and slurm/mix.sh, unmodified, under a simulated SLURM allocation.

The fake sbatch/srun/scontrol/squeue of tests/slurm/bin give the scripts what a real allocation
gives (SLURM_* variables, nodes on the loopback, signal forwarding, requeue); the scripts select a
tiny fp32 model on CPU only through the variables they document.

- Branch flow: the first start loads the seed with --finetune; SIGUSR1 (the script's
  ``#SBATCH --signal=B:USR1``) arrives mid-run, the trainer saves and exits 0, the script requeues
  the job; the restart (SLURM_RESTART_COUNT=1) resumes from the branch's own checkpoint and ends
  with weights bit-identical to an uninterrupted job's.
- Mix flow: 2 simulated nodes x 2 tasks, EP2 with the alltoall dispatcher, from a MoE merged by
  tools/merge_branches.py, to the end; in the slow tier also pre-empted once, requeued, finished.
  (Both scripts start, resume and requeue through slurm/train_job.sh, which the branch flow's
  pre-emption already runs in the default tier.)
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.slurm.slurm_harness import TINY_VARS, FakeCluster, read_model_tensors, train_records

BRANCH_ITERS = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    return FakeCluster(tmp_path_factory.mktemp("fake_slurm"))


def _branch_env(inputs, out_dir):
    return {
        **TINY_VARS,
        "SEED_CKPT": str(inputs["dense"]["seed"]), "OUT_DIR": str(out_dir), "DATA_DIR": str(inputs["data"]),
        "TOKENIZER_MODEL": str(inputs["tokenizer"]), "TRAIN_ITERS": str(BRANCH_ITERS), "VOCAB_SIZE": "600",
        # The script's layout: TP 2 with sequence parallelism, distributed optimizer, overlapped DDP.
        "MICRO_BATCH": "2", "GLOBAL_BATCH": "4", "SAVE_INTERVAL": "1000", "EVAL_INTERVAL": "1000",
    }


def test_branch_job_preempted_requeued_resumes_bit_exact(cluster, cluster_inputs, tmp_path):
    one_node = ("--nodes=1", "--ntasks-per-node=2")
    full_id = cluster.submit("slurm/branch_math.sh", *one_node, env=_branch_env(cluster_inputs, tmp_path / "full"))
    split_id = cluster.submit("slurm/branch_math.sh", *one_node, env=_branch_env(cluster_inputs, tmp_path / "split"))
    # Time limit ahead: SLURM signals the batch shell (B:USR1) while the trainer is mid-run.
    cluster.wait_for_output(split_id, r"iter 2/")
    assert cluster.signal(split_id) == "batch shell"
    full, split = cluster.wait(full_id), cluster.wait(split_id)

    assert full.state == "COMPLETED" and full.exit_codes == [0] and not full.requeues, full.output[-3000:]
    assert split.state == "COMPLETED", split.output[-3000:]
    # Saved and exited 0, requeued itself once, restarted with SLURM_RESTART_COUNT=1.
    assert split.exit_codes == [0, 0] and split.restarts == 1
    assert [r["restart_count"] for r in split.requeues] == [0] and split.requeues[0]["requeue_allowed"]
    assert "first start from the seed" in split.output
    assert "restart 1, resuming from" in split.output

    save = tmp_path / "split" / "branches" / "math" / "checkpoints"
    stop = int(re.search(r"restart 1, resuming from .* \(iteration (\d+)\)", split.output).group(1))
    assert 2 <= stop < BRANCH_ITERS, "the signal must have stopped the first start mid-run"
    assert [r["iteration"] for r in train_records(save)] == list(range(1, BRANCH_ITERS + 1))
    # One srun step per start, 2 tasks on the one node.
    assert [s["ntasks"] for s in split.steps] == [2, 2]
    assert [t["SLURM_LOCALID"] for t in split.steps[0]["tasks"]] == ["0", "1"]
    # The first start used the seed at iteration 0 (--finetune), the restart its own checkpoint.
    assert "--finetune" in split.steps[0]["command"] and str(cluster_inputs["dense"]["seed"]) in split.steps[0]["command"]
    assert "--finetune" not in split.steps[1]["command"]
    assert split.steps[1]["command"][split.steps[1]["command"].index("--load") + 1] == str(save)

    a = read_model_tensors(tmp_path / "full" / "branches" / "math" / "checkpoints")
    b = read_model_tensors(save)
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        assert torch.equal(a[key], b[key]), key


MIX_ITERS = 6


@pytest.mark.parametrize("preempt", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["to_the_end", "preempted"])
def test_mix_job_two_nodes_ep2_alltoall_from_merged_checkpoint(cluster, cluster_inputs, tmp_path, preempt):
    save = tmp_path / "mix"
    env = {
        **TINY_VARS, "MERGED": str(cluster_inputs["merged"]), "SAVE": str(save), "DATA": str(cluster_inputs["data"]),
        "TOKENIZER": str(cluster_inputs["tokenizer"]), "TRAIN_ITERS": str(MIX_ITERS), "EP": "2",
        "MICRO_BATCH": "2", "GLOBAL_BATCH": "8", "SAVE_INTERVAL": "1000", "EVAL_INTERVAL": "1000",
    }
    job_id = cluster.submit("slurm/mix.sh", "--nodes=2", "--ntasks-per-node=2", env=env)
    if preempt:
        cluster.wait_for_output(job_id, r"iter 2/")
        cluster.signal(job_id)
    job = cluster.wait(job_id)
    starts = 2 if preempt else 1
    assert job.state == "COMPLETED" and job.exit_codes == [0] * starts and job.restarts == starts - 1, job.output[-3000:]
    assert "TP 1 PP 1 EP 2" in job.output and "first start from the merged model" in job.output
    if preempt:
        assert "restart 1, resuming from" in job.output
        assert job.steps[1]["command"][job.steps[1]["command"].index("--load") + 1] == str(save)
    else:
        assert not job.requeues
    assert len(job.steps) == starts

    # 4 tasks in blocks over two nodes, each with its node's identity.
    for step in job.steps:
        placement = [(t["SLURM_PROCID"], t["SLURM_NODEID"], t["SLURM_LOCALID"], t["SLURMD_NODENAME"]) for t in step["tasks"]]
        assert placement == [("0", "0", "0", "btxsim1"), ("1", "0", "1", "btxsim1"),
                             ("2", "1", "0", "btxsim2"), ("3", "1", "1", "btxsim2")]
    assert "--moe-token-dispatcher-type" in job.steps[0]["command"]
    command = job.steps[0]["command"]
    assert command[command.index("--moe-token-dispatcher-type") + 1] == "alltoall"

    run_config = json.loads((save / "run_config.json").read_text())
    assert run_config["world_size"] == 4
    records = train_records(save)
    # One record per iteration across the starts, every loss finite.
    assert [r["iteration"] for r in records] == list(range(1, MIX_ITERS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    manifest = json.loads((save / f"iter_{MIX_ITERS:07d}" / "btx_checkpoint.json").read_text())
    assert manifest["btx"]["expert_names"] == ["math", "code", "wiki", "seed"]
    assert manifest["model"]["num_experts"] == 4
