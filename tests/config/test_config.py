"""Flags, YAML option files and the errors users see before any compute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from btx_megatron.config import config_to_argv, parse_config
from btx_megatron.runtime.distributed import _first_slurm_host, read_launch_env

ROOT = Path(__file__).resolve().parents[2]
BASE = "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --vocab-size 256 --mock-data".split()


def test_flags_round_trip_through_config_to_argv():
    cfg, _ = parse_config(BASE + ["--swiglu", "--num-experts", "4", "--moe-router-type", "switch",
                                  "--eval-domain", "math=/d/math", "--eval-domain", "code=/d/code"])
    assert cfg.model.swiglu and cfg.model.num_experts == 4
    assert cfg.model.moe_expert_capacity_factor == 1.5  # the paper's Switch setting
    assert cfg.data.eval_domains == {"math": ["/d/math"], "code": ["/d/code"]}
    again, _ = parse_config(config_to_argv(cfg))
    assert again == cfg


def test_yaml_options_with_flag_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layers: 8\nhidden_size: 128\nvocab-size: 512\nnum-attention-heads: 4\nmock-data: true\nlr: 0.001\n")
    cfg, _ = parse_config(["--config", str(path), "--lr", "0.002"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.vocab_size) == (8, 128, 512)
    assert cfg.train.lr == 0.002 and cfg.data.mock_data


def test_yaml_unknown_option_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layer: 8\n")
    with pytest.raises(ValueError, match="unknown option 'num-layer'"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
        (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
        (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2, "--num-experts 3 is not divisible by --expert-model-parallel-size 2"),
        (["--tensor-model-parallel-size", "2"], 3, "World size 3 is not divisible"),
        (["--global-batch-size", "3"], 2, "--global-batch-size 3 is not divisible"),
        (["--expert-model-parallel-size", "2"], 2, "needs an MoE model"),
    ],
)
def test_layouts_that_do_not_divide(extra, world, message):
    cfg, _ = parse_config(BASE + extra)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        cfg.validate_layout(world)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-experts", "2", "--moe-router-topk", "3"], "--moe-router-topk 3 must be between 1 and --num-experts 2"),
        (["--num-experts", "4", "--moe-router-type", "soft", "--moe-expert-capacity-factor", "1.0"], "remove --moe-expert-capacity-factor"),
        (["--num-experts", "4", "--tensor-model-parallel-size", "2"], "need --sequence-parallel"),
        (["--sequence-parallel"], "needs --tensor-model-parallel-size > 1"),
        (["--fp8-format", "hybrid"], "add --bf16"),
        (["--bf16", "--fp16"], "Choose one of --bf16 and --fp16"),
        (["--freeze-experts"], "apply to MoE models"),
    ],
)
def test_static_option_errors(extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_config(BASE + extra)


def _run_pretrain(args, cwd):
    return subprocess.run([sys.executable, "-m", "btx_megatron.pretrain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})


def _main_in_process(args, capsys) -> tuple[int, str]:
    from btx_megatron.pretrain import main

    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def test_entrypoint_refuses_bad_paths_before_compute(tmp_path, capsys):
    # --load at nothing: the real command line exits 2 with the reason.
    out = _run_pretrain(BASE + ["--load", str(tmp_path / "missing")], ROOT)
    assert out.returncode == 2 and "--load" in out.stderr and "does not exist" in out.stderr
    # The rest through the same entrypoint in this process (no interpreter start-up per case).
    # --load at a directory that is not a checkpoint
    (tmp_path / "notckpt").mkdir()
    code, err = _main_in_process(BASE + ["--load", str(tmp_path / "notckpt")], capsys)
    assert code == 2 and "not a btx-megatron checkpoint" in err
    # --save pointing at another run's checkpoints without --load
    other = tmp_path / "other"
    other.mkdir()
    (other / "latest_checkpointed_iteration.txt").write_text("5\n")
    code, err = _main_in_process(BASE + ["--save", str(other)], capsys)
    assert code == 2 and "already holds checkpoints" in err and "--overwrite-save" in err
    # FP8 without Transformer Engine
    code, err = _main_in_process(BASE + ["--bf16", "--fp8-format", "hybrid"], capsys)
    assert code == 2 and "Transformer Engine" in err
    # Nothing was written by any of these.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notckpt", "other"]
    assert list((tmp_path / "notckpt").iterdir()) == []


def test_launch_env_from_torchrun_and_srun():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (3, 8, 1, "n1", 1234, "torchrun")
    env = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[012-013]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (9, 16, 1, "gpu012", "srun")
    assert env.master_port == 20000 + 4242
    assert _first_slurm_host("a17,b[1-2]") == "a17"
