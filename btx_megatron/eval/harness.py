"""lm-evaluation-harness on Megatron checkpoints: the ``btx-megatron`` model and task runs.

:class:`MegatronLM` is an lm-eval model (``lm_eval.api.model.TemplateLM``) over a checkpoint
loaded by :func:`.loading.load_for_eval` at any TP/PP/EP layout, on CPU (gloo) or GPU; it
implements ``loglikelihood`` (through ``TemplateLM``'s context/continuation encoding),
``loglikelihood_rolling`` and ``generate_until`` (greedy, or sampling with temperature / top-k /
top-p; stop sequences; ``max_gen_toks``). Requests are batched, longest first. Importing this
module registers the name with lm-eval, so after ``import btx_megatron.eval.harness``,
``lm_eval.simple_evaluate(model="btx-megatron", model_args="load=CKPT,batch_size=16")`` works
(lm-eval has no entry-point discovery for external models; its CLI only knows its own).
``tools/evaluate.py --tasks ...`` is the command line.

Conventions, chosen to match lm-eval's ``hf`` backend on the same checkpoint exported with
``tools/convert_hf.py export`` (see ``tests/eval/test_harness.py``):

* Text is tokenized with the checkpoint's tokenizer and no BOS (documents start as in
  training); an empty context is the end-of-document token (``prefix_token_id``). For the
  ``hf`` backend pass ``add_bos_token=False,prefix_token_id=<eod>``.
* Inputs longer than the model's sequence length are cut from the left, as lm-eval does.
* Log-probabilities use the tokenizer's vocabulary, not the padded one (:mod:`.inference`).

Distributed: every process of a torchrun/srun launch runs the same requests (the ranks of one
model replica work together on each batch); lm-eval sees one process (``rank`` 0,
``world_size`` 1) and every rank gets the same results. Data parallelism over requests is not
used.

Datasets are read offline: ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` default to 1 here,
so a missing dataset is reported (one line, the task skipped) instead of downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from .generation import GenerationOptions, generate  # noqa: E402
from .inference import InferenceModel  # noqa: E402
from .loading import LoadedModel, ModelLoadOptions, load_for_eval, rank  # noqa: E402
from .tasks import TaskSpec  # noqa: E402

MODEL_NAME = "btx-megatron"


@register_model(MODEL_NAME)
class MegatronLM(TemplateLM):
    """A btx-megatron checkpoint as an lm-eval model.

    ``load``: checkpoint ROOT or iteration directory (or pass an already ``loaded`` model).
    Other keywords: :class:`.loading.ModelLoadOptions` fields (tokenizer, ``seq_length``,
    parallel sizes, ``bf16``), ``batch_size`` (requests per forward pass), ``max_gen_toks``
    (default generation budget), ``prefix_token_id`` (context of an empty-context request;
    default the end-of-document token) and ``seed`` (sampling)."""

    def __init__(self, load: str | None = None, *, loaded: LoadedModel | None = None, batch_size: int | str = 16,
                 max_gen_toks: int = 256, prefix_token_id: int | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **load_options):
        super().__init__()
        del device, max_batch_size  # the device follows Megatron's set-up; batches are fixed-size
        if loaded is None:
            if not load:
                raise ValueError("btx-megatron needs load=CHECKPOINT (model_args 'load=...').")
            known = {f.name for f in dataclasses.fields(ModelLoadOptions)}
            unknown = sorted(set(load_options) - known)
            if unknown:
                raise ValueError(f"btx-megatron: unknown model_args {unknown}; known: load, batch_size, "
                                 f"max_gen_toks, prefix_token_id, {', '.join(sorted(known))}.")
            loaded = load_for_eval(load, ModelLoadOptions(**load_options))
        self.loaded = loaded
        self.model = InferenceModel(loaded)
        self.tokenizer = loaded.tokenizer
        self._batch_size = 16 if isinstance(batch_size, str) else int(batch_size)  # "auto" -> 16
        if self._batch_size < 1:
            raise ValueError(f"btx-megatron: batch_size must be >= 1, got {batch_size}.")
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = prefix_token_id
        self.seed = int(getattr(loaded.cfg.train, "seed", 1234))

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eod)

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id if self._prefix_token_id is None else int(self._prefix_token_id)

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.cfg.data.tokenizer_model or self.loaded.cfg.data.tokenizer_type)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.tokenize(string)) if string else []

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.detokenize(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        m = self.loaded.cfg.model
        return {"checkpoint": str(self.loaded.ckpt_dir), "iteration": self.loaded.iteration,
                "num_experts": m.num_experts, "router_type": m.moe_router_type if m.is_moe else None,
                "layout": {"tp": self.loaded.cfg.parallel.tensor_model_parallel_size,
                           "pp": self.loaded.cfg.parallel.pipeline_model_parallel_size,
                           "ep": self.loaded.cfg.parallel.expert_model_parallel_size}}

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``[((context, continuation), context_ids, continuation_ids)]`` -> (log p, greedy)."""
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"loglikelihood request {i} has an empty continuation.")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((i, whole[:-1], whole[1:], len(cont)))
        # Longest first: the batch's padded length is its first row's, as in lm-eval's backends.
        rows.sort(key=lambda r: (-len(r[1]), r[1]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            scores = self.model.token_logprobs([r[1] for r in chunk], [r[2] for r in chunk])
            for (i, _, _, n), s in zip(chunk, scores):
                out[i] = (float(sum(s.logprobs[-n:])), bool(all(s.greedy[-n:])))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-likelihood in disjoint windows of the model's length (the
        first conditioned on ``prefix_token_id``), as lm-eval's ``hf`` backend computes it."""
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for key, members in groups.items():
            kwargs = normalize_gen_kwargs(json.loads(key), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below the model's sequence length {self.max_length}.")
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            if kwargs.get("do_sample") and temperature == 0.0:
                temperature = 1.0  # do_sample without a temperature samples at 1, as in HF
            opts = GenerationOptions(
                max_new_tokens=max_new, temperature=temperature if kwargs.get("do_sample") else 0.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0), top_k=int(kwargs.get("top_k", 0) or 0),
                stop=list(until), seed=int(kwargs.get("seed", self.seed)), batch_size=self.batch_size)
            budget = self.max_length - max_new
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] or [self.prefix_token_id] for i in members]
            order = sorted(range(len(members)), key=lambda j: -len(prompts[j]))
            gens = generate(self.model, [prompts[j] for j in order], opts)
            for j, g in zip(order, gens):
                out[members[j]] = g.text
                self.cache_hook.add_partial("generate_until", requests[members[j]].args, g.text)
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Task runs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskSelection:
    """Tasks ready to evaluate, the few-shot count of each and what was skipped (and why)."""

    tasks: dict[str, Any]                        # lm-eval TaskDict: {"tasks", "groups", "group_map"}
    num_fewshot: dict[str, int | None]           # requested name -> shots (None: the task's default)
    domains: dict[str, str]                      # requested name -> domain
    metrics: dict[str, str]                      # requested name -> primary metric key
    skipped: dict[str, str]                      # requested name -> one-line reason


def load_tasks(specs: list[TaskSpec], *, include_path: str | list[str] | None = None,
               include_defaults: bool | None = None, confirm_run_unsafe_code: bool = False,
               echo=print) -> TaskSelection:
    """Build every requested task; a task that cannot be built (its dataset is not available
    offline, code execution not confirmed, unknown name) is skipped with one line, naming it.

    ``include_defaults`` None: lm-eval's own task files (~15k, slow to index) are indexed only
    when ``include_path`` does not define every requested name."""
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    tm = None
    if include_defaults is None and include_path:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if any(spec.name not in tm.task_index for spec in specs):
            tm = None
    if tm is None:
        tm = TaskManager(include_path=include_path, include_defaults=include_defaults is not False)
    merged: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    sel = TaskSelection(merged, {}, {}, {}, {})
    for spec in specs:
        entry = tm.task_index.get(spec.name)
        if entry is None:
            sel.skipped[spec.name] = (f"unknown task {spec.name!r} (not in lm-eval's registry"
                                      + (f" nor in {include_path}" if include_path else "") + ")")
        elif (spec.unsafe_code or (entry.cfg or {}).get("unsafe_code")) and not confirm_run_unsafe_code:
            sel.skipped[spec.name] = ("executes model-written code; pass --confirm-run-unsafe-code to run it "
                                      "(lm-eval's opt-in)")
        else:
            try:
                loaded = tm.load([spec.name])
            except Exception as exc:  # noqa: BLE001 - any failure to build a task skips that task
                sel.skipped[spec.name] = _dataset_reason(tm, spec.name, exc)
            else:
                for key in ("tasks", "groups", "group_map"):
                    merged[key].update(loaded.get(key) or {})
                for task in loaded["tasks"].values():
                    if spec.num_fewshot is not None:
                        task.set_config(key="num_fewshot", value=spec.num_fewshot)
                    elif task.get_config("num_fewshot") is None:
                        task.set_config(key="num_fewshot", value=0)
                sel.num_fewshot[spec.name] = spec.num_fewshot
                sel.domains[spec.name] = spec.domain
                sel.metrics[spec.name] = spec.metric
                continue
        if echo:
            echo(f"[tasks] skipped {spec.name}: {sel.skipped[spec.name]}")
    return sel


def _dataset_reason(tm, name: str, exc: Exception) -> str:
    """One line for a task that could not be built: a dataset missing offline (named, with the
    fix), a Python package the task needs, or else the error itself."""
    import re

    detail = str(exc).splitlines()[0][:160] if str(exc) else ""
    if isinstance(exc, ImportError):
        return (f"lm-eval needs more Python packages for this task ({type(exc).__name__}: {detail}); install "
                "them (lm-eval's extras, e.g. pip install 'lm-eval[math]==0.4.13') to run it")
    datasets: set[str] = set()

    def collect(n: str, depth: int = 0) -> None:
        entry = tm.task_index.get(n)
        if entry is None or depth > 4:
            return
        cfg = entry.cfg or {}
        if cfg.get("dataset_path"):
            datasets.add(str(cfg["dataset_path"]) + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""))
        children = cfg.get("task")
        for child in children if isinstance(children, list) else []:
            if isinstance(child, str):
                collect(child, depth + 1)

    collect(name)
    if not datasets:
        datasets.update(re.findall(r"reach '([^']+)'", str(exc)))
    what = (", ".join(sorted(datasets)[:3]) + (" ..." if len(datasets) > 3 else "")) if datasets else "(unnamed)"
    offline = isinstance(exc, (ConnectionError, FileNotFoundError, OSError)) or "Offline" in str(exc) \
        or type(exc).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError")
    if offline:
        return (f"dataset {what} is not available offline ({type(exc).__name__}: {detail}); put it in the "
                "Hugging Face datasets cache (HF_DATASETS_CACHE), or set HF_DATASETS_OFFLINE=0 on a machine "
                "with network access")
    return f"could not be built (dataset {what}; {type(exc).__name__}: {detail})"


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def run_tasks(lm: MegatronLM, selection: TaskSelection, *, limit: int | float | None = None,
              confirm_run_unsafe_code: bool = False, log_samples: bool = False,
              bootstrap_iters: int = 0, seed: int = 1234) -> dict[str, Any]:
    """lm-eval's ``evaluate`` on the selected tasks; returns its results dict (every rank)."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    if not selection.tasks["tasks"]:
        raise ValueError("no task could be built (see the [tasks] lines above); nothing to evaluate.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for task in selection.tasks["tasks"].values():
        task.set_fewshot_seed(seed=seed)
    results = evaluate(lm=lm, task_dict=selection.tasks, limit=limit, bootstrap_iters=bootstrap_iters,
                       log_samples=log_samples, confirm_run_unsafe_code=confirm_run_unsafe_code, verbosity="ERROR")
    return results or {}


def primary_score(results: dict[str, Any], name: str, metric: str | None) -> tuple[str, float] | None:
    """(metric key, value) of task or group ``name`` in lm-eval's results."""
    table = (results.get("groups") or {}).get(name) or (results.get("results") or {}).get(name)
    if not table:
        return None
    keys = [k for k, v in table.items() if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"]
    if metric:
        wanted = [k for k in keys if k == metric or k.split(",")[0] == metric]
        if wanted:
            return wanted[0], float(table[wanted[0]])
    return (keys[0], float(table[keys[0]])) if keys else None


def domain_summary(results: dict[str, Any], selection: TaskSelection) -> dict[str, Any]:
    """Per task its primary metric; per domain the unweighted mean of its tasks (the paper's
    per-category averages); ``average`` over every task."""
    per_task: dict[str, dict[str, Any]] = {}
    for name, domain in selection.domains.items():
        score = primary_score(results, name, selection.metrics.get(name))
        if score is not None:
            per_task[name] = {"domain": domain, "metric": score[0], "value": score[1],
                              "num_fewshot": selection.num_fewshot.get(name)}
    domains: dict[str, list[float]] = {}
    for entry in per_task.values():
        domains.setdefault(entry["domain"], []).append(entry["value"])
    return {"tasks": per_task, "domains": {d: sum(v) / len(v) for d, v in sorted(domains.items())},
            "average": sum(e["value"] for e in per_task.values()) / len(per_task) if per_task else None,
            "skipped": dict(selection.skipped)}


def evaluate_tasks(path: str | Path, specs: list[TaskSpec], opts: ModelLoadOptions | None = None, *,
                   batch_size: int = 16, include_path: str | None = None, corpora: str | None = None,
                   task_items: int = 40, limit: int | float | None = None, confirm_run_unsafe_code: bool = False,
                   log_samples: bool = False, echo=print) -> dict[str, Any]:
    """One checkpoint on ``specs``: ``{"lm_eval": results, "summary": domain_summary(...)}``.

    Built-in tasks (``btx-builtin``) are read from ``include_path``, or first made there (a
    temporary directory if none) from ``corpora``'s held-out documents."""
    lm = MegatronLM(loaded=load_for_eval(path, opts or ModelLoadOptions()), batch_size=batch_size)
    include_path = prepare_builtin_tasks(specs, include_path, corpora, task_items, max_tokens=lm.max_length)
    selection = load_tasks(specs, include_path=include_path, confirm_run_unsafe_code=confirm_run_unsafe_code,
                           echo=echo if rank() == 0 else None)
    started = time.perf_counter()
    results = run_tasks(lm, selection, limit=limit, confirm_run_unsafe_code=confirm_run_unsafe_code,
                        log_samples=log_samples, seed=lm.seed)
    summary = domain_summary(results, selection)
    summary["eval_seconds"] = round(time.perf_counter() - started, 2)
    return {"lm_eval": _jsonable(results), "summary": summary, "checkpoint": str(lm.loaded.ckpt_dir)}


def prepare_builtin_tasks(specs: list[TaskSpec], task_dir: str | None, corpora: str | None, num_items: int,
                          max_tokens: int | None = None) -> str | None:
    """The directory holding the built-in tasks ``specs`` asks for (made by rank 0 from
    ``corpora`` when given; every rank waits for it). ``task_dir`` is returned unchanged when
    no built-in task is asked for."""
    import tempfile

    import torch

    from .tasks import BUILTIN, build_builtin_tasks

    if not {s.name for s in BUILTIN} & {s.name for s in specs}:
        return task_dir
    if corpora is None:
        if task_dir is None:
            raise ValueError("the btx-builtin tasks are made from the corpora: pass --corpora DIR "
                             "(or --task-dir DIR holding tasks an earlier run wrote).")
        return task_dir
    if task_dir is None:
        box = [tempfile.mkdtemp(prefix="btx_builtin_tasks_") if rank() == 0 else None]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(box, src=0)
        task_dir = box[0]
    if rank() == 0:
        build_builtin_tasks(corpora, task_dir, num_items=num_items, max_tokens=max_tokens)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return task_dir


def evaluate_checkpoints_on_tasks(checkpoints: dict[str, str], task_dir: str | Path, *,
                                  specs: list[TaskSpec] | None = None, opts: ModelLoadOptions | None = None,
                                  batch_size: int = 32, limit: int | float | None = None,
                                  echo=print, done: Callable[[str, dict[str, Any]], None] | None = None
                                  ) -> dict[str, dict[str, Any]]:
    """Every checkpoint ({row name: path}) on the tasks in ``task_dir`` (default: the built-in
    ones, see :func:`.tasks.build_builtin_tasks`), in this process, one model at a time;
    ``done(name, summary)`` is called as each finishes.

    The tasks are built once and shared. Returns ``{name: {"domains": {domain: accuracy},
    "tasks": {task: {"domain", "metric", "value", "num_fewshot"}}, "average", "skipped",
    "eval_seconds", "checkpoint"}}``: the per-domain accuracies for the results table."""
    from .tasks import BUILTIN

    specs = list(specs or BUILTIN)
    builtin = {s.name for s in BUILTIN}
    # Built-in tasks live in task_dir only: lm-eval's own ~15k task files are not indexed for them
    # (a built-in task without items was left out by build_builtin_tasks, which says why).
    selection = load_tasks(specs, include_path=str(task_dir),
                           include_defaults=False if all(s.name in builtin for s in specs) else None, echo=None)
    record = Path(task_dir) / "tasks.json"
    made = json.loads(record.read_text())["tasks"] if record.is_file() else {}
    for name in selection.skipped:
        if made.get(name, {}).get("skipped"):
            selection.skipped[name] = made[name]["skipped"]
        if echo and rank() == 0:
            echo(f"[tasks] skipped {name}: {selection.skipped[name]}")
    out = {}
    for name, path in checkpoints.items():
        started = time.perf_counter()
        lm = MegatronLM(loaded=load_for_eval(path, opts or ModelLoadOptions()), batch_size=batch_size)
        summary = domain_summary(run_tasks(lm, selection, limit=limit, seed=lm.seed), selection)
        summary["eval_seconds"] = round(time.perf_counter() - started, 2)
        summary["checkpoint"] = str(lm.loaded.ckpt_dir)
        out[name] = summary
        if done is not None:
            done(name, summary)
        if echo and rank() == 0:
            figures = ", ".join(f"{d} {v:.3f}" for d, v in summary["domains"].items())
            echo(f"[tasks] {name}: {figures} in {summary['eval_seconds']:.1f}s")
    return out


def _jsonable(obj):
    """lm-eval's results with anything JSON cannot hold (numpy scalars, dtypes...) as text."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


__all__ = ["MODEL_NAME", "MegatronLM", "TaskSelection", "domain_summary", "evaluate_checkpoints_on_tasks", "evaluate_tasks", "load_tasks", "prepare_builtin_tasks",
           "primary_score", "run_tasks"]
