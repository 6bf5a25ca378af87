"""Run the real SLURM job scripts of ``slurm/`` on this machine (tests/slurm).

:class:`FakeCluster` puts the stand-ins of ``tests/slurm/bin`` (sbatch, srun, scontrol, squeue)
first on PATH, submits a script with ``sbatch`` exactly as a user would, delivers the job's
``#SBATCH --signal`` when the job's output shows it is mid-run, and reads back what happened
(exit code of every start, requeue records, the job steps' tasks). The scripts themselves run
unmodified; a tiny model is selected through the variables they document.

Also here: the tiny inputs the scripts need (a sentencepiece tokenizer, indexed datasets, dense
checkpoints made by the trainer, and a merged MoE made by ``tools/merge_branches.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(__file__).resolve().parent / "bin"
from tests.slurm.bin import _fakeslurm

# The tiny model every flow uses, as the scripts' variables and as trainer flags.
TINY_VARS = {
    "NUM_LAYERS": "2", "HIDDEN_SIZE": "64", "FFN_HIDDEN_SIZE": "128", "NUM_ATTENTION_HEADS": "4",
    "NUM_QUERY_GROUPS": "2", "SEQ_LENGTH": "32", "TRANSFORMER_IMPL": "local", "PRECISION": "fp32",
    "LR": "1e-3", "MIN_LR": "1e-4", "WARMUP_ITERS": "2", "LOG_INTERVAL": "1", "EVAL_ITERS": "1",
}
VOCAB = 600   # the tokenizer's size; the scripts pad it to a multiple of 128
TINY_MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--num-query-groups", "2", "--seq-length", "32", "--max-position-embeddings", "32", "--swiglu",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--position-embedding-type", "rope",
    "--rotary-base", "10000", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "128", "--transformer-impl", "local",
]
DOMAINS = ("math", "code", "wiki", "seed")


@dataclass
class Job:
    job_id: int
    state: str
    exit_codes: list[int]
    restarts: int
    requeues: list[dict]
    steps: list[dict]
    output: str = field(repr=False)


class FakeCluster:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        from btx_megatron.runtime.distributed import free_port

        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
        env.update({
            "PATH": f"{BIN}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "FAKE_SLURM_DIR": str(self.state_dir), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            # The scripts derive the rendezvous port from the job id; a free one avoids clashes
            # with whatever else runs on this machine.
            "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore",
        })
        env.update(extra or {})
        return env

    def submit(self, script: str, *sbatch_args: str, env: dict[str, str] | None = None) -> int:
        # Job output under the test's directory (--output on the command line, as a user may).
        output = f"--output={self.state_dir}/%x-%j.out"
        done = subprocess.run(["sbatch", output, *sbatch_args, script], cwd=ROOT, env=self.env(env),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"sbatch failed: {done.stdout}{done.stderr}"
        match = re.search(r"Submitted batch job (\d+)", done.stdout)
        assert match, done.stdout
        return int(match.group(1))

    def _state(self, job_id: int) -> dict:
        return json.loads((_fakeslurm.job_dir_in(self.state_dir, job_id) / "state.json").read_text())

    def output(self, job_id: int) -> str:
        job = json.loads((_fakeslurm.job_dir_in(self.state_dir, job_id) / "job.json").read_text())
        path = Path(job["output"])
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_output(self, job_id: int, pattern: str, timeout: float = 600) -> re.Match:
        end = time.time() + timeout
        while time.time() < end:
            match = re.search(pattern, self.output(job_id))
            if match:
                return match
            if self._state(job_id)["state"] in ("COMPLETED", "FAILED"):
                break
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never printed {pattern!r}:\n{self.output(job_id)[-4000:]}")

    def signal(self, job_id: int) -> str:
        """The job's ``#SBATCH --signal`` (time limit ahead), delivered as SLURM delivers it."""
        return _fakeslurm.deliver_signal(self.state_dir, job_id)

    def wait(self, job_id: int, timeout: float = 900) -> Job:
        end = time.time() + timeout
        while self._state(job_id)["state"] not in ("COMPLETED", "FAILED"):
            if time.time() > end:
                raise AssertionError(f"job {job_id} did not finish in {timeout} s:\n{self.output(job_id)[-4000:]}")
            time.sleep(0.2)
        jd = _fakeslurm.job_dir_in(self.state_dir, job_id)
        state = self._state(job_id)
        requeues = [json.loads(p.read_text()) for p in sorted(jd.glob("requeue_*.json"))]
        steps = [json.loads(p.read_text()) for p in sorted((jd / "steps").glob("*.json"), key=lambda p: int(p.stem))]
        return Job(job_id, state["state"], state["exit_codes"], state["restart_count"], requeues, steps,
                   self.output(job_id))


# --------------------------------------------------------------------------------------------
# Inputs: tokenizer, datasets, checkpoints
# --------------------------------------------------------------------------------------------

def make_tokenizer(directory: Path) -> Path:
    """A byte-fallback sentencepiece model of ``VOCAB`` pieces trained on generated math text."""
    from btx_megatron.data.math_problems import math_document
    from btx_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "train.txt"
    text.write_text("\n".join(math_document(3, i) for i in range(200)))
    return Path(train_sentencepiece(TokenizerTrainingConfig(
        input=[str(text)], model_prefix=str(directory / "tokenizer"), vocab_size=VOCAB, seed=1)))


def make_dataset(prefix: Path, seed: int, num_docs: int = 24, doc_len: int = 48) -> str:
    """A Megatron indexed dataset of random token documents (ids below the tokenizer's size)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    g = torch.Generator().manual_seed(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(num_docs):
        builder.add_document(torch.randint(3, VOCAB, (doc_len,), generator=g, dtype=torch.int32), [doc_len])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def save_initial_checkpoints(runs: dict[str, str]) -> None:
    """Dense tiny models at iteration 0 (different seeds), saved by the trainer: ``{seed: dir}``.
    Runs on a gloo rank (``run_distributed``)."""
    from btx_megatron.config import parse_config
    from btx_megatron.pretrain import run

    for seed, save in runs.items():
        argv = TINY_MODEL_FLAGS + ["--mock-data", "--train-iters", "0", "--no-save-optim", "--seed", seed,
                                   "--save", save]
        run(parse_config(argv)[0], argv)


def merge(output: Path, sources: dict[str, Path]) -> Path:
    """``python tools/merge_branches.py`` (the user's command) on the dense checkpoints."""
    cmd = [sys.executable, str(ROOT / "tools" / "merge_branches.py"), "--output", str(output), "--quiet"]
    for name in ("math", "code", "wiki"):
        cmd += ["--branch", f"{name}={sources[name]}"]
    cmd += ["--seed-expert", str(sources["seed"])]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, f"merge failed:\n{done.stdout}\n{done.stderr}"
    return output


def read_model_tensors(ckpt_root: Path) -> dict:
    """Model tensors of a checkpoint's latest iteration, read with PyTorch's DCP reader only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    import torch

    iteration = int((ckpt_root / "latest_checkpointed_iteration.txt").read_text())
    reader = dcp.FileSystemReader(str(ckpt_root / f"iter_{iteration:07d}"))
    md = reader.read_metadata().state_dict_metadata
    keys = [k for k, v in md.items() if isinstance(v, TensorStorageMetadata)
            and k.startswith(("embedding.", "decoder.", "output_layer."))]
    state = {k: torch.empty(md[k].size, dtype=md[k].properties.dtype) for k in keys}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def train_records(save: Path) -> list[dict]:
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("type") == "train"]
