"""Downstream task suites: the paper's (``btx-paper``) and built-in offline tasks for the tiny
experiment (``btx-builtin``), as lm-evaluation-harness task specs.

``btx-paper`` names lm-eval's own tasks with the BTX paper's shot counts and the domain each
belongs to (Sukhbaatar et al. 2024, Section 4: math GSM8K 8-shot and MATH 4-shot; code
HumanEval 0-shot and MBPP 3-shot; world knowledge NaturalQuestions and TriviaQA 5-shot;
reasoning ARC-Easy, ARC-Challenge, SIQA, PIQA, WinoGrande 0-shot, plus HellaSwag and BoolQ
0-shot as in Llama-2's commonsense suite; general knowledge MMLU 5-shot). It runs on whatever
datasets are in the local Hugging Face cache; the code tasks run only with
``--confirm-run-unsafe-code``.

``btx-builtin`` is made offline from the built-in corpora's held-out documents
(:mod:`btx_megatron.data.corpora`), one task per domain, sized so ~10 tiny checkpoints take
well under three minutes on two cores:

- ``btx_math_answer`` (math, ``generate_until``, exact match): a worksheet problem with its
  worked steps, ending ``Answer:``; the model must produce the answer line (the worksheets
  come from :mod:`btx_megatron.data.math_problems`, so the answer is known).
- ``btx_code_next_line`` (code, multiple choice, 4 options): the preceding lines of a Python
  file; the true next line against three lines from other files, indented alike.
- ``btx_wiki_cloze`` (wiki, multiple choice, 4 options): prose up to a sentence's last word;
  the true word against three other sentence-final words.

:func:`build_builtin_tasks` writes ``DIR/<task>.jsonl`` + ``DIR/<task>.yaml`` (lm-eval task
files; ``lm_eval --include_path DIR`` reads them too) and ``DIR/tasks.json`` (what was built).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str                     # lm-eval task or group name
    domain: str                   # the results table's column
    num_fewshot: int | None = None  # None: the task's own default
    metric: str | None = None     # primary metric key (lm-eval's "metric,filter"); None: the first
    unsafe_code: bool = False     # executes model-written code (needs an explicit opt-in)


BTX_PAPER: tuple[TaskSpec, ...] = (
    TaskSpec("gsm8k", "math", 8, "exact_match,strict-match"),
    TaskSpec("minerva_math", "math", 4, "exact_match"),
    TaskSpec("humaneval", "code", 0, "pass@1", unsafe_code=True),
    TaskSpec("mbpp", "code", 3, "pass_at_1", unsafe_code=True),
    TaskSpec("nq_open", "world knowledge", 5, "exact_match,remove_whitespace"),
    TaskSpec("triviaqa", "world knowledge", 5, "exact_match,remove_whitespace"),
    TaskSpec("arc_easy", "reasoning", 0, "acc"),
    TaskSpec("arc_challenge", "reasoning", 0, "acc"),
    TaskSpec("social_iqa", "reasoning", 0, "acc"),
    TaskSpec("piqa", "reasoning", 0, "acc"),
    TaskSpec("winogrande", "reasoning", 0, "acc"),
    TaskSpec("hellaswag", "reasoning", 0, "acc"),
    TaskSpec("boolq", "reasoning", 0, "acc"),
    TaskSpec("mmlu", "general", 5, "acc"),
)

BUILTIN: tuple[TaskSpec, ...] = (
    TaskSpec("btx_math_answer", "math", 0, "exact_match"),
    TaskSpec("btx_code_next_line", "code", 0, "acc"),
    TaskSpec("btx_wiki_cloze", "wiki", 0, "acc"),
)

SUITES = {"btx-paper": BTX_PAPER, "btx-builtin": BUILTIN}


def resolve_task_specs(text: str, domains: dict[str, str] | None = None) -> list[TaskSpec]:
    """``--tasks`` -> specs: suite names (``btx-paper``, ``btx-builtin``) and lm-eval task names,
    comma separated; ``NAME:SHOTS`` sets a task's few-shot count. A plain task name belongs to
    the domain ``domains`` gives it, else to one named after the task."""
    specs: dict[str, TaskSpec] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in SUITES:
            for spec in SUITES[item]:
                specs.setdefault(spec.name, spec)
            continue
        name, sep, shots = item.partition(":")
        if sep and not shots.isdigit():
            raise ValueError(f"--tasks {item!r}: the few-shot count after ':' must be a number.")
        known = {s.name: s for suite in SUITES.values() for s in suite}.get(name)
        spec = known or TaskSpec(name, (domains or {}).get(name, name))
        specs[name] = dataclasses.replace(spec, num_fewshot=int(shots)) if sep else spec
    if not specs:
        raise ValueError(f"--tasks {text!r} names no task; use btx-paper, btx-builtin or lm-eval task names.")
    return list(specs.values())


# ---------------------------------------------------------------------------------------------
# Built-in tasks from the corpora's held-out documents
# ---------------------------------------------------------------------------------------------

_PROBLEM = re.compile(r"^Problem \d+\. (?P<q>.*?)\nSolution\.\n(?P<steps>(?:Step \d+: .*\n)+)Answer: (?P<a>.*)$", re.M)


def math_items(texts: list[str]) -> list[dict]:
    """Every worked problem of the worksheets: prompt up to ``Answer:`` and the answer."""
    out = []
    for text in texts:
        for m in _PROBLEM.finditer(text):
            out.append({"question": f"Problem 1. {m['q']}\nSolution.\n{m['steps']}Answer:", "answer": m["a"].strip()})
    return out


_CODE_CHARS = re.compile(r"[=(\[:]\s*\S|^(return|import|from|raise|if|for|while|def|class|with)\b")


def code_items(texts: list[str], rng: random.Random, context_chars: int = 240) -> list[dict]:
    """Next-line choices: for lines of substance, the text before them and four candidates."""
    pool = sorted({ln.strip() for t in texts for ln in t.splitlines()
                   if 12 <= len(ln.strip()) <= 80 and _CODE_CHARS.search(ln.strip()) and not ln.strip().startswith("#")})
    out = []
    for t in texts:
        lines = t.splitlines()
        for i in range(3, len(lines)):
            line = lines[i]
            body = line.strip()
            if not 12 <= len(body) <= 80 or body.startswith("#") or not _CODE_CHARS.search(body):
                continue
            before = "\n".join(lines[:i]) + "\n"
            cut = before.find("\n", max(0, len(before) - context_chars))
            context = before[cut + 1:] if len(before) > context_chars and cut >= 0 else before
            if len(context.strip()) < 40:
                continue
            indent = line[: len(line) - len(line.lstrip())]
            others = [p for p in pool if p != body]
            if len(others) < 3:
                continue
            choices = [indent + body] + [indent + d for d in rng.sample(others, 3)]
            order = list(range(4))
            rng.shuffle(order)
            out.append({"context": context, "choices": [choices[k] for k in order], "gold": order.index(0)})
    return out


_SENTENCE_END = re.compile(r"(?<=[a-z]) ([A-Za-z]{4,14})\.(?=\s)")


def cloze_items(texts: list[str], rng: random.Random, context_chars: int = 260) -> list[dict]:
    """Sentence-final word choices: the prose up to the word, the word and three others."""
    found = []
    for t in texts:
        for m in _SENTENCE_END.finditer(t):
            start = max(0, m.start() - context_chars)
            space = t.find(" ", start)
            context = t[space + 1 if start and space >= 0 else start: m.start()]
            if len(context) >= 80 and "\n\n" not in context[-60:]:
                found.append((context, m.group(1)))
    words = sorted({w for _, w in found})
    out = []
    for context, word in found:
        others = [w for w in words if w.lower() != word.lower()]
        if len(others) < 3:
            continue
        choices = [word] + rng.sample(others, 3)
        order = list(range(4))
        rng.shuffle(order)
        out.append({"context": context, "choices": [choices[k] for k in order], "gold": order.index(0)})
    return out


def _yaml(task: str, data_file: Path, body: dict) -> dict:
    return {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", **body, "metadata": {"version": 1.0}}


_TASK_BODIES = {
    "btx_math_answer": {
        "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
    },
    "btx_code_next_line": {
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
    "btx_wiki_cloze": {
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}", "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
}


def _read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{path} is missing: build the corpora first (tools/build_corpora.py).")
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def build_builtin_tasks(corpora_dir: str | Path, output: str | Path, *, num_items: int = 40, split: str = "valid",
                        max_tokens: int | None = None, tokenizer_model: str | Path | None = None,
                        seed: int = 1234) -> dict:
    """Write the built-in tasks from ``corpora_dir/jsonl/{domain}_{split}.jsonl`` into ``output``.

    ``num_items`` per task (fewer when the documents hold fewer); ``max_tokens`` (with the
    corpora's tokenizer, or ``tokenizer_model``): contexts are trimmed from the left to fit the
    model's sequence length with the longest answer; items that still do not fit are left out. Deterministic given the corpora and ``seed``;
    returns the ``tasks.json`` record."""
    import yaml

    corpora_dir, output = Path(corpora_dir), Path(output)
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}.")
    sp = None
    if max_tokens is not None:
        import sentencepiece as spm

        model = Path(tokenizer_model) if tokenizer_model else corpora_dir / "tokenizer" / "tokenizer.model"
        sp = spm.SentencePieceProcessor(model_file=str(model))

    def fits(prompt: str, longest_answer: str, reserve: int = 0) -> bool:
        return sp is None or len(sp.encode(prompt + longest_answer)) + reserve <= max_tokens

    def fitted(items: list[dict], answer_prefix: str = "") -> list[dict]:
        """Items whose context, trimmed from the left at word boundaries, fits with the longest
        choice (a short window keeps the end of the context, where the answer follows)."""
        out = []
        for item in items:
            context, longest = item["context"], answer_prefix + max(item["choices"], key=len)
            while not fits(context, longest) and len(context) > 24:
                cut = context.find(" ", len(context) // 8)
                context = context[cut + 1:] if 0 < cut < len(context) - 1 else context[len(context) // 8:]
            if fits(context, longest) and len(context) >= 12:
                out.append({**item, "context": context})
        return out

    rng = random.Random(seed)
    makers = {
        "btx_math_answer": lambda: [d for d in math_items(_read_texts(corpora_dir / "jsonl" / f"math_{split}.jsonl"))
                                    if fits(d["question"], "", reserve=16)],
        "btx_code_next_line": lambda: fitted(code_items(_read_texts(corpora_dir / "jsonl" / f"code_{split}.jsonl"), rng)),
        "btx_wiki_cloze": lambda: fitted(cloze_items(_read_texts(corpora_dir / "jsonl" / f"wiki_{split}.jsonl"), rng),
                                         answer_prefix=" "),
    }
    output.mkdir(parents=True, exist_ok=True)
    record = {"corpora": str(corpora_dir), "split": split, "seed": seed, "max_tokens": max_tokens, "tasks": {}}
    for spec in BUILTIN:
        items = makers[spec.name]()
        for stale in (output / f"{spec.name}.jsonl", output / f"{spec.name}.yaml"):
            stale.unlink(missing_ok=True)
        if not items:
            # E.g. worked math solutions longer than a test model's window: the task is left
            # out (the harness reports it as skipped) and the others still run.
            record["tasks"][spec.name] = {"domain": spec.domain, "items": 0, "available": 0,
                                          "skipped": f"no items in {corpora_dir}/jsonl ({split} split"
                                          + (f", prompts within {max_tokens} tokens" if max_tokens else "") + ")"}
            continue
        # Spread over the documents rather than the first few.
        picked = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), min(num_items, len(items))))]
        data = output / f"{spec.name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in picked))
        (output / f"{spec.name}.yaml").write_text(yaml.safe_dump(_yaml(spec.name, data.resolve(), _TASK_BODIES[spec.name]),
                                                                 sort_keys=False))
        record["tasks"][spec.name] = {"domain": spec.domain, "items": len(picked), "available": len(items)}
    if not any(t["items"] for t in record["tasks"].values()):
        raise ValueError(f"no built-in task has items from {corpora_dir}/jsonl: "
                         + "; ".join(t["skipped"] for t in record["tasks"].values()) + ".")
    (output / "tasks.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


__all__ = ["BTX_PAPER", "BUILTIN", "SUITES", "TaskSpec", "build_builtin_tasks", "cloze_items", "code_items",
           "math_items", "resolve_task_specs"]
