"""lm-evaluation-harness on Megatron checkpoints (btx_megatron/eval/harness.py) and generation.

A dense and a 4-expert top-2 MoE checkpoint (random weights, large init std: far-from-uniform
logits) are exported with the project's converter (Llama / Mixtral) and scored by lm-eval's own
``hf`` backend on the same built-in tasks (made from the corpora fixture):

* every request's log-likelihood agrees to 1e-4 (fp32), arg-max flags and accuracies are equal,
  greedy ``generate_until`` answers are equal, ``loglikelihood_rolling`` over texts longer than
  the window agrees;
* greedy generation equals Hugging Face ``generate`` token for token for 32 tokens, and for the
  MoE the recorded experts of every generated token equal the exported Mixtral's router top-2;
* a TP2 run (dense) and an EP2 run (MoE) give the single process's figures (marked slow);
* a task whose dataset is missing is one clear line (the other tasks run), code-execution tasks
  need the opt-in, a truncated checkpoint is one clear message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.tools import load_tool
import pytest

from tests.dist_utils import run_distributed

KINDS = ("dense", "moe")


def _make(corpora: str, work: str) -> dict:
    from tests.eval.eval_helpers import make_harness_models

    return make_harness_models(work, corpora)


@pytest.fixture(scope="module")
def models(corpora, tmp_path_factory) -> dict:
    return run_distributed(_make, 1, corpora, str(tmp_path_factory.mktemp("harness")))[0]


def _texts(corpora: str) -> list[str]:
    """One long document start per domain (more than one 128-token window each)."""
    out = []
    for d in ("math", "code", "wiki"):
        with open(Path(corpora) / "jsonl" / f"{d}_train.jsonl") as f:
            out.append(json.loads(f.readline())["text"][:1500])
    return out


def _megatron(models: dict, corpora: str, kind: str, **layout):
    from btx_megatron.eval.harness import MegatronLM
    from tests.eval.eval_helpers import HARNESS_SEQ, tokenizer_flags

    return MegatronLM(models[kind]["ckpt"], seq_length=HARNESS_SEQ, batch_size=8, **layout, **tokenizer_flags(corpora))


def _score(lm, models: dict, corpora: str, selection=None) -> dict:
    """Every built-in task with per-request responses, and rolling log-likelihoods."""
    from lm_eval.api.instance import Instance

    from btx_megatron.eval.harness import load_tasks, run_tasks
    from btx_megatron.eval.tasks import BUILTIN
    from tests.eval.eval_helpers import accuracies, task_responses

    selection = selection or load_tasks(list(BUILTIN), include_path=models["task_dir"], echo=None)
    results = run_tasks(lm, selection, log_samples=True)
    texts = _texts(corpora)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    return {"resps": task_responses(results), "acc": accuracies(results), "rolling": rolling}


def _generate(lm, corpora: str, record_experts: bool = False, **sampling) -> list:
    from btx_megatron.eval.generation import GenerationOptions, generate

    prompts = [lm.tok_encode(t)[:24] for t in _texts(corpora)]
    gens = generate(lm.model, prompts, GenerationOptions(max_new_tokens=32, stop_at_eod=False,
                                                         record_experts=record_experts, **sampling))
    return [{"prompt": p, "tokens": g.tokens, "experts": g.experts} for p, g in zip(prompts, gens)]


def _parity_worker(models: dict, corpora: str, work: str) -> dict:
    import contextlib
    import io

    import torch
    from lm_eval.models.huggingface import HFLM

    from btx_megatron.eval.generation import GenerationOptions, generate
    from btx_megatron.eval.harness import load_tasks
    from btx_megatron.eval.tasks import BUILTIN, TaskSpec
    from tests.eval.eval_helpers import HARNESS_SEQ, tokenizer_flags

    from lm_eval.api.registry import get_model

    from btx_megatron.eval.harness import MODEL_NAME, MegatronLM

    out: dict = {"registered": get_model(MODEL_NAME) is MegatronLM}
    selection = load_tasks(list(BUILTIN), include_path=models["task_dir"], echo=None)  # shared by every run
    for kind in KINDS:
        if kind == "dense":  # lm-eval's own construction path: the registered name and model_args
            tok = tokenizer_flags(corpora)
            lm = get_model(MODEL_NAME).create_from_arg_string(
                f"load={models[kind]['ckpt']},seq_length={HARNESS_SEQ},tokenizer_type={tok['tokenizer_type']},"
                f"tokenizer_model={tok['tokenizer_model']}", {"batch_size": 8, "device": "cpu"})
        else:
            lm = _megatron(models, corpora, kind)
        hf = HFLM(pretrained=models[kind]["hf"], dtype="float32", device="cpu", batch_size=8, max_length=HARNESS_SEQ,
                  add_bos_token=False, prefix_token_id=lm.eot_token_id)
        # The end-of-document token ends a generation in our adapter; the export's generation
        # config names no EOS, so tell HF's generate the same.
        hf.model.generation_config.eos_token_id = lm.eot_token_id
        res = {"megatron": _score(lm, models, corpora, selection), "hf": _score(hf, models, corpora, selection)}
        texts = _texts(corpora) + [json.loads(line)[k] for line in open(Path(models["task_dir"]) / "btx_wiki_cloze.jsonl")
                                   for k in ("context",)]
        res["tokens_equal"] = all(lm.tok_encode(t) == hf.tok_encode(t) for t in texts)
        # Greedy generation against transformers' generate (no end-of-sequence stop on either).
        mine = _generate(lm, corpora, record_experts=kind == "moe")
        hf.model.generation_config.eos_token_id = None
        ref, ref_experts = [], []
        for g in mine:
            ids = hf.model.generate(torch.tensor([g["prompt"]]), max_new_tokens=32, do_sample=False, pad_token_id=0)
            ref.append(ids[0, len(g["prompt"]):].tolist())
            if kind == "moe":
                # The experts that produced token k routed the position before it.
                full = torch.tensor([g["prompt"] + g["tokens"]])
                with torch.no_grad():
                    router_logits = hf.model(full, output_router_logits=True).router_logits
                first = len(g["prompt"]) - 1
                ref_experts.append([{layer + 1: sorted(logits[first + k].topk(2).indices.tolist())
                                     for layer, logits in enumerate(router_logits)} for k in range(32)])
        res["generate"] = {"megatron": [g["tokens"] for g in mine], "hf": ref}
        # generate_until answers: a random model emits stray byte pieces, and the two tokenizers
        # decode invalid UTF-8 differently by design (sentencepiece keeps the valid bytes of a
        # broken run, the HF decoder replaces the run). Our greedy tokens, decoded by HF's
        # tokenizer, must be HF's answers exactly.
        questions = [json.loads(line)["question"] for line in open(Path(models["task_dir"]) / "btx_math_answer.jsonl")]
        gens = generate(lm.model, [lm.tok_encode(q)[-(HARNESS_SEQ - 16):] for q in questions],
                        GenerationOptions(max_new_tokens=16, stop=["\n"]))
        res["math_answers_hf_decoded"] = [(hf.tok_decode(g.tokens).split("\n")[0], "\n" in lm.tok_decode(g.tokens))
                                          for g in gens]
        if kind == "moe":
            res["experts"] = {"megatron": [[{layer: sorted(ids) for layer, ids in step.items()} for step in g["experts"]]
                                           for g in mine], "hf": ref_experts}
        # Sampling: reproducible by seed; top-k 1 is greedy.
        res["sampled"] = [_generate(lm, corpora, temperature=0.9, top_p=0.9, seed=s) for s in (1, 1, 2)]
        res["top1"] = _generate(lm, corpora, temperature=0.7, top_k=1, seed=3)
        out[kind] = res
        del lm, hf

    # Code-execution tasks need the opt-in (a built-in task posing as one stands in).
    lines: list[str] = []
    sel = load_tasks([TaskSpec("btx_code_next_line", "code", unsafe_code=True)], include_path=models["task_dir"],
                     echo=lines.append)
    out["unsafe"] = {"skipped": sel.skipped, "lines": lines}

    # The command line with a task whose dataset is not available offline: one line, the rest run.
    task_dir = Path(work) / "tasks_with_missing"
    shutil.copytree(models["task_dir"], task_dir)
    (task_dir / "btx_missing.yaml").write_text(
        "task: btx_missing\ndataset_path: btx-nonexistent/dataset\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    cli = load_tool("evaluate")

    tok = tokenizer_flags(corpora)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["--load", models["dense"]["ckpt"], "--tasks", "btx-builtin,btx_missing", "--task-dir", str(task_dir),
                       "--seq-length", str(HARNESS_SEQ), "--batch-size", "8", "--output", str(Path(work) / "cli.json"),
                       "--tokenizer-type", tok["tokenizer_type"], "--tokenizer-model", tok["tokenizer_model"]])
    out["cli"] = {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                  "json": json.loads((Path(work) / "cli.json").read_text()) if rc == 0 else None}
    return out


@pytest.fixture(scope="module")
def parity(models, corpora, tmp_path_factory) -> dict:
    return run_distributed(_parity_worker, 1, models, corpora, str(tmp_path_factory.mktemp("parity")))[0]


def _flat_loglikelihoods(resps: dict) -> dict[str, list[tuple[float, bool]]]:
    return {t: [tuple(choice[0]) for doc in docs for choice in doc]
            for t, docs in resps.items() if t != "btx_math_answer"}


@pytest.mark.parametrize("kind", KINDS)
def test_loglikelihoods_equal_lm_eval_hf_backend(parity, kind):
    r = parity[kind]
    assert r["tokens_equal"], "the exported tokenizer tokenizes differently: the comparison below would be moot"
    mine, ref = _flat_loglikelihoods(r["megatron"]["resps"]), _flat_loglikelihoods(r["hf"]["resps"])
    assert set(mine) == {"btx_code_next_line", "btx_wiki_cloze"} and mine.keys() == ref.keys()
    for task in mine:
        assert len(mine[task]) == len(ref[task]) == 12 * 4
        worst = max(abs(a[0] - b[0]) for a, b in zip(mine[task], ref[task]))
        assert worst <= 1e-4, f"{kind} {task}: max |delta log-likelihood| {worst:.2e}"
        assert [a[1] for a in mine[task]] == [b[1] for b in ref[task]], f"{kind} {task}: arg-max flags differ"
        # Guards against comparing constants: the choices' scores differ by far more than 1e-4.
        assert max(a[0] for a in mine[task]) - min(a[0] for a in mine[task]) > 1.0
    # Two computations, not one result read twice (the task objects are shared by both runs).
    assert any(a[0] != b[0] for task in mine for a, b in zip(mine[task], ref[task]))
    assert r["megatron"]["acc"] == r["hf"]["acc"]
    assert set(r["megatron"]["acc"]) == {"btx_math_answer", "btx_code_next_line", "btx_wiki_cloze"}
    # generate_until (greedy, stop "\n", exact match): the same answers where both decode cleanly,
    # and the same tokens everywhere (ours decoded by HF's tokenizer are HF's answers).
    mine_text = [d[0][0] for d in r["megatron"]["resps"]["btx_math_answer"]]
    ref_text = [d[0][0] for d in r["hf"]["resps"]["btx_math_answer"]]
    clean = [(a, b) for a, b in zip(mine_text, ref_text) if "\ufffd" not in a + b]
    assert len(clean) >= 2 and all(a == b for a, b in clean), clean
    for (decoded, sp_newline), ref in zip(r["math_answers_hf_decoded"], ref_text):
        # Equal, or we stopped at a newline that sentencepiece decodes out of a broken byte run
        # and HF's decoder swallows (then HF went on: its answer extends ours).
        assert decoded == ref or (sp_newline and ref.startswith(decoded)), (decoded, ref)
    for a, b in zip(r["megatron"]["rolling"], r["hf"]["rolling"]):
        assert a == pytest.approx(b, abs=1e-3, rel=0) and a < -100  # ~1500 characters: several windows


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_hf_generate(parity, kind):
    g = parity[kind]["generate"]
    assert all(len(t) == 32 for t in g["megatron"])
    assert g["megatron"] == g["hf"]
    assert len({tuple(t) for t in g["megatron"]}) == len(g["megatron"])  # different prompts, different text


def test_generated_tokens_record_the_experts_mixtral_routes_to(parity):
    e = parity["moe"]["experts"]
    mine = e["megatron"]
    assert all(set(step) == {1, 2} and all(len(ids) == 2 for ids in step.values()) for seq in mine for step in seq)
    assert mine == e["hf"]
    assert len({tuple(step[1]) for seq in mine for step in seq}) > 1  # not one constant choice


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_is_seeded_and_top_k_1_is_greedy(parity, kind):
    a, b, c = ([g["tokens"] for g in run] for run in parity[kind]["sampled"])
    assert a == b and a != c
    assert a != parity[kind]["generate"]["megatron"]  # temperature 0.9 / top-p 0.9 actually samples
    assert [g["tokens"] for g in parity[kind]["top1"]] == parity[kind]["generate"]["megatron"]


def test_registered_with_lm_eval(parity):
    assert parity["registered"]


def test_code_execution_tasks_need_the_opt_in(parity):
    u = parity["unsafe"]
    assert "--confirm-run-unsafe-code" in u["skipped"]["btx_code_next_line"]
    assert len(u["lines"]) == 1 and u["lines"][0].startswith("[tasks] skipped btx_code_next_line:")


def test_missing_dataset_is_one_clear_line_and_the_rest_run(parity):
    cli = parity["cli"]
    assert cli["rc"] == 0, cli["stderr"][-2000:]
    assert "Traceback" not in cli["stdout"] + cli["stderr"]
    lines = [ln for ln in (cli["stdout"] + cli["stderr"]).splitlines() if "btx_missing" in ln]
    assert lines and all("btx-nonexistent/dataset" in ln and "not available offline" in ln for ln in lines), lines
    summary = cli["json"]["summary"]
    assert set(summary["skipped"]) == {"btx_missing"}
    assert set(summary["domains"]) == {"math", "code", "wiki"}
    # The command line scores like the library call.
    assert {t: e["value"] for t, e in summary["tasks"].items()} == {
        t: v for t, v in parity["dense"]["megatron"]["acc"].items()}
    assert "btx_missing" not in cli["json"]["lm_eval"]["results"]


LAYOUTS = {"dense": {"tensor_model_parallel_size": 2}, "moe": {"expert_model_parallel_size": 2}}


def _layouts_worker(models: dict, corpora: str) -> dict:
    """Two ranks: the dense model at TP2 (sequence parallel), then the MoE at EP2 (2 of 4
    experts per rank); the model-parallel groups are rebuilt between the two."""
    from btx_megatron.eval.harness import load_tasks
    from btx_megatron.eval.tasks import BUILTIN

    out = {}
    selection = load_tasks(list(BUILTIN), include_path=models["task_dir"], echo=None)
    for kind, layout in LAYOUTS.items():
        lm = _megatron(models, corpora, kind, **layout)
        out[kind] = _score(lm, models, corpora, selection)
        out[kind]["generate"] = [g["tokens"] for g in _generate(lm, corpora)]
        del lm
    return out


@pytest.fixture(scope="module")
def layouts(models, corpora) -> list[dict]:
    return run_distributed(_layouts_worker, 2, models, corpora)


@pytest.mark.slow  # two ranks importing lm-eval and running every task twice: ~2-3 min on 2 busy cores
@pytest.mark.parametrize("kind", LAYOUTS, ids=["tp2", "ep2"])
def test_tp2_and_ep2_equal_one_process(parity, layouts, kind):
    single = parity[kind]["megatron"]
    for rank_result in layouts:
        r = rank_result[kind]
        mine, ref = _flat_loglikelihoods(r["resps"]), _flat_loglikelihoods(single["resps"])
        for task in ref:
            worst = max(abs(a[0] - b[0]) for a, b in zip(mine[task], ref[task]))
            assert worst <= 1e-4, f"{kind} {LAYOUTS[kind]} {task}: {worst:.2e}"
        assert r["acc"] == single["acc"]
        assert r["resps"]["btx_math_answer"] == single["resps"]["btx_math_answer"]
        assert r["generate"] == parity[kind]["generate"]["megatron"]
        assert r["rolling"] == pytest.approx(single["rolling"], abs=1e-3, rel=0)


def test_truncated_checkpoint_is_one_clear_message(models, tmp_path):
    from btx_megatron import checkpoint as fmt
    from btx_megatron.eval.loading import ModelLoadOptions, load_for_eval

    copy = tmp_path / "dense"
    shutil.copytree(models["dense"]["ckpt"], copy)
    ckpt_dir, _ = fmt.resolve(copy)
    victim = max(ckpt_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated") as info:
        load_for_eval(str(copy), ModelLoadOptions(tokenizer_type="NullTokenizer"))
    assert victim.name in str(info.value) and "--load" in str(info.value)


def test_skip_reasons_name_the_dataset_or_the_missing_package():
    from types import SimpleNamespace

    from btx_megatron.eval.harness import _dataset_reason

    tm = SimpleNamespace(task_index={
        "grp": SimpleNamespace(cfg={"group": "grp", "task": ["a", "b"]}),
        "a": SimpleNamespace(cfg={"task": "a", "dataset_path": "org/data_a", "dataset_name": "main"}),
        "b": SimpleNamespace(cfg={"task": "b", "dataset_path": "org/data_b"})})
    offline = _dataset_reason(tm, "grp", ConnectionError("Couldn't reach 'org/data_a' on the Hub (OfflineModeIsEnabled)"))
    assert "org/data_a (main), org/data_b" in offline and "not available offline" in offline
    assert "HF_DATASETS_CACHE" in offline
    packages = _dataset_reason(tm, "a", ModuleNotFoundError("`sympy` is required"))
    assert "Python packages" in packages and "sympy" in packages and "offline" not in packages
    unnamed = _dataset_reason(SimpleNamespace(task_index={}), "x", ConnectionError("Couldn't reach 'cais/mmlu' on the Hub"))
    assert "cais/mmlu" in unnamed
    other = _dataset_reason(tm, "b", KeyError("doc_to_text"))
    assert other.startswith("could not be built") and "org/data_b" in other
