"""Shared by the fault tests: the uninterrupted reference run every interrupted run must equal."""

from __future__ import annotations

import pytest

from tests.training import faultlib


@pytest.fixture(scope="session")
def dense_reference(tmp_path_factory):
    """TINY_DENSE, 6 iterations, a save every 2, started with --load X --save X (start-or-resume:
    X does not exist yet). Returns (root, log text)."""
    root = tmp_path_factory.mktemp("reference") / "dense"
    run = faultlib.run(faultlib.train_argv(root), root.parent / "dense.log")
    assert run.rc == 0, run.text()[-3000:]
    return root, run.text()


@pytest.fixture
def runs():
    """Runs started by a test; whatever is still alive at its end is killed."""
    started: list[faultlib.Run] = []
    yield started
    for r in started:
        if r.alive():
            r.kill()


# ------------------------------------------------------------------ CPU accounting
# The machine these tests run on is often shared, so wall time says little; the CPU seconds a
# test used (this process, its subprocesses, and the runs forked by faultlib's server) are
# printed at the end of the session.
_CPU: list[tuple[str, float, float]] = []


def _cpu_seconds() -> float:
    import multiprocessing.forkserver as forkserver
    import os
    import resource

    total = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for f in ("ru_utime", "ru_stime"))
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
        except OSError:
            pass
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import time

    cpu, wall = _cpu_seconds(), time.time()
    yield
    _CPU.append((item.nodeid, time.time() - wall, _cpu_seconds() - cpu))


def pytest_terminal_summary(terminalreporter):
    if _CPU:
        terminalreporter.write_sep("-", "tests/training: wall and CPU seconds per test (CPU includes forked runs)")
        for nodeid, wall, cpu in _CPU:
            terminalreporter.write_line(f"{wall:8.1f}s wall {cpu:8.1f}s CPU  {nodeid}")
