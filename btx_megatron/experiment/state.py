"""Stage records of an experiment run: what ran, with which configuration and inputs, and
whether its outputs are still intact.

State lives in ``OUT/stages.json``: per stage its status, wall time, the hash of its
configuration, the fingerprints of its inputs and of its outputs. A stage is reused only when
its outputs validate *now* (checkpoint tracker + manifest + every ``.distcp`` file the DCP
metadata references, JSON that parses, PNGs that exist) and its configuration and input
fingerprints are the recorded ones; otherwise it is rebuilt, and the stages after it see new
input fingerprints and rebuild too. A training stage whose output is damaged is rolled back to
its newest intact checkpoint and resumed (resume is bit-exact), so a crash or a deleted file
costs the iterations since that checkpoint, not the stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as fmt
from ..checkpoint.verify import fingerprint, verify_files

STATE_FILE = "stages.json"
STATE_VERSION = 1


class PipelineError(RuntimeError):
    """A stage failed or cannot run; the message names the stage and its log."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def file_fingerprint(path: Path) -> str | None:
    try:
        return sha256_bytes(Path(path).read_bytes())[:16]
    except OSError:
        return None


@dataclass
class Check:
    ok: bool
    reason: str = ""
    fingerprint: dict[str, str] = field(default_factory=dict)
    # Set before a build: may partial progress be resumed? Only when the stage's configuration
    # and inputs are the ones that progress was made with (or nothing is recorded about it).
    resumable: bool = True
    # A finished output this experiment did not record, made with exactly this configuration
    # (a shared, content-addressed run of a sweep): reused as it is.
    adoptable: bool = False


def check_checkpoint_dir(ckpt_dir: Path, label: str, kind: str | None = None) -> Check:
    """One iteration directory: manifest, DCP metadata and every referenced .distcp intact."""
    try:
        manifest = fmt.read_manifest(ckpt_dir)
    except (fmt.CheckpointError, OSError, ValueError) as exc:
        return Check(False, f"{label}: {exc}")
    if kind is not None and manifest.get("kind", "dense") != kind:
        return Check(False, f"{label}: {ckpt_dir} is a {manifest.get('kind')!r} checkpoint, expected {kind!r}")
    try:
        verify_files(ckpt_dir, label)
    except ValueError as exc:
        return Check(False, str(exc))
    return Check(True, fingerprint={"checkpoint": fingerprint(ckpt_dir)})


def check_checkpoint_root(root: Path, label: str, iteration: int | None = None, kind: str | None = None) -> Check:
    """A checkpoint ROOT whose tracker names an intact iteration (``iteration`` if given)."""
    try:
        latest = fmt.read_tracker(root)
    except fmt.CheckpointError as exc:
        return Check(False, f"{label}: {exc}")
    if latest is None:
        return Check(False, f"{label}: no checkpoint in {root} (no {fmt.TRACKER})")
    if iteration is not None and latest != iteration:
        return Check(False, f"{label}: latest checkpoint is iteration {latest}, the stage trains to {iteration}")
    check = check_checkpoint_dir(fmt.iteration_dir(root, latest), label, kind)
    if check.ok:
        check.fingerprint["iteration"] = str(latest)
    return check


def check_training_run(save_dir: Path, label: str, iterations: int, kind: str) -> Check:
    """A finished training run: final checkpoint intact, eval summary and metrics readable."""
    check = check_checkpoint_root(save_dir, label, iterations, kind)
    if not check.ok:
        return check
    summary = read_json(save_dir / "eval_summary.json")
    if not isinstance(summary, dict) or summary.get("iteration") != iterations or "flops" not in summary:
        return Check(False, f"{label}: {save_dir / 'eval_summary.json'} is missing, does not parse or is not "
                            f"the summary of iteration {iterations}")
    if not (save_dir / "metrics.jsonl").is_file():
        return Check(False, f"{label}: {save_dir / 'metrics.jsonl'} is missing")
    check.fingerprint["eval_summary"] = file_fingerprint(save_dir / "eval_summary.json")
    return check


def roll_back_to_intact(save_dir: Path, label: str, kind: str, echo: Callable[[str], None]) -> int | None:
    """Drop damaged iterations of a run so it resumes from its newest intact checkpoint.

    Returns that iteration (None: nothing intact, the run directory's checkpoints are removed).
    The resumed trainer drops the metrics records after it, so nothing is logged twice."""
    iters = sorted((int(p.name[5:]) for p in save_dir.glob("iter_*") if p.name[5:].isdigit()), reverse=True)
    keep = None
    for it in iters:
        d = fmt.iteration_dir(save_dir, it)
        check = check_checkpoint_dir(d, label, kind)
        if check.ok:
            keep = it
            break
        echo(f"[pipeline] {label}: dropping damaged checkpoint {d.name} ({check.reason})")
        shutil.rmtree(d)
    for stale in ("eval_summary.json",):
        (save_dir / stale).unlink(missing_ok=True)
    if keep is None:
        if save_dir.exists():
            shutil.rmtree(save_dir)
        return None
    fmt.write_text_atomic(save_dir / fmt.TRACKER, f"{keep}\n")
    return keep


# ---------------------------------------------------------------------------------------------
# State file
# ---------------------------------------------------------------------------------------------

class State:
    """``OUT/stages.json``: one record per stage, rewritten atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        data = read_json(path)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            data = {"version": STATE_VERSION, "stages": {}}
        self.data = data

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fmt.write_json_atomic(self.path, self.data)


@dataclass
class StageTiming:
    name: str
    action: str         # ran | reused
    seconds: float


class StageRunner:
    """Decides, per stage, reuse or (re)build, and records the outcome in ``stages.json``."""

    def __init__(self, state: State, selected: set[str], echo: Callable[[str], None]):
        self.state = state
        self.selected = selected
        self.echo = echo
        self.timings: list[StageTiming] = []

    def decide(self, name: str, config: Any, inputs: dict[str, Any], validate: Callable[[], Check]):
        """(reuse?, why not, check, config hash, inputs) for one stage record."""
        rec = self.state.stages.get(name)
        chash = config_hash(config)
        inputs = json.loads(json.dumps(inputs, sort_keys=True, default=str))
        check = validate()
        if rec is None and check.ok and check.adoptable:
            why = ""
        elif rec is None:
            why = check.reason if not check.ok else "outputs present but not recorded in stages.json"
        elif rec.get("status") != "done":
            why = f"last attempt {rec.get('status')}" + (f": {check.reason}" if not check.ok else "")
        elif not check.ok:
            why = f"output damaged or incomplete: {check.reason}"
        elif rec.get("config") != chash:
            why = "its configuration changed"
        elif rec.get("inputs") != inputs:
            changed = sorted(k for k in set(inputs) | set(rec.get("inputs", {}))
                             if inputs.get(k) != rec.get("inputs", {}).get(k))
            why = f"its inputs changed ({', '.join(changed)})"
        elif rec.get("outputs") != check.fingerprint:
            why = "its outputs changed since they were recorded"
        else:
            why = ""
        return not why, why, check, chash, inputs

    def ensure(self, name: str, group: str, config: Any, inputs: dict[str, Any],
                validate: Callable[[], Check], build: Callable[[Check], None]) -> dict[str, str]:
        """Reuse stage ``name`` when it validates with the same config and inputs; else build it."""
        return self.ensure_group(group, {name: (config, inputs, validate)},
                                  lambda checks: build(checks[name]), label=name)[name]

    def ensure_group(self, group: str, members: dict[str, tuple], build: Callable[[dict[str, Check]], None],
                      label: str) -> dict[str, dict[str, str]]:
        """Stages built by one action (the branches: one launcher call; evaluation: one worker).

        Members that are up to date are reused; ``build`` gets the checks of the others."""
        results: dict[str, dict[str, str]] = {}
        todo: dict[str, tuple] = {}
        for name, (config, inputs, validate) in members.items():
            reuse, why, check, chash, inputs = self.decide(name, config, inputs, validate)
            if reuse:
                self.echo(f"[pipeline] {name}: up to date, reused")
                self.timings.append(StageTiming(name, "reused", 0.0))
                results[name] = check.fingerprint
                if name not in self.state.stages:  # adopted: record it as this experiment's
                    self.state.stages[name] = {"status": "done", "config": chash, "inputs": inputs,
                                               "outputs": check.fingerprint, "adopted": True, "executions": 0}
                    self.state.save()
            else:
                todo[name] = (why, check, chash, inputs, validate)
        if not todo:
            return results
        if group not in self.selected:
            name, (why, *_) = next(iter(todo.items()))
            raise PipelineError(f"stage {name} must (re)run ({why}) but --stages does not include {group}.")
        now = time.time()
        for name, (why, check, chash, inputs, _) in todo.items():
            prev = self.state.stages.get(name)
            check.resumable = prev is None or (prev.get("config") == chash and prev.get("inputs") == inputs)
            self.echo(f"[pipeline] {name}: running ({why})")
            self.state.stages[name] = {
                "status": "running", "started": now, "config": chash, "inputs": inputs,
                "executions": int((self.state.stages.get(name) or {}).get("executions", 0)) + 1}
        self.state.save()
        started = time.perf_counter()
        try:
            build({name: item[1] for name, item in todo.items()})
            checks = {name: item[4]() for name, item in todo.items()}
            bad = {n: c.reason for n, c in checks.items() if not c.ok}
            if bad:
                raise PipelineError("finished but the output does not validate: "
                                    + "; ".join(f"{n}: {r}" for n, r in bad.items()))
        except BaseException as exc:
            for name in todo:
                self.state.stages[name].update(status="failed", ended=time.time(),
                                               seconds=round(time.perf_counter() - started, 2),
                                               error=str(exc)[-2000:])
            self.state.save()
            raise
        seconds = round(time.perf_counter() - started, 2)
        for name in todo:
            self.state.stages[name].update(status="done", ended=time.time(), seconds=seconds,
                                           outputs=checks[name].fingerprint)
            if len(todo) > 1:
                self.state.stages[name]["built_with"] = sorted(todo)
            results[name] = checks[name].fingerprint
        self.state.save()
        shown = label if len(todo) == len(members) else f"{label} ({', '.join(todo)})"
        self.timings.append(StageTiming(shown, "ran", seconds))
        self.echo(f"[pipeline] {shown}: done in {seconds:.1f}s")
        return results


def eval_check(path: Path, domains: list[str]) -> Callable[[], Check]:
    def validate() -> Check:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
            return Check(False, f"{path} is missing or does not parse")
        for d in domains:
            loss = (data["domains"].get(d) or {}).get("loss")
            if not isinstance(loss, (int, float)) or not math.isfinite(loss):
                return Check(False, f"{path}: no finite loss for domain {d}")
        return Check(True, fingerprint={"result": file_fingerprint(path)})
    return validate
