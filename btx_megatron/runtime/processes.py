"""Child processes that never outlive their parent, and signals that reach every child.

The experiment pipeline and the local launcher start training runs, merges and evaluations as
child processes (:func:`start_child`, :func:`run_logged`); offline tools fork workers that share
their imports (:func:`fork_workers`). Two rules keep a cluster allocation (or a laptop) free of
orphans:

- a signal to the parent (SIGTERM, SIGINT, SIGUSR1) is forwarded to the child's whole process
  group, and the parent waits for the child (a trainer saves a checkpoint and exits 0);
- a child dies with its parent: it is started with ``PR_SET_PDEATHSIG`` = SIGTERM (Linux), so a
  SIGKILLed parent leaves a child that saves and exits instead of training on. Trainers set the
  same for themselves (:func:`exit_with_parent`), which covers workers of a killed torchrun.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only).
    ``parent``: the parent's pid, when known (a forked child), to tell that it already died."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The parent may have died before the prctl call: then nobody will send the signal (the
    # orphan was re-parented to init or to a subreaper).
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os.kill(os.getpid(), sig)


def exit_now(code: int | None) -> None:
    """End an offline tool's process with ``code`` once its work is complete and durable.

    Runs the ``atexit`` handlers and flushes stdout/stderr, then skips the interpreter's teardown
    (destroying every module and object): after ``import torch`` that teardown alone costs about
    1.2 s of CPU, a tenth of a merge of 220M-parameter models. For a tool's ``__main__`` only: its
    files are written, flushed and published, and it runs no thread it must join."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        # As sys.exit: None is success, an int is the status, anything else a failure.
        os._exit(0 if code is None else code if isinstance(code, int) else 1)


def _child_setup() -> None:  # runs in the child between fork and exec
    exit_with_parent(signal.SIGTERM)


def start_child(command: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                stdout=None, stderr=None) -> subprocess.Popen:
    """Start ``command`` in its own session (a signal to it reaches its whole process group and
    nothing else) that terminates when this process dies."""
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True,
                            preexec_fn=_child_setup)


def signal_group(proc, sig: int) -> None:
    """``sig`` to the process group led by ``proc`` (a Popen of :func:`start_child`, or anything
    with the ``pid`` of a process group leader)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ForwardSignals:
    """While active, the signals in :data:`FORWARDED_SIGNALS` sent to this process go to the
    children's process groups (``targets()``) instead of killing it; ``received`` records the
    first one so the caller can stop starting new work."""

    def __init__(self, targets: Callable[[], list], echo: Callable[[str], None] | None = None):
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


# --------------------------------------------------------------------------------------------
# Forked workers: the imports once, the work on N processes
# --------------------------------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    """A forked worker died without an error of its own to report (killed, crashed), or the
    workers were stopped by a signal; the message says which worker and how."""


class WorkerStopped(BaseException):
    """Raised in a forked worker by a forwarded signal. A BaseException, like KeyboardInterrupt:
    the ``except Exception`` of the code it interrupts lets it pass to the ``finally`` blocks
    that clean up (a tool's staging directory)."""


class _Worker:
    """A forked child as :func:`signal_group` sees it (it leads its own process group)."""

    def __init__(self, index: int, pid: int, outcome_path: Path) -> None:
        self.index, self.pid, self.outcome_path = index, pid, outcome_path
        # ("ok", value) | ("error", exception or None, text, traceback) | ("stopped", text)
        self.outcome: tuple | None = None

    def signal(self, sig: int) -> None:
        signal_group(self, sig)
        try:  # before its setsid() the child leads no group yet
            os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def fork_workers(body: Callable[[int], Any], count: int, *, grace_s: float = 30.0) -> list[Any]:
    """``body(i)`` for i in 0..count-1, each in a child forked from this process; returns the
    results in order. The children start at once and share this process's memory, so imports
    done here are paid once (a torchrun launch pays them in every process).

    Fork before starting any thread: a child gets a copy of every lock but only the forking
    thread. Each child computes on one thread (``OMP_NUM_THREADS=1``), as torchrun's workers do
    by default, and for a second reason: PyTorch's OpenMP pool does not survive a fork, and a
    child that starts several OpenMP threads after its parent used the pool hangs.

    The children never outlive this process: each runs in a session of its own and is SIGKILLed
    when this process dies (``PR_SET_PDEATHSIG``); the signals this process receives (SIGTERM,
    SIGINT, SIGUSR1) are forwarded to them, where they raise :class:`WorkerStopped` so that their
    ``finally`` blocks run, and SIGKILL follows after ``grace_s``. When one child fails, the
    others get a moment to fail with it (an error shared through a collective ends every worker
    at once) and are then stopped the same way. The first failure is raised here: the child's
    own exception when it can be sent back (a ValueError stays a ValueError, message and all),
    else :class:`WorkerFailed` naming the worker and how it ended; after a forwarded signal,
    :class:`WorkerFailed` saying so."""
    if count < 1:
        raise ValueError(f"fork_workers needs at least one worker, got {count}.")
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        raise RuntimeError(f"fork_workers: this process runs other threads ({', '.join(others)}); fork before "
                           "starting any (a forked child gets their locks but not the threads).")
    sys.stdout.flush()
    sys.stderr.flush()
    outcomes = Path(tempfile.mkdtemp(prefix="btx-workers-"))
    parent, workers = os.getpid(), []
    try:
        for index in range(count):
            pid = os.fork()
            if pid == 0:  # the child: never returns
                _worker_main(body, index, parent, outcomes / f"{index}.pkl")
            workers.append(_Worker(index, pid, outcomes / f"{index}.pkl"))
        return _supervise(workers, grace_s)
    finally:
        for w in workers:  # only after an exception in this process (e.g. KeyboardInterrupt): no survivors
            if w.outcome is None:
                w.signal(signal.SIGKILL)
                _reap(w, block=True)
        shutil.rmtree(outcomes, ignore_errors=True)


def _worker_main(body: Callable[[int], Any], index: int, parent: int, outcome_path: Path) -> None:
    code = 1
    try:
        os.setsid()  # a group of its own: a forwarded signal reaches whatever it starts too
        # SIGKILL: a worker blocked in a collective would not run a SIGTERM handler, and without
        # its parent nobody would escalate. Its debris is what the next run of the tool removes.
        exit_with_parent(signal.SIGKILL, parent=parent)
        stopping = []

        def stop(signum, frame):
            if not stopping:  # once: the clean-up that follows must not be interrupted
                stopping.append(signum)
                raise WorkerStopped(signal.Signals(signum).name)

        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, stop)
        os.environ["OMP_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        try:
            outcome = ("ok", body(index))
            code = 0
        except WorkerStopped as exc:
            outcome = ("stopped", f"was stopped by {exc}")
        except BaseException as exc:  # noqa: BLE001 - sent to the parent, which raises it
            # The traceback travels too: the parent shows the first failure's only (the others'
            # errors are mostly its consequences, e.g. a collective that lost a peer).
            outcome = ("error", _sendable(exc), f"failed: {type(exc).__name__}: {exc}", traceback.format_exc())
        with open(outcome_path, "wb") as f:
            try:
                pickle.dump(outcome, f)
            except Exception as exc:  # noqa: BLE001 - a result that cannot be pickled
                f.seek(0)
                f.truncate()
                pickle.dump(("error", None, f"failed: its result cannot be sent back: {exc}", ""), f)
                code = 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _sendable(exc: BaseException) -> BaseException | None:
    """``exc`` if it survives pickling as itself, else None (the parent gets its text)."""
    try:
        return exc if type(pickle.loads(pickle.dumps(exc))) is type(exc) else None
    except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ takes other arguments
        return None


def _reap(w: _Worker, block: bool = False) -> bool:
    """Collect ``w``'s exit status and outcome; False while it still runs."""
    try:
        pid, status = os.waitpid(w.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # collected elsewhere: its status is lost
        pid, status = w.pid, 1 << 8
    if pid == 0:
        return False
    try:
        with open(w.outcome_path, "rb") as f:
            w.outcome = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError):
        w.outcome = None
    if w.outcome is None or (w.outcome[0] == "ok" and status != 0):
        if os.WIFSIGNALED(status):
            how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            how = f"exited with code {os.waitstatus_to_exitcode(status)}"
        w.outcome = ("error", None, how, "")
    return True


def _supervise(workers: list[_Worker], grace_s: float, settle_s: float = 2.0) -> list[Any]:
    running = list(workers)
    first_failure: _Worker | None = None
    stop_at = kill_at = None  # when the workers still running get SIGTERM, and SIGKILL
    with ForwardSignals(lambda: running) as forward:
        while running:
            for w in list(running):
                if _reap(w):
                    running.remove(w)
                    if w.outcome[0] != "ok" and first_failure is None:
                        first_failure = w
            now = time.monotonic()
            if kill_at is None and forward.received is not None:  # forwarded already
                stop_at, kill_at = now, now + grace_s
            if stop_at is None and first_failure is not None:
                stop_at = now + settle_s
            if running and stop_at is not None and kill_at is None and now >= stop_at:
                for w in running:  # the others cannot finish a job that one of them failed
                    w.signal(signal.SIGTERM)
                kill_at = now + grace_s
            if running and kill_at is not None and now >= kill_at:
                for w in running:
                    w.signal(signal.SIGKILL)
            time.sleep(0.02)
    if first_failure is None:  # done, even if a signal came at the very end
        return [w.outcome[1] for w in workers]
    if forward.received is not None:
        raise WorkerFailed(f"stopped by {signal.Signals(forward.received).name}: the {len(workers)} worker "
                           "processes stopped before they finished")
    where = f"worker {first_failure.index} of {len(workers)} (pid {first_failure.pid})"
    if first_failure.outcome[0] == "stopped":
        raise WorkerFailed(f"{where} {first_failure.outcome[1]}")
    _, exc, text, trace = first_failure.outcome
    if exc is None:
        exc = WorkerFailed(f"{where} {text}")
    if trace:  # shown with a traceback of this process (a bug); a tool prints a ValueError's message only
        exc.add_note(f"Raised in {where}:\n{trace.rstrip()}")
    raise exc
