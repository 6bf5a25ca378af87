"""Stage jobs of the experiment pipeline, each a library call in a child process.

    python -m btx_megatron.experiment.worker JOB SPEC.json

``SPEC.json`` holds the job's options (the pipeline writes it and hashes it as the stage's
configuration). Running each job in its own process keeps its log, its memory and its process
group apart from the pipeline; the job itself is an ordinary library function (each job imports
only what it needs, so a corpora build does not load the model stack):

    corpora    btx_megatron.data.corpora.build_corpora
    merge      btx_megatron.merge.run_merge (BTX merge, or the upcycling baseline's)
    evaluate   btx_megatron.eval.perplexity.evaluate_checkpoint per model (+ eval.btm for BTM)
    routing    btx_megatron.eval.routing.analyze (routing.json + heatmaps)
    tasks      btx_megatron.eval.harness.evaluate_checkpoints_on_tasks on the built-in
               downstream tasks (btx_megatron.eval.tasks), per model

and the grow stage's (:mod:`.grow`):

    extra_domain  btx_megatron.data.extra_domains.build_extra_domain (the new domain's data)
    add           btx_megatron.merge.edit.add_expert (a branch as a new expert)
    remove        btx_megatron.merge.edit.remove_expert
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as fmt


def corpora(spec: dict[str, Any]) -> None:
    from ..data.corpora import CorporaConfig, build_corpora

    build_corpora(CorporaConfig(**spec))


def merge(spec: dict[str, Any]) -> None:
    from ..merge import MergeOptions, run_merge

    run_merge(MergeOptions(**spec))


def routing(spec: dict[str, Any]) -> None:
    from ..eval.routing import RoutingAnalysisOptions, analyze

    analyze(RoutingAnalysisOptions(**spec))


def evaluate(spec: dict[str, Any]) -> None:
    """Every model of ``spec["models"]`` on the same per-domain sequences; one JSON per model."""
    from ..eval.perplexity import evaluate_checkpoint, summarize

    common = {"tokenizer_type": spec["tokenizer_type"], "tokenizer_model": spec["tokenizer_model"],
              "num_samples": spec["num_samples"]}
    # BTM scores every branch alone on the same sequences on its way to the ensemble: run it
    # first and take those figures for the branch rows instead of evaluating the branches twice.
    order = sorted(spec["models"], key=lambda n: "btm" not in spec["models"][n])
    alone: dict[str, dict] = {}
    for name in order:
        model = spec["models"][name]
        started = time.perf_counter()
        if "btm" in model:
            from ..eval.btm import BTMOptions, evaluate_btm

            result = evaluate_btm(model["btm"], model["train_data"], spec["domains"],
                                  btm=BTMOptions(topk=model["top_k"]), **common)
            for branch, path in model["btm"].items():
                alone[str(path)] = {"checkpoint": str(path), "kind": "dense", "scored_in": "btm",
                                    "seq_length": result["seq_length"], "num_samples": result["num_samples"],
                                    "domains": result["branches"][branch], **summarize(result["branches"][branch])}
        elif str(model["path"]) in alone:
            result = alone[str(model["path"])]
        else:
            result = evaluate_checkpoint(model["path"], spec["domains"], force_expert=model.get("force_expert"),
                                         **common)
        result["model"] = name
        result["eval_seconds"] = round(time.perf_counter() - started, 2)
        fmt.write_json_atomic(spec["outputs"][name], result)
        print(f"[eval] {name}: average loss {result['average_loss']:.4f} in {result['eval_seconds']:.1f}s", flush=True)


def tasks(spec: dict[str, Any]) -> None:
    """The built-in downstream tasks (made from the corpora's held-out documents), then every
    model of ``spec["models"]`` on them; one JSON of per-domain accuracies per model."""
    from ..eval.harness import evaluate_checkpoints_on_tasks
    from ..eval.loading import ModelLoadOptions
    from ..eval.tasks import build_builtin_tasks

    build_builtin_tasks(spec["corpora"], spec["task_dir"], num_items=spec["num_items"], max_tokens=spec["max_tokens"],
                        tokenizer_model=spec["tokenizer_model"])
    opts = ModelLoadOptions(tokenizer_type=spec["tokenizer_type"], tokenizer_model=spec["tokenizer_model"])
    # The tasks are built once for every model; each model's JSON is written as it finishes.
    evaluate_checkpoints_on_tasks(spec["models"], spec["task_dir"], opts=opts, done=lambda name, result:
                                  fmt.write_json_atomic(spec["outputs"][name], {"model": name, **result}))


def extra_domain(spec: dict[str, Any]) -> None:
    from ..data.extra_domains import ExtraDomainConfig, build_extra_domain

    build_extra_domain(ExtraDomainConfig(**spec))


def add(spec: dict[str, Any]) -> None:
    from ..merge.edit import add_expert
    from ..merge.edit_options import AddOptions

    add_expert(AddOptions(**{**spec, "branch": tuple(spec["branch"])}))


def remove(spec: dict[str, Any]) -> None:
    from ..merge.edit import remove_expert
    from ..merge.edit_options import RemoveOptions

    remove_expert(RemoveOptions(**spec))


JOBS: dict[str, Callable[[dict[str, Any]], None]] = {
    "corpora": corpora, "merge": merge, "evaluate": evaluate, "routing": routing, "tasks": tasks,
    "extra_domain": extra_domain, "add": add, "remove": remove}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in JOBS:
        print(f"usage: python -m btx_megatron.experiment.worker {{{','.join(JOBS)}}} SPEC.json", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    from ..runtime.distributed import run_entrypoint

    spec = json.loads(Path(argv[1]).read_text())
    return run_entrypoint(lambda: JOBS[argv[0]](spec))


if __name__ == "__main__":
    sys.exit(main())
