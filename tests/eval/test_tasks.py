"""Task suites, the built-in offline tasks and the sampling filters (no model involved)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from btx_megatron.eval.generation import GenerationOptions, filter_logits
from btx_megatron.eval.tasks import BTX_PAPER, BUILTIN, build_builtin_tasks, code_items, math_items, resolve_task_specs


def test_btx_paper_suite_has_the_paper_tasks_shots_and_domains():
    by = {s.name: s for s in BTX_PAPER}
    assert {n: (s.domain, s.num_fewshot) for n, s in by.items() if s.domain in ("math", "code", "world knowledge")} == {
        "gsm8k": ("math", 8), "minerva_math": ("math", 4), "humaneval": ("code", 0), "mbpp": ("code", 3),
        "nq_open": ("world knowledge", 5), "triviaqa": ("world knowledge", 5)}
    assert by["mmlu"].domain == "general" and by["mmlu"].num_fewshot == 5
    assert {n for n, s in by.items() if s.domain == "reasoning"} == {
        "arc_easy", "arc_challenge", "social_iqa", "piqa", "winogrande", "hellaswag", "boolq"}
    assert {n for n, s in by.items() if s.unsafe_code} == {"humaneval", "mbpp"}


def test_resolve_task_specs():
    specs = resolve_task_specs("btx-builtin, gsm8k:3, arc_easy, my_task:2")
    by = {s.name: s for s in specs}
    assert list(by)[:3] == [s.name for s in BUILTIN]
    assert by["gsm8k"].num_fewshot == 3 and by["gsm8k"].domain == "math"   # the suite's domain, shots overridden
    assert by["arc_easy"].num_fewshot == 0
    assert by["my_task"].domain == "my_task" and by["my_task"].num_fewshot == 2
    with pytest.raises(ValueError, match="few-shot count"):
        resolve_task_specs("gsm8k:x")
    with pytest.raises(ValueError, match="names no task"):
        resolve_task_specs(" , ")


def test_math_items_recover_the_worksheet_answers():
    from btx_megatron.data.math_problems import PROBLEM_KINDS, math_document

    docs = [math_document(7, i) for i in range(20)]
    items = math_items(docs)
    assert len(items) == sum(d.count("\nAnswer: ") for d in docs) > 40
    # Regenerate the same problems: every parsed answer is the generator's answer.
    answers = []
    for i in range(20):
        rng = random.Random(f"btx-math-7-{i}")
        rng.choice(["x"] * 5)  # the title draw (5 titles)
        for _ in range(rng.randint(3, 8)):
            answers.append(rng.choice(PROBLEM_KINDS)(rng)[2])
    assert [it["answer"] for it in items] == answers
    assert all(it["question"].endswith("\nAnswer:") and "Step 1:" in it["question"] for it in items)


def test_code_items_offer_the_true_line_among_four():
    text = "\n".join(["import os", "", "def f(a, b):", "    total = a + b", "    value = total * 2",
                      "    return compute(value, total)", "x = f(1, 2)", "y = [x for x in range(3)]"])
    items = code_items([text, text.replace("total", "acc")], random.Random(0), context_chars=400)
    assert items
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        true = it["choices"][it["gold"]]
        indents = {c[: len(c) - len(c.lstrip())] for c in it["choices"]}
        assert len(indents) == 1  # indentation gives nothing away
        assert true.strip() in text.replace("total", "acc") + text


def test_build_builtin_tasks_is_deterministic_and_fits_the_window(corpora, tmp_path):
    import sentencepiece as spm

    a = build_builtin_tasks(corpora, tmp_path / "a", num_items=10, split="train", max_tokens=128)
    b = build_builtin_tasks(corpora, tmp_path / "b", num_items=10, split="train", max_tokens=128)
    assert {t: r["items"] for t, r in a["tasks"].items()} == {s.name: 10 for s in BUILTIN}
    sp = spm.SentencePieceProcessor(model_file=f"{corpora}/tokenizer/tokenizer.model")
    for spec in BUILTIN:
        assert (tmp_path / "a" / f"{spec.name}.jsonl").read_text() == (tmp_path / "b" / f"{spec.name}.jsonl").read_text()
        rows = [json.loads(line) for line in (tmp_path / "a" / f"{spec.name}.jsonl").read_text().splitlines()]
        for row in rows:
            prompt = row.get("question") or row["context"]
            assert len(sp.encode(prompt)) <= 128
        yaml_text = (tmp_path / "a" / f"{spec.name}.yaml").read_text()
        assert f"task: {spec.name}" in yaml_text and str((tmp_path / "a" / f"{spec.name}.jsonl").resolve()) in yaml_text
    assert a == b
    with pytest.raises(ValueError, match="build the corpora first"):
        build_builtin_tasks(tmp_path / "nowhere", tmp_path / "c")


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top-p 0.7: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> the two most likely stay
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.81)).tolist() == [[False, False, False, True]]
    kept = filter_logits(logits, 0.5, 0, 1.0)
    assert torch.allclose(kept.softmax(-1), (logits / 0.5).softmax(-1))
    with pytest.raises(ValueError, match="top-p"):
        GenerationOptions(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationOptions(temperature=-1)
