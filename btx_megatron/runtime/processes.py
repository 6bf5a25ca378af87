"""Child processes that never outlive their parent, and signals that reach every child.

The experiment pipeline and the local launcher start training runs, merges and evaluations as
child processes. Two rules keep a cluster allocation (or a laptop) free of orphans:

- a signal to the parent (SIGTERM, SIGINT, SIGUSR1) is forwarded to the child's whole process
  group, and the parent waits for the child (a trainer saves a checkpoint and exits 0);
- a child dies with its parent: it is started with ``PR_SET_PDEATHSIG`` = SIGTERM (Linux), so a
  SIGKILLed parent leaves a child that saves and exits instead of training on. Trainers set the
  same for themselves (:func:`exit_with_parent`), which covers workers of a killed torchrun.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The parent may have died before the prctl call: then nobody will send the signal.
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)


def _child_setup() -> None:  # runs in the child between fork and exec
    exit_with_parent(signal.SIGTERM)


def start_child(command: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                stdout=None, stderr=None) -> subprocess.Popen:
    """Start ``command`` in its own session (a signal to it reaches its whole process group and
    nothing else) that terminates when this process dies."""
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True,
                            preexec_fn=_child_setup)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ForwardSignals:
    """While active, the signals in :data:`FORWARDED_SIGNALS` sent to this process go to the
    children's process groups (``targets()``) instead of killing it; ``received`` records the
    first one so the caller can stop starting new work."""

    def __init__(self, targets: Callable[[], list[subprocess.Popen]], echo: Callable[[str], None] | None = None):
        self.targets = targets
        self.echo = echo
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self.echo is not None:
            self.echo(f"[signal] {signal.Signals(signum).name}: forwarding to the running child process(es) "
                      "and waiting for them to save and exit")
        for proc in self.targets():
            signal_group(proc, signum)

    def __enter__(self) -> "ForwardSignals":
        for sig in FORWARDED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ChildFailed(RuntimeError):
    """A child command exited with an error; the message names the log."""


def run_logged(command: list[str], log_path: Path, label: str, *, env: dict[str, str] | None = None,
               cwd: str | os.PathLike | None = None, echo: Callable[[str], None] | None = None) -> None:
    """Run ``command`` with its output appended to ``log_path``, forwarding signals to it.

    Raises :class:`ChildFailed` (naming the log and quoting its tail) when it fails, and
    ``KeyboardInterrupt``/``SystemExit`` semantics are left to the caller: after a forwarded
    signal the child's exit code decides (a trainer that saved on SIGTERM exits 0)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        proc = start_child(command, env=full_env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        with ForwardSignals(lambda: [proc], echo) as forward:
            code = _wait(proc)
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise ChildFailed(f"{label} failed (exit {code}); log {log_path}:\n{tail}")
    if forward.received is not None:
        raise ChildFailed(f"{label}: stopped by {signal.Signals(forward.received).name} (the child exited cleanly; "
                          "run the same command again to continue)")


def _wait(proc: subprocess.Popen) -> int:
    while True:
        try:
            return proc.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
