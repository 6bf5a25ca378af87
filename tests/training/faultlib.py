"""Helpers of the fault tests: real training processes, started cheaply and killed for real.

A plain ``python -m btx_megatron.pretrain`` spends about 10 s of CPU importing torch and
Megatron-Core before its first step. The runs here are forked from a multiprocessing
forkserver that has imported them once; each run is still its own process (own pid, signal
handlers, exit status, SIGKILL) and calls the entrypoint's ``main(argv)`` exactly as the
command line does, with its output in a log file. World-2 runs get RANK/WORLD_SIZE/MASTER_*
like torchrun, and when one rank dies the others are killed after a grace period, as torchrun
does. Tests that need a real command line (a parent that forwards signals, PDEATHSIG) start
``python`` themselves.

Checks are written against the files on disk only (tracker, iteration directories, the DCP
files, metrics.jsonl), so they judge any version of the code.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import runpy
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
from tests.dist_utils import forkserver_context
from tests.distributed.workers import TINY_DENSE, TINY_MOE  # noqa: F401 (re-exported for the fault tests)

TRACKER = "latest_checkpointed_iteration.txt"


def _child(entry: str, argv: list[str], env: dict[str, str | None], log: str) -> None:
    """Body of a forked run: output to ``log``, the environment of a command line, then the
    entrypoint (a module with ``main(argv)`` or a script path run as ``__main__``)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    import torch

    torch.set_num_threads(1)
    os.chdir(ROOT)
    code: Any = 0
    try:
        if entry.endswith(".py"):
            sys.argv = [entry, *argv]
            runpy.run_path(str(ROOT / entry), run_name="__main__")
        else:
            sys.argv = [entry, *argv]
            code = importlib.import_module(entry).main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - a crash is reported like a command line's
        traceback.print_exc()
        code = 1
    # Returning through multiprocessing's bootstrap runs the exit handlers a command line runs
    # (they stop the helper processes a run started, e.g. dist_checkpointing's queue manager).
    raise SystemExit(code if isinstance(code, int) else (0 if code is None else 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One training run: ``world`` forked ranks writing to one log."""

    def __init__(self, procs: list, log: Path, started: float):
        self.procs, self.log, self.started = procs, log, started
        self.codes: list[int | None] | None = None

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def send(self, sig: int, ranks: list[int] | None = None) -> None:
        for i, p in enumerate(self.procs):
            if (ranks is None or i in ranks) and p.is_alive():
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> list[int | None]:
        self.send(signal.SIGKILL)
        return self.wait(60)

    def wait(self, timeout: float = 600, grace: float = 20) -> list[int | None]:
        """Exit codes of every rank (negative: killed by that signal). A rank that fails makes
        the others be killed after ``grace`` seconds; past ``timeout`` everything is killed."""
        deadline = time.time() + timeout
        failed_at = None
        while any(p.is_alive() for p in self.procs):
            if time.time() > deadline:
                self.send(signal.SIGKILL)
                for p in self.procs:
                    p.join(30)
                raise TimeoutError(f"run did not finish in {timeout}s; log {self.log}:\n{self.text()[-3000:]}")
            codes = [p.exitcode for p in self.procs]
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > grace:
                self.send(signal.SIGKILL)
            time.sleep(0.05)
        for p in self.procs:
            p.join()
        self.codes = [p.exitcode for p in self.procs]
        return self.codes

    @property
    def rc(self) -> int | None:
        return (self.codes or self.wait())[0]

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match | None:
        """The first match of ``pattern`` in the log, polled until the run ends (None then)."""
        deadline = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < deadline:
            match = rx.search(self.text())
            if match:
                return match
            if not self.alive():
                return rx.search(self.text())
            time.sleep(0.02)
        raise TimeoutError(f"{pattern!r} did not appear in {timeout}s; log {self.log}:\n{self.text()[-3000:]}")


def start(argv: list[str], log: Path, *, world: int = 1, env: dict[str, str | None] | None = None,
          entry: str = "btx_megatron.pretrain") -> Run:
    ctx = forkserver_context()
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    base = {"PYTHONWARNINGS": "ignore", "BTX_FAULT_POINT": None, "BTX_FAULT_ACTION": None, **(env or {})}
    for rank in range(world):
        rank_env = dict(base)
        if world > 1:
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            rank_env.update(RANK=None, WORLD_SIZE=None, LOCAL_RANK=None, MASTER_PORT=None)
        p = ctx.Process(target=_child, args=(entry, list(argv), rank_env, str(log)), daemon=False)
        p.start()
        procs.append(p)
    return Run(procs, log, time.time())


def run(argv: list[str], log: Path, timeout: float = 600, **kwargs) -> Run:
    r = start(argv, log, **kwargs)
    r.wait(timeout)
    return r


# ---------------------------------------------------------------------------------- the model
def train_argv(save: Path, iters: int = 6, interval: int = 2, model: list[str] | None = None,
               extra: list[str] | None = None) -> list[str]:
    """The start-or-resume command every (re)start of a run uses: --load X --save X."""
    return (model or TINY_DENSE) + ["--train-iters", str(iters), "--save-interval", str(interval),
                                    "--log-interval", "1", "--save", str(save), "--load", str(save)] + (extra or [])


# ---------------------------------------------------------------------------------- the disk
def tracker(root: Path) -> int | None:
    path = Path(root) / TRACKER
    return int(path.read_text().strip()) if path.is_file() else None


def iter_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def iterations_on_disk(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.name[5:].isdigit())


def debris(root: Path) -> list[str]:
    """What killed saves or writes leave: staging and trash directories, temporary files."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.name.startswith((".staging-", ".trash-")) or re.match(r"^\..+\.tmp-", p.name))


def complete(ckpt: Path) -> bool:
    """Manifest, metadata.json and every DCP file the metadata references, long enough."""
    ckpt = Path(ckpt)
    if not ((ckpt / "btx_checkpoint.json").is_file() and (ckpt / "metadata.json").is_file()):
        return False
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(ckpt)).read_metadata()
    except Exception:  # noqa: BLE001
        return False
    for info in metadata.storage_data.values():
        f = ckpt / info.relative_path
        if not f.is_file() or f.stat().st_size < info.offset + info.length:
            return False
    return True


def metrics(root: Path, kind: str = "train") -> list[dict]:
    path = Path(root) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type", "train") == kind]


def checkpoint_state(ckpt: Path) -> dict[str, Any]:
    """Everything in a checkpoint (weights, optimizer state, RNG, scheduler, iteration), read
    with PyTorch's own DCP reader."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "consolidated.pt"
        dcp_to_torch_save(str(ckpt), str(out))
        return torch.load(out, weights_only=False)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two checkpoint states differ (tensors bit for bit)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(set(a) ^ set(b))[:5]}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, io.BytesIO) and isinstance(b, io.BytesIO):
        return [] if a.getvalue() == b.getvalue() else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


TRAIN_FIELDS = ("iteration", "loss", "lr", "grad_norm", "consumed_samples")


def assert_same_training(reference: Path, resumed: Path, iterations: int | None = None) -> None:
    """The resumed run ends bit-identical to the uninterrupted one: every tensor and object of
    the final checkpoint (weights, optimizer state, RNG, scheduler), and metrics.jsonl holds one
    record per iteration with the same loss, LR and gradient norm."""
    ref_iter, got_iter = tracker(reference), tracker(resumed)
    assert got_iter == ref_iter and (iterations is None or got_iter == iterations), (ref_iter, got_iter)
    diff = differences(checkpoint_state(iter_dir(reference, ref_iter)), checkpoint_state(iter_dir(resumed, got_iter)))
    assert not diff, f"final checkpoints differ at {diff[:10]}"
    ref, got = metrics(reference), metrics(resumed)
    assert [r["iteration"] for r in got] == list(range(1, ref_iter + 1)), [r["iteration"] for r in got]
    assert [[r[k] for k in TRAIN_FIELDS] for r in got] == [[r[k] for k in TRAIN_FIELDS] for r in ref]


def saved_lines(text: str) -> list[str]:
    return re.findall(r"saved checkpoint \S+", text)
