"""Experiment-file validation, bad inputs and the SLURM scripts (fast: no training)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.launch.branch_testlib import DOMAINS, ROOT, TINY_MODEL, tiny_experiment, write_yaml

from btx_megatron.launch import local as launch_local
from btx_megatron.launch import plan as launcher
from btx_megatron.launch import slurm as launch_slurm
from btx_megatron.config.experiment import ExperimentError
from btx_megatron.config.experiment_file import load_experiment, parse_experiment

import importlib.util

_spec = importlib.util.spec_from_file_location("launch_branches", ROOT / "tools" / "launch_branches.py")
launch_branches = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_branches)


def fake_corpora(root: Path) -> Path:
    """Files that pass the existence checks (the launcher does not read them before starting)."""
    (root / "data").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.model").write_bytes(b"")
    for d in DOMAINS:
        for split in ("train", "valid"):
            for ext in (".bin", ".idx"):
                (root / "data" / f"{d}_{split}{ext}").write_bytes(b"")
    return root


def fake_seed(root: Path, **model_changes) -> Path:
    """A checkpoint ROOT with a manifest (enough for the shape check)."""
    from btx_megatron.config.model import ModelConfig
    import dataclasses

    model = dataclasses.asdict(ModelConfig(**{**TINY_MODEL, "vocab_size": 512, **model_changes}))
    it = root / "iter_0000020"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text("{}")
    (it / "btx_checkpoint.json").write_text(json.dumps({"format_version": 1, "iteration": 20, "kind": "dense",
                                                        "model": model}))
    (root / "latest_checkpointed_iteration.txt").write_text("20\n")
    return root


@pytest.fixture()
def setup(tmp_path):
    corpora = fake_corpora(tmp_path / "corpora")
    seed = fake_seed(tmp_path / "seed")
    exp = tiny_experiment(corpora, tmp_path / "out", seed_checkpoint=str(seed))
    exp["model"]["vocab_size"] = 512
    return tmp_path, exp


def run_main(tmp_path, exp, *args, capsys=None):
    path = write_yaml(tmp_path / "exp.yaml", exp)
    return launch_branches.main([str(path), *args])


# ------------------------------------------------------------------------------------------ schema

def test_example_experiment_loads_and_plans(monkeypatch, tmp_path):
    monkeypatch.setenv("BTX_DATA_DIR", str(tmp_path / "corpora"))
    monkeypatch.setenv("BTX_RUN_DIR", str(tmp_path / "run"))
    exp = load_experiment(ROOT / "examples" / "tiny" / "experiment.yaml")
    plans = launcher.plan_runs(exp)
    assert list(plans) == ["seed", "math", "code", "wiki", "mix", "upcycling", "dense"]
    for d in DOMAINS:
        p = plans[d]
        assert p.init_checkpoint == str(tmp_path / "run" / "seed" / "checkpoints")
        assert p.save_dir == tmp_path / "run" / "branches" / d / "checkpoints"
        assert p.config.data.data_path == [str(tmp_path / "corpora" / "data" / f"{d}_train")]
        assert p.start_args(resume=False) == ["--load", p.init_checkpoint, "--finetune"]
        assert p.start_args(resume=True) == ["--load", str(p.save_dir)]
    # Dense baseline (launched alone, without the pipeline's FLOP budget): the mix data, as many
    # tokens as the branches and the mix phase together.
    dense = plans["dense"]
    assert dense.target_iters == sum(plans[d].target_iters for d in DOMAINS) + plans["mix"].target_iters
    assert dense.blend == plans["mix"].blend == exp.mix_blend()
    # The mix blend: the example's 27/27/27 % domains plus the 19 % seed share spread over the seed's data.
    mix = exp.mix_blend()
    assert abs(sum(b.weight for b in mix) - 1.0) < 1e-9
    assert abs(sum(b.weight for b in mix if "math_train" in b.prefix) - (0.27 + 0.19 / 3)) < 1e-9


def test_token_budget_becomes_iterations(setup):
    tmp_path, exp = setup
    exp["domains"][0].pop("train_iters")
    exp["domains"][0]["tokens"] = 4000  # 8 x 64 = 512 tokens per step -> ceil(7.8) = 8
    plans = launcher.plan_runs(parse_experiment(exp))
    assert plans["math"].target_iters == 8
    exp["domains"][0]["train"] = {"lr": 5e-4}
    plans = launcher.plan_runs(parse_experiment(exp))
    assert plans["math"].config.train.lr == 5e-4 and plans["code"].config.train.lr == 2e-3


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.update(nmae="x"), "unknown key(s) nmae"),
    (lambda e: e["domains"][1]["train"].update(lrr=1) if "train" in e["domains"][1] else e["domains"][1].update(train={"lrr": 1}),
     "domains[1] (code).train.lrr"),
    (lambda e: e["model"].update(num_layer=3), "model.num_layer"),
    (lambda e: e["domains"][0].pop("eval_data"), "domains[0] (math): missing required field 'eval_data'"),
    (lambda e: e["domains"][2].pop("train_iters"), "missing the token budget"),
    (lambda e: e["domains"][1].update(name="math"), "math appear more than once"),
    (lambda e: [d.update(output_dir="/tmp/same-dir") for d in e["domains"][:2]], "both write to /tmp/same-dir"),
    (lambda e: e["branch_defaults"]["checkpoint"].update(save="/x"), "set by the launcher"),
    (lambda e: e["mix"]["data"].update(poetry=1.0), "mix.data.poetry"),
    (lambda e: e.update(corpora={"vocab": 2048}), "corpora.vocab"),
    (lambda e: e.update(corpora={"vocab_size": -5}), "corpora.vocab_size"),
])
def test_bad_experiment_is_rejected_with_the_key_path(setup, mutate, message):
    tmp_path, exp = setup
    mutate(exp)
    with pytest.raises(ExperimentError) as err:
        launcher.plan_runs(parse_experiment(exp, "exp.yaml"))
    assert message in str(err.value)


def test_bad_inputs_stop_before_anything_starts(setup, capsys):
    tmp_path, exp = setup
    # A missing data prefix.
    exp["domains"][1]["data"] = str(tmp_path / "corpora" / "data" / "nope_train")
    assert run_main(tmp_path, exp, "--local") == 2
    err = capsys.readouterr().err
    assert "nothing was started" in err and "nope_train does not exist" in err
    assert not (tmp_path / "out").exists()


def test_seed_of_another_shape_is_refused(tmp_path, capsys):
    corpora = fake_corpora(tmp_path / "corpora")
    seed = fake_seed(tmp_path / "seed", hidden_size=96, ffn_hidden_size=128)
    exp = tiny_experiment(corpora, tmp_path / "out", seed_checkpoint=str(seed))
    exp["model"]["vocab_size"] = 512
    assert run_main(tmp_path, exp, "--local") == 2
    err = capsys.readouterr().err
    assert "does not match the experiment's model section" in err and "hidden_size: seed 96 vs experiment 64" in err
    assert not (tmp_path / "out").exists()


def test_missing_seed_suggests_pretraining_it(tmp_path, capsys):
    corpora = fake_corpora(tmp_path / "corpora")
    exp = tiny_experiment(corpora, tmp_path / "out")
    assert run_main(tmp_path, exp, "--local") == 2
    err = capsys.readouterr().err
    assert "--local --only seed" in err


def test_sbatch_missing_is_a_clear_error(setup, capsys, monkeypatch):
    tmp_path, exp = setup
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert run_main(tmp_path, exp, "--slurm") == 2
    err = capsys.readouterr().err
    assert "`sbatch` is not on PATH" in err and "Nothing was submitted" in err
    assert not (tmp_path / "out").exists()


def test_slurm_submission_with_a_fake_sbatch(setup, capsys, monkeypatch):
    tmp_path, exp = setup
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bindir / "sbatch"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\nbash -n "$1" || exit 9\necho "Submitted batch job 4242"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert run_main(tmp_path, exp, "--slurm", "--only", "code", "--only", "dense") == 0
    submitted = log.read_text().split("\n")
    assert submitted[:2] == [str(tmp_path / "out" / "branches" / "code" / "branch.sbatch"),
                             str(tmp_path / "out" / "baselines" / "dense" / "branch.sbatch")]
    assert json.loads((tmp_path / "out" / "branches" / "code" / "slurm.json").read_text())["job_id"] == "4242"
    capsys.readouterr()
    monkeypatch.setenv("PATH", str(bindir))  # no squeue: state from the submission record
    assert run_main(tmp_path, exp, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[0]: line for line in lines}
    assert "submitted" in status["code"] and "slurm job 4242" in status["code"]
    assert status["math"].split()[1] == "pending"


# ------------------------------------------------------------------------------------------ SLURM

def test_dry_run_prints_the_expected_sbatch_jobs(monkeypatch, tmp_path):
    env = {**os.environ, "BTX_DATA_DIR": str(tmp_path / "corpora"), "BTX_RUN_DIR": str(tmp_path / "run"),
           "PATH": os.path.dirname(shutil.which("python") or "/usr/bin") + ":/usr/bin:/bin"}
    out = subprocess.run([launch_branches.sys.executable, str(ROOT / "tools" / "launch_branches.py"),
                          str(ROOT / "examples" / "tiny" / "experiment.yaml"), "--slurm", "--dry-run"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    run = tmp_path / "run"
    commands = [line for line in text.splitlines() if line.startswith("$ ")]
    assert commands == [f"$ sbatch {run}/branches/{d}/branch.sbatch" for d in DOMAINS]
    # Dry run: data and seed are missing here, which is reported, and nothing is written.
    assert "warning:" in out.stderr and not run.exists()
    scripts = re.split(r"^----- .* -----$", text, flags=re.M)[1:]
    assert len(scripts) == 3
    for d, script in zip(DOMAINS, scripts):
        script = script.split("\n$ ")[0]
        lines = script.splitlines()
        for expected in [
            f"#SBATCH --job-name=btx-tiny-btx-{d}", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
            "#SBATCH --gpus-per-node=1", "#SBATCH --time=02:00:00", "#SBATCH --signal=B:USR1@300",
            "#SBATCH --requeue", f"#SBATCH --output={run}/branches/{d}/logs/slurm-%j.out",
            f"SAVE={run}/branches/{d}/checkpoints", f"INIT_CHECKPOINT={run}/seed/checkpoints   # first start only (seed or merged model)",
                "TRAINER_MODULE=btx_megatron.pretrain",
            "TRAIN_ITERS=250", "    --train-iters 250", f"    --data-path {tmp_path}/corpora/data/{d}_train",
            f"    --save {run}/branches/{d}/checkpoints", "    --num-layers 4", "    --seq-length 128",
            "    --lr 0.001", "    --global-batch-size 32",
            'source "$BTX_ROOT/slurm/branch.sbatch"',
        ]:
            assert expected in lines, (expected, script)
        for array in launch_slurm.ARRAY_ORDER:
            assert any(line.startswith(f"{array}=(") for line in lines), array
        # The start mode is decided by the shared script (seed + --finetune, or own --save).
        assert not [line for line in lines if line.strip().startswith(("--finetune", "--load"))]
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_slurm_scripts_are_valid_bash_and_use_the_paper_recipe():
    # branch.sbatch builds the flag arrays; slurm/train_job.sh (sourced) is the run logic.
    shared = (ROOT / "slurm" / "branch.sbatch").read_text() + (ROOT / "slurm" / "train_job.sh").read_text()
    for name in ("branch.sbatch", "branch_math.sh", "branch_code.sh", "branch_wiki.sh", "train_job.sh", "mix.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "slurm" / name)], check=True)
    for needle in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "CUDA_DEVICE_MAX_CONNECTIONS=1",
                   "--fp8-format hybrid", "--use-distributed-optimizer",
                   '--lr "${LR:-1e-4}" --min-lr "${MIN_LR:-1e-5}" --lr-warmup-iters "${WARMUP_ITERS:-100}"',
                   '--global-batch-size "${GLOBAL_BATCH:-1024}"', '--seq-length "${SEQ_LENGTH:-4096}"', "--weight-decay 0.1",
                   'START_ARGS=(--load "$SAVE")', 'FIRST_START_ARGS=(--finetune)', "scontrol requeue",
                   'kill -USR1 "$SRUN_PID"', "srun "):
        assert needle in shared, needle
    for d in DOMAINS:
        wrapper = (ROOT / "slurm" / f"branch_{d}.sh").read_text()
        assert wrapper.splitlines()[3].strip().startswith(f"#   sbatch --account=ACCOUNT --partition=PARTITION slurm/branch_{d}.sh")
        assert f"DOMAIN={d}" in wrapper and 'source "$BTX_ROOT/slurm/branch.sbatch"' in wrapper


def test_shared_script_first_start_then_requeue(tmp_path):
    """Run slurm/branch.sbatch with stub srun/scontrol: the first start loads the seed with
    --finetune; after a signal and a save it requeues; the next start resumes from --save."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    save = tmp_path / "out" / "branches" / "math" / "checkpoints"
    # srun stub: records its argv, waits for USR1 (forwarded by the trap), "saves" iteration 7, exits 0.
    (bindir / "srun").write_text(
        "#!/bin/bash\n"
        f'echo "srun $*" >> {calls}\n'
        f"trap 'mkdir -p {save}; echo 7 > {save}/latest_checkpointed_iteration.txt; exit 0' USR1\n"
        f"touch {tmp_path}/srun-started\n"
        "for i in $(seq 100); do sleep 0.1; done; exit 0\n")
    (bindir / "scontrol").write_text(
        f'#!/bin/bash\nif [[ $1 == show ]]; then echo node001; else echo "scontrol $*" >> {calls}; fi\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "node001",
           "DOMAIN": "math", "DATA_PATH": "1.0 /d/math", "EVAL_DATA": "/d/math_valid", "SEED_CKPT": "/ckpt/seed",
           "OUT_DIR": str(tmp_path / "out"), "TOKENIZER_MODEL": "/t.model", "TRAIN_ITERS": "10"}
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "branch.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    import time

    for _ in range(200):
        if (tmp_path / "srun-started").exists():
            break
        time.sleep(0.05)
    proc.send_signal(__import__("signal").SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    first, requeue = calls.read_text().splitlines()
    assert "--load /ckpt/seed --finetune" in first and "--train-iters 10" in first
    assert "--data-path 1.0 /d/math" in first and "--eval-domain math=/d/math_valid" in first
    assert requeue == "scontrol requeue 99"
    # Second start (the requeued job): resumes the branch's own checkpoints, no --finetune.
    (tmp_path / "srun-started").unlink()
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "branch.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    second = calls.read_text().splitlines()[2]
    assert f"--load {save}" in second and "--finetune" not in second
    assert "resuming from" in proc.stdout


def test_local_runner_restarts_a_run_that_lost_its_port(tmp_path, monkeypatch):
    """The port is checked free before start but bound by the trainer seconds later; a run that
    fails on EADDRINUSE before training is restarted on a new port (each run keeps its own)."""
    import socket
    import sys
    import types

    from btx_megatron.config.experiment import Launch

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = held.getsockname()[1]
    ports = iter([busy])
    real_free_port = launch_local.free_port
    monkeypatch.setattr(launch_local, "free_port", lambda taken: next(ports, None) or real_free_port(taken))
    # Stand-in trainer: binds MASTER_PORT like torch's TCPStore, then "trains" one iteration.
    script = ("import os, socket, sys\n"
              "s = socket.socket()\n"
              "try:\n    s.bind(('127.0.0.1', int(os.environ['MASTER_PORT'])))\n"
              "except OSError:\n    print('EADDRINUSE'); sys.exit(1)\n"
              "print('[pretrain] iter 1/1', os.environ['MASTER_PORT'])\n")

    fake_trainer = tmp_path / "fake_trainer.py"
    fake_trainer.write_text(script)

    def plan(name):
        run_dir = tmp_path / name
        return types.SimpleNamespace(
            name=name, run_dir=run_dir, save_dir=run_dir / "checkpoints", launch=Launch(1, 1), init_checkpoint=None,
            target_iters=1, local_command=lambda port, python, resume: [sys.executable, str(fake_trainer)],
            resolved=lambda exp: {"run": name})

    runs = [plan("a"), plan("b")]
    echoed = []
    results = launch_local.LocalRunner(exp=None, max_concurrent=2, echo=echoed.append, poll_s=0.05).run(runs)
    held.close()
    assert results == {"a": 0, "b": 0}, echoed
    assert any(f"port {busy} was taken" in line for line in echoed)
    log_a = (tmp_path / "a" / "logs" / "train.log").read_text()
    assert log_a.count("===== attempt") == 2 and "EADDRINUSE" in log_a
    final_ports = {json.loads((tmp_path / n / "launch.json").read_text())["master_port"] for n in "ab"}
    assert busy not in final_ports and len(final_ports) == 2


def test_corpora_section_sets_the_pipeline_corpora_and_set_overrides_it(setup):
    from btx_megatron.experiment import load_pipeline

    tmp_path, exp = setup
    exp["corpora"] = {"vocab_size": 2048, "tokens_per_domain": 3_000_000}
    path = write_yaml(tmp_path / "exp.yaml", exp)
    pipe = load_pipeline(str(path), echo=lambda _: None)
    assert (pipe.exp.corpora.vocab_size, pipe.exp.corpora.tokens_per_domain) == (2048, 3_000_000)
    pipe = load_pipeline(str(path), echo=lambda _: None, overrides={"corpora.vocab_size": 1024})
    assert (pipe.exp.corpora.vocab_size, pipe.exp.corpora.tokens_per_domain) == (1024, 3_000_000)


def test_set_overrides_address_domains_by_name_and_are_validated(setup):
    from btx_megatron.config.experiment_file import apply_overrides, parse_override

    tmp_path, exp = setup
    key, value = parse_override("domains.wiki.train_iters=7")
    raw = apply_overrides(exp, {key: value, "branch_defaults.train.lr": 3e-4, "mix.train_iters": None})
    assert raw["domains"][2]["train_iters"] == 7 and exp["domains"][2]["train_iters"] == 40  # a copy
    assert raw["branch_defaults"]["train"]["lr"] == 3e-4 and "train_iters" not in raw["mix"]
    parsed = parse_experiment(raw)
    assert parsed.domain("wiki").budget.train_iters == 7
    with pytest.raises(ExperimentError, match=r"branch_defaults.train.lrr"):
        parse_experiment(apply_overrides(exp, {"branch_defaults.train.lrr": 1.0}))
    with pytest.raises(ExperimentError, match="no list item 'poetry'"):
        apply_overrides(exp, {"domains.poetry.train_iters": 3})
    with pytest.raises(ExperimentError, match="expected KEY.PATH=VALUE"):
        parse_override("lr")


def test_every_run_kind_has_one_plan_and_one_config_builder(setup):
    """Seed, branches, dense, mix (+ router variants) and upcycling: one RunPlan each; MoE runs
    start with the mix entrypoint from the merged (or upcycled) model."""
    from btx_megatron.launch.plan import plan_runs

    tmp_path, exp = setup
    plans = plan_runs(parse_experiment(exp), router_variants=["soft", "topk"])
    assert {n: p.kind for n, p in plans.items()} == {
        "math": "branch", "code": "branch", "wiki": "branch", "mix": "mix", "mix:soft": "mix",
        "upcycling": "upcycling", "dense": "dense"}
    mix = plans["mix"]
    assert mix.module == "btx_megatron.pretrain_mix" and mix.config.model.num_experts == 4
    assert mix.start_args(resume=False) == ["--load", str(tmp_path / "out" / "merged")]
    assert mix.start_args(resume=True) == ["--load", str(mix.save_dir)]
    assert plans["mix:soft"].config.model.moe_router_type == "soft"
    assert plans["upcycling"].init_checkpoint.endswith("baselines/upcycled")
    assert plans["math"].start_args(resume=False)[-1] == "--finetune"
    # The dense baseline sees the mix data; without a FLOP budget, the tokens of branches + mix.
    dense = plans["dense"]
    assert dense.config.data.data_path == mix.config.data.data_path
    tokens = sum(plans[d].target_iters * plans[d].tokens_per_iter for d in DOMAINS) + mix.target_iters * mix.tokens_per_iter
    assert dense.target_iters == -(-tokens // dense.tokens_per_iter)
    flops = plan_runs(parse_experiment(exp), dense_flops=1e12)["dense"]
    assert flops.target_iters != dense.target_iters


def test_with_shared_runs_the_upcycled_model_and_its_run_are_shared_like_the_branches(setup, tmp_path):
    """In a sweep, configurations that differ only in the BTX merge get the same upcycled model and
    upcycling run (trained once); another mix phase shares the upcycled model, not the run; another
    upcycling recipe gets its own."""
    from btx_megatron.config.experiment_file import apply_overrides
    from btx_megatron.launch.plan import plan_runs

    _, exp = setup
    shared = tmp_path / "shared"

    def upcycling(**overrides):
        plan = plan_runs(parse_experiment(apply_overrides(exp, {"shared_runs_dir": str(shared), **overrides})))["upcycling"]
        return Path(plan.init_checkpoint), plan.run_dir

    upcycled, run = upcycling()
    assert upcycled.parent == shared and upcycled.name.startswith("upcycled-")
    assert run.parent == shared and run.name.startswith("upcycling-")
    assert upcycling(**{"merge.router_init": "centroid", "merge.method": "blend"}) == (upcycled, run)
    # Upcycling copies the seed into as many experts as BTX has, unless told how many.
    assert upcycling(**{"merge.with_seed_expert": False})[0] != upcycled
    assert upcycling(**{"merge.with_seed_expert": False, "baselines.upcycling.num_experts": 4}) == (upcycled, run)
    other_mix = upcycling(**{"mix.train_iters": 7})
    assert other_mix[0] == upcycled and other_mix[1] != run
    assert upcycling(**{"merge.router_seed": 99})[0] != upcycled
    assert upcycling(**{"baselines.upcycling.noise": 0.01})[0] != upcycled
    assert upcycling(**{"mix.model.moe_router_topk": 1})[0] != upcycled
