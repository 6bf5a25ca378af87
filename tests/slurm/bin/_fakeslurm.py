"""A SLURM stand-in on one machine: sbatch, srun, scontrol and squeue for tests/slurm.

The executables next to this file (``sbatch``, ``srun``, ``scontrol``, ``squeue``) call
:func:`main`; tests put this directory first on PATH and run the real job scripts of ``slurm/``.
State lives under ``$FAKE_SLURM_DIR`` (one directory per job: its environment, the batch shell's
and every job step's pid, exit codes, requeue records and the job's output).

What a real allocation provides and this reproduces:

- ``sbatch`` reads ``#SBATCH`` lines and command-line options (command line wins), gives the job
  an id and runs the script with bash in the background with the job environment
  (``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST``, ``SLURM_JOB_NUM_NODES``, ``SLURM_NTASKS``,
  ``SLURM_NTASKS_PER_NODE``, ``SLURM_SUBMIT_DIR``, ``SLURM_RESTART_COUNT`` after a requeue, ...),
  its output going to ``--output`` (``%x`` job name, ``%j`` job id). ``--wait`` waits for the job
  and returns its exit code, as with real sbatch.
- Nodes are simulated on the loopback: the node list is ``btxsim[1-N]`` and ``scontrol show
  hostnames`` prints ``127.0.0.1`` for each of them (the names resolve nowhere; every simulated
  node is this machine).
- ``srun`` starts one process per task, distributed in blocks over the nodes, each with
  ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURMD_NODENAME``, ``SLURM_STEP_ID``
  and the rest of a task's environment; it forwards SIGINT/SIGTERM/SIGUSR1/SIGUSR2 to every task,
  kills the other tasks when one fails with ``--kill-on-bad-exit``, and exits with the first
  failing task's code (128 + signal for a killed task).
- ``scontrol requeue JOBID`` writes a requeue record; when the batch script ends, the job runs
  the script again with ``SLURM_RESTART_COUNT`` one higher, as SLURM does after a requeue.
- Signals: :func:`deliver_signal` (used by the test harness) sends a signal the way the job's
  ``#SBATCH --signal`` asks: ``B:SIG`` to the batch shell only, otherwise to every job step.

Options these fakes do not know are refused with a message, so a script change that needs a new
option shows up as a test failure instead of being ignored.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
NODE_PREFIX = "btxsim"

# name -> (takes a value, aliases)
SBATCH_OPTIONS = {
    "--job-name": True, "-J": True, "--nodes": True, "-N": True, "--ntasks-per-node": True,
    "--ntasks": True, "-n": True, "--gpus-per-node": True, "--cpus-per-task": True, "-c": True,
    "--exclusive": False, "--time": True, "-t": True, "--signal": True, "--requeue": False,
    "--no-requeue": False, "--open-mode": True, "--output": True, "-o": True, "--error": True, "-e": True,
    "--account": True, "-A": True, "--partition": True, "-p": True, "--qos": True, "-q": True,
    "--mem": True, "--export": True, "--wait": False, "-W": False, "--chdir": True, "-D": True,
    "--dependency": True, "-d": True, "--gres": True, "--constraint": True, "-C": True,
}
SRUN_OPTIONS = {
    "--kill-on-bad-exit": False, "-K": False, "--cpu-bind": True, "--export": True, "--nodes": True,
    "-N": True, "--ntasks": True, "-n": True, "--ntasks-per-node": True, "--label": False, "-l": False,
    "--unbuffered": False, "-u": False, "--mpi": True, "--gpus-per-node": True, "--cpus-per-task": True,
    "-c": True, "--container-image": True, "--container-mounts": True, "--wait": True, "-W": True,
}
CANONICAL = {"-J": "--job-name", "-N": "--nodes", "-n": "--ntasks", "-c": "--cpus-per-task", "-t": "--time",
             "-o": "--output", "-e": "--error", "-A": "--account", "-p": "--partition", "-q": "--qos",
             "-W": "--wait", "-D": "--chdir", "-d": "--dependency", "-C": "--constraint", "-K": "--kill-on-bad-exit",
             "-l": "--label", "-u": "--unbuffered"}


class UsageError(Exception):
    pass


def _state_dir() -> Path:
    path = os.environ.get("FAKE_SLURM_DIR")
    if not path:
        raise UsageError("FAKE_SLURM_DIR is not set (the test harness sets it)")
    Path(path, "jobs").mkdir(parents=True, exist_ok=True)
    return Path(path)


def job_dir_in(state_dir: str | Path, job_id: int | str) -> Path:
    return Path(state_dir) / "jobs" / str(job_id)


def job_dir(job_id: int | str) -> Path:
    return job_dir_in(_state_dir(), job_id)


def parse_options(args: list[str], table: dict[str, bool], program: str, stop_at_positional: bool = True):
    """Options up to the first positional argument -> ({canonical name: value}, rest)."""
    opts: dict[str, object] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            break
        name, sep, value = arg.partition("=")
        if name not in table:
            raise UsageError(f"{program}: option {name!r} is not supported by the test fake; add it to {__file__}")
        takes_value = table[name]
        if takes_value and not sep:
            if i + 1 >= len(args):
                raise UsageError(f"{program}: option {name} needs a value")
            value = args[i + 1]
            i += 1
        elif not takes_value:
            value = value if sep else True
        opts[CANONICAL.get(name, name)] = value
        i += 1
    return opts, args[i:]


def sbatch_directives(script: Path) -> list[str]:
    """The options of the script's ``#SBATCH`` lines (up to the first command, as SLURM reads them)."""
    out: list[str] = []
    for line in script.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            out += shlex.split(stripped[len("#SBATCH"):].split(" #")[0])
        elif stripped and not stripped.startswith("#"):
            break
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """``btxsim[1-2,4],other`` -> [btxsim1, btxsim2, btxsim4, other]."""
    out: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.groups()
        if not ranges:
            out.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{n:0{width}d}")
    return out


def _write_stdout(text: str) -> None:
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except BrokenPipeError:
        pass


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


# --------------------------------------------------------------------------------------------
# sbatch and the job runner
# --------------------------------------------------------------------------------------------

def _next_job_id() -> int:
    counter = _state_dir() / "next_job_id"
    job_id = int(counter.read_text()) if counter.exists() else 4100
    counter.write_text(str(job_id + 1))
    return job_id


def sbatch(args: list[str]) -> int:
    cli, rest = parse_options(args, SBATCH_OPTIONS, "sbatch")
    if not rest:
        raise UsageError("sbatch: no batch script given")
    script = Path(rest[0])
    if not script.is_file():
        raise UsageError(f"sbatch: unable to open file {script}")
    directives, _ = parse_options(sbatch_directives(script), SBATCH_OPTIONS, f"sbatch ({script} #SBATCH)")
    opts = {**directives, **cli}
    submit_dir = Path(str(opts.get("--chdir", os.getcwd()))).resolve()
    job_id = _next_job_id()
    nodes = int(opts.get("--nodes", 1))
    if "--ntasks-per-node" in opts:
        per_node = int(opts["--ntasks-per-node"])
    else:
        per_node = max(int(opts.get("--ntasks", nodes)) // nodes, 1)
    name = str(opts.get("--job-name", script.name))
    nodelist = f"{NODE_PREFIX}[1-{nodes}]" if nodes > 1 else f"{NODE_PREFIX}1"
    env = dict(os.environ)
    env.update({
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": name,
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
        "SLURM_NTASKS": str(nodes * per_node), "SLURM_NPROCS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_JOB_CPUS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_SUBMIT_HOST": "127.0.0.1",
        "SLURM_CLUSTER_NAME": "btx-fake", "SLURM_JOB_PARTITION": str(opts.get("--partition", "fake")),
        "SLURM_JOB_ACCOUNT": str(opts.get("--account", "fake")),
        # The batch step: task 0 on the first node.
        "SLURMD_NODENAME": expand_nodelist(nodelist)[0], "SLURM_NODEID": "0", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    })
    env.pop("SLURM_RESTART_COUNT", None)
    if "--cpus-per-task" in opts:
        env["SLURM_CPUS_PER_TASK"] = str(opts["--cpus-per-task"])
    if "--gpus-per-node" in opts:
        env["SLURM_GPUS_PER_NODE"] = str(opts["--gpus-per-node"])
    output = str(opts.get("--output", "slurm-%j.out")).replace("%x", name).replace("%j", str(job_id))
    output_path = (submit_dir / output) if not os.path.isabs(output) else Path(output)
    jd = job_dir(job_id)
    jd.mkdir(parents=True)
    _write_json(jd / "job.json", {
        "job_id": job_id, "name": name, "script": str(script.resolve()), "args": rest[1:], "env": env,
        "submit_dir": str(submit_dir), "output": str(output_path), "signal": opts.get("--signal"),
        "requeue": bool(opts.get("--requeue", False)), "nodes": nodes, "ntasks_per_node": per_node,
    })
    _write_json(jd / "state.json", {"state": "PENDING", "restart_count": 0, "exit_codes": []})
    # The job outlives sbatch (and must not hold its stdout): the runner writes to the job's files.
    with open(jd / "runner.log", "w") as log:
        runner = subprocess.Popen([sys.executable, __file__, "_run_job", str(job_id)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    print(f"Submitted batch job {job_id}", flush=True)
    if opts.get("--wait"):
        runner.wait()
        return int(_read_json(jd / "state.json")["exit_code"])
    return 0


def run_job(job_id: str) -> int:
    """The job's life: run the batch script; run it again after each ``scontrol requeue``."""
    jd = job_dir(job_id)
    job = _read_json(jd / "job.json")
    state = _read_json(jd / "state.json")
    output = Path(job["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    restart = 0
    while True:
        env = dict(job["env"])
        if restart:
            env["SLURM_RESTART_COUNT"] = str(restart)
        with open(output, "a") as out:
            proc = subprocess.Popen(["bash", job["script"], *job["args"]], env=env, cwd=job["submit_dir"],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            (jd / "batch.pid").write_text(str(proc.pid))
            state.update(state="RUNNING", restart_count=restart)
            _write_json(jd / "state.json", state)
            code = proc.wait()
        (jd / "batch.pid").unlink(missing_ok=True)
        state["exit_codes"].append(code if code >= 0 else 128 - code)
        if (jd / f"requeue_{restart}.json").exists():
            restart += 1
            state.update(state="PENDING", restart_count=restart)
            _write_json(jd / "state.json", state)
            continue
        state.update(state="COMPLETED" if code == 0 else "FAILED", exit_code=state["exit_codes"][-1])
        _write_json(jd / "state.json", state)
        return 0


# --------------------------------------------------------------------------------------------
# srun
# --------------------------------------------------------------------------------------------

def srun(args: list[str]) -> int:
    opts, command = parse_options(args, SRUN_OPTIONS, "srun")
    if not command:
        raise UsageError("srun: no command given")
    if "SLURM_JOB_ID" not in os.environ:
        raise UsageError("srun: this fake runs job steps inside an allocation only (use sbatch)")
    job_id = os.environ["SLURM_JOB_ID"]
    nodelist = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
    nodes = int(opts.get("--nodes", len(nodelist)))
    per_node = int(opts.get("--ntasks-per-node", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    ntasks = int(opts.get("--ntasks", nodes * per_node))
    per_node = -(-ntasks // nodes)
    jd = job_dir(job_id)
    steps = jd / "steps"
    steps.mkdir(exist_ok=True)
    step_id = len(list(steps.glob("*.json")))
    export = str(opts.get("--export", "ALL"))
    base = dict(os.environ) if export.split(",")[0] in ("ALL", "") else {
        k: v for k, v in os.environ.items() if k.startswith("SLURM") or k in ("PATH", "HOME")}
    step_nodes = nodelist[:nodes]
    tasks, placement = [], []
    for rank in range(ntasks):
        node = rank // per_node
        env = dict(base)
        env.update({
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(node),
            "SLURMD_NODENAME": step_nodes[node], "SLURM_TOPOLOGY_ADDR": step_nodes[node],
            "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
            "SLURM_STEP_ID": str(step_id), "SLURM_STEPID": str(step_id),
            "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"], "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "SLURM_SRUN_COMM_HOST": "127.0.0.1",
            "SLURM_GTIDS": ",".join(str(r) for r in range(node * per_node, min((node + 1) * per_node, ntasks))),
        })
        if opts.get("--cpu-bind"):
            env["SLURM_CPU_BIND"] = str(opts["--cpu-bind"])
        tasks.append(subprocess.Popen(command, env=env, start_new_session=True))
        placement.append({k: env[k] for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME")})
    _write_json(steps / f"{step_id}.json", {"srun_pid": os.getpid(), "task_pids": [t.pid for t in tasks],
                                            "command": command, "ntasks": ntasks, "nodes": nodes,
                                            "tasks": placement})

    def forward(signum, _frame):
        for t in tasks:
            if t.poll() is None:
                try:
                    os.kill(t.pid, signum)
                except ProcessLookupError:
                    pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    first_failure = 0
    remaining = list(tasks)
    while remaining:
        for t in list(remaining):
            code = t.poll()
            if code is None:
                continue
            remaining.remove(t)
            code = code if code >= 0 else 128 - code
            if code and not first_failure:
                first_failure = code
                print(f"srun: error: task {tasks.index(t)} exited with exit code {code}", file=sys.stderr, flush=True)
                if opts.get("--kill-on-bad-exit"):
                    print("srun: error: terminating job step (--kill-on-bad-exit)", file=sys.stderr, flush=True)
                    for other in remaining:
                        other.kill()
        time.sleep(0.05)
    info = _read_json(steps / f"{step_id}.json")
    info["exit_code"] = first_failure
    _write_json(steps / f"{step_id}.json", info)
    return first_failure


# --------------------------------------------------------------------------------------------
# scontrol, squeue
# --------------------------------------------------------------------------------------------

def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        nodelist = args[2] if len(args) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        # Every simulated node is this machine's loopback. One write, as the real tool does:
        # `scontrol show hostnames | head -n 1` must not meet a closed pipe.
        _write_stdout("".join("127.0.0.1\n" for _ in expand_nodelist(nodelist)))
        return 0
    if args[:1] == ["requeue"] and len(args) == 2:
        jd = job_dir(args[1])
        if not jd.is_dir():
            raise UsageError(f"scontrol: error: Invalid job id specified: {args[1]}")
        job = _read_json(jd / "job.json")
        state = _read_json(jd / "state.json")
        restart = state["restart_count"]
        _write_json(jd / f"requeue_{restart}.json", {
            "job_id": int(args[1]), "restart_count": restart, "time": time.time(),
            "requeue_allowed": job["requeue"], "caller_restart_env": os.environ.get("SLURM_RESTART_COUNT"),
        })
        return 0
    raise UsageError(f"scontrol: subcommand {' '.join(args[:2])!r} is not supported by the test fake")


def squeue(args: list[str]) -> int:
    opts, _ = parse_options(args, {"-j": True, "--jobs": True, "-h": False, "--noheader": False,
                                   "-o": True, "--format": True, "--me": False, "-u": True}, "squeue")
    wanted = str(opts.get("-j") or opts.get("--jobs") or "")
    fmt = str(opts.get("-o") or opts.get("--format") or "%.10i %.20j %.8T %.6D %R")
    rows = []
    for jd in sorted((_state_dir() / "jobs").iterdir()):
        if wanted and jd.name not in wanted.split(","):
            continue
        job, state = _read_json(jd / "job.json"), _read_json(jd / "state.json")
        if state["state"] not in ("PENDING", "RUNNING"):
            continue
        fields = {"i": str(job["job_id"]), "j": job["name"], "T": state["state"], "t": state["state"][:2],
                  "D": str(job["nodes"]), "R": job["env"]["SLURM_JOB_NODELIST"]}
        rows.append(re.sub(r"%\.?(\d*)([ijTtDR])", lambda m: fields[m.group(2)].rjust(int(m.group(1) or 0)), fmt))
    if not (opts.get("-h") or opts.get("--noheader")):
        print(re.sub(r"%\.?(\d*)([ijTtDR])", lambda m: {"i": "JOBID", "j": "NAME", "T": "STATE", "t": "ST",
                                                         "D": "NODES", "R": "NODELIST"}[m.group(2)].rjust(int(m.group(1) or 0)), fmt))
    for row in rows:
        print(row)
    return 0


# --------------------------------------------------------------------------------------------
# Used by the harness
# --------------------------------------------------------------------------------------------

def deliver_signal(state_dir: str | Path, job_id: int | str, sig: int | None = None) -> str:
    """Send the job's ``#SBATCH --signal`` (or ``sig``) as SLURM would: ``B:`` to the batch shell,
    otherwise to the tasks of every running step (through their srun). Returns where it went."""
    jd = job_dir_in(state_dir, job_id)
    spec = str(_read_json(jd / "job.json").get("signal") or "")
    to_batch = spec.startswith("B:")
    name = spec.split("@")[0].removeprefix("B:") if spec else "TERM"
    signum = sig if sig is not None else getattr(signal, "SIG" + name.removeprefix("SIG"))
    if to_batch:
        os.kill(int((jd / "batch.pid").read_text()), signum)
        return "batch shell"
    sent = 0
    for step in (jd / "steps").glob("*.json"):
        info = _read_json(step)
        if "exit_code" not in info:
            os.kill(info["srun_pid"], signum)
            sent += 1
    if not sent:
        raise RuntimeError(f"job {job_id} has no running step to signal")
    return f"{sent} job step(s)"


def main(program: str, args: list[str]) -> int:
    try:
        if program == "_run_job":
            return run_job(args[0])
        return {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "squeue": squeue}[program](args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
