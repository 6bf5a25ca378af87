"""Text -> Megatron indexed datasets (``.bin``/``.idx``), the core of ``tools/preprocess_data.py``.

Inputs are JSONL files (one document per line, text under ``--json-keys``) or plain ``.txt`` files
(one document per file). Each document becomes one Megatron document, written with
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``, with EOD appended on request.

Guarantees:
- Deterministic: workers tokenise with ``Pool.imap`` (ordered), so the bytes written do not
  depend on ``--workers``.
- Atomic: ``.bin``/``.idx`` are written under temporary names and moved into place only after the
  whole input was processed; the ``.idx`` lands last, so a crash never leaves a pair that
  training would accept (an older pair at the same prefix is removed first).
- Bad records (invalid UTF-8, a line that is not JSON or not an object, a missing or non-string
  key) are skipped, counted per reason and reported at the end; ``strict`` fails on the first.
- ``<prefix>.meta.json`` records the tokenizer's identity, which training checks.

Unlike Megatron-LM, output names are exactly ``--output-prefix`` for a single JSON key (no
``_text_document`` suffix), and ``<output-prefix>_<key>`` when several keys are given.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from btx_megatron.checkpoint.io import write_json_atomic
from btx_megatron.data.tokenizers import build_tokenizer, tokenizer_fingerprint

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt",)


@dataclass
class PreprocessConfig:
    """Options of ``tools/preprocess_data.py`` (Megatron-LM flag names)."""

    input: list[str]
    """Input files or glob patterns: JSONL (``.jsonl``/``.json``/``.ndjson``) or ``.txt``."""
    output_prefix: str
    """Writes ``<output_prefix>.bin``, ``.idx`` and ``.meta.json``."""
    tokenizer_type: str
    """SentencePieceTokenizer or HuggingFaceTokenizer."""
    tokenizer_model: str
    """A sentencepiece ``.model`` file or a local Hugging Face tokenizer directory."""
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """JSONL keys to tokenise; one dataset per key."""
    workers: int = 1
    """Tokenising processes; 1 tokenises in this process."""
    append_eod: bool = False
    """Append the tokenizer's EOD id to every document (what GPT pretraining wants)."""
    log_interval: int = 1000
    """Documents between progress lines on stderr (0: none)."""
    strict: bool = False
    """Fail on the first bad record instead of skipping and counting it."""
    chunksize: int = 64
    """Records per task sent to a worker: larger amortises IPC, smaller balances load."""
    extra_meta: dict = field(default_factory=dict)
    """Recorded under "extra" in ``<prefix>.meta.json`` (e.g. a hash of the input)."""

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ValueError("--input is required: one or more JSONL/.txt files or glob patterns.")
        if not self.output_prefix:
            raise ValueError("--output-prefix is required (the dataset is written to PREFIX.bin/.idx).")
        if self.tokenizer_type not in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
            raise ValueError(
                f"--tokenizer-type {self.tokenizer_type!r}: preprocessing supports "
                "SentencePieceTokenizer and HuggingFaceTokenizer."
            )
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key (default: text).")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}.")
        if self.chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {self.chunksize}.")
        parent = os.path.dirname(os.path.abspath(self.output_prefix))
        blocking = next((p for p in [parent, *map(str, Path(parent).parents)] if os.path.exists(p)
                         and not os.path.isdir(p)), None)
        if blocking is not None:
            raise ValueError(f"--output-prefix {self.output_prefix}: {blocking} is a file, not a directory; "
                             "choose a prefix in a directory.")


@dataclass
class PreprocessResult:
    """What a run wrote and skipped."""

    output_prefixes: dict[str, str]
    num_documents: int
    num_tokens: int
    num_bytes: int
    skipped: dict[str, int]
    num_empty: int
    seconds: float

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class BadRecord(ValueError):
    """A record that cannot be tokenised; ``reason`` is the counter key."""

    def __init__(self, reason: str, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason


def expand_inputs(patterns: list[str]) -> list[str]:
    """Globs expanded (sorted, for determinism) and checked: ValueError on missing/unsupported."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ValueError(f"--input {pattern!r} matches no files.")
        for path in matches:
            if not os.path.isfile(path):
                raise ValueError(f"--input {path!r} does not exist or is not a file.")
            if not path.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
                raise ValueError(
                    f"--input {path!r}: unsupported file type; use JSONL ({', '.join(JSONL_SUFFIXES)}, "
                    "one JSON object per line) or .txt (one document per file)."
                )
            paths.append(path)
    return paths


def _iter_records(paths: list[str]) -> Iterator[tuple[int, int, bytes]]:
    """(file index, 1-based line number or 0 for a whole file, raw bytes), in input order."""
    for file_index, path in enumerate(paths):
        if path.endswith(TEXT_SUFFIXES):
            with open(path, "rb") as f:
                yield file_index, 0, f.read()
            continue
        with open(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield file_index, line_number, line


def parse_record(raw: bytes, is_jsonl: bool, json_keys: list[str], where: str) -> list[str]:
    """Texts of one record, one per key; raises BadRecord."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord("invalid_utf8", where, f"not valid UTF-8 ({err.reason} at byte {err.start})")
    if not is_jsonl:
        return [text]
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord("invalid_json", where, f"not valid JSON ({err.msg})")
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", where, f"a JSON {type(record).__name__}, not an object")
    texts = []
    for key in json_keys:
        if key not in record:
            raise BadRecord("missing_key", where, f"no key {key!r} (use --json-keys to pick the text field)")
        if not isinstance(record[key], str):
            raise BadRecord("non_string_value", where, f"key {key!r} holds a {type(record[key]).__name__}, not a string")
        texts.append(record[key])
    return texts


# Per-process state of the tokenising workers (set by _init_worker).
_WORKER: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, json_keys: list[str], append_eod: bool, paths: list[str],
                 tokenizer=None) -> None:
    if tokenizer is None:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    _WORKER.update(
        tokenizer=tokenizer,
        eod=tokenizer.eod if append_eod else None,
        json_keys=json_keys,
        jsonl=[not p.endswith(TEXT_SUFFIXES) for p in paths],
        paths=paths,
    )


def _encode(item: tuple[int, int, bytes]):
    """-> ("ok", [ids per key], nbytes) or ("bad", reason, message)."""
    file_index, line_number, raw = item
    where = _WORKER["paths"][file_index] + (f":{line_number}" if line_number else "")
    try:
        texts = parse_record(raw, _WORKER["jsonl"][file_index], _WORKER["json_keys"], where)
    except BadRecord as err:
        return "bad", err.reason, str(err)
    tokenize = _WORKER["tokenizer"].tokenize
    eod = _WORKER["eod"]
    ids_per_key = []
    for text in texts:
        ids = tokenize(text) if text else []
        if ids and eod is not None:
            ids.append(eod)
        # int32 arrays pickle far faster than Python int lists on the way back to the writer.
        ids_per_key.append(np.asarray(ids, dtype=np.int32))
    return "ok", ids_per_key, len(raw)


def output_prefixes_for(output_prefix: str, json_keys: list[str]) -> dict[str, str]:
    if len(json_keys) == 1:
        return {json_keys[0]: output_prefix}
    return {key: f"{output_prefix}_{key}" for key in json_keys}


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _Progress:
    def __init__(self, interval: int, stream=None):
        self.interval = interval
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def maybe_log(self, docs: int, nbytes: int, tokens: int, final: bool = False) -> None:
        if not final and (self.interval <= 0 or docs % self.interval):
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        print(
            f"{'done' if final else 'processed'} {docs} docs ({docs / elapsed:.1f} docs/s, "
            f"{nbytes / elapsed / 1e6:.2f} MB/s, {tokens / elapsed:,.0f} tokens/s)",
            file=self.stream,
            flush=True,
        )


def preprocess(cfg: PreprocessConfig, log_stream=None) -> PreprocessResult:
    """Tokenises ``cfg.input`` into indexed datasets; see the module docstring for guarantees."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    log_stream = log_stream or sys.stderr
    paths = expand_inputs(cfg.input)
    if all(os.path.getsize(p) == 0 for p in paths):
        raise ValueError(f"--input: all input files are empty ({', '.join(paths)}).")

    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = output_prefixes_for(cfg.output_prefix, cfg.json_keys)
    for prefix in prefixes.values():
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    builders = {key: IndexedDatasetBuilder(prefix + ".bin" + tag, dtype=dtype) for key, prefix in prefixes.items()}
    progress = _Progress(cfg.log_interval, log_stream)
    tally = _write_temporaries(cfg, paths, tokenizer, builders, prefixes, tag, progress, log_stream)
    _publish(cfg, paths, tokenizer, dtype, prefixes, tag, tally)

    elapsed = time.perf_counter() - progress.start
    progress.maybe_log(tally.num_docs, tally.num_bytes, tally.num_tokens, final=True)
    result = PreprocessResult(
        output_prefixes=prefixes,
        num_documents=tally.num_docs,
        num_tokens=tally.num_tokens,
        num_bytes=tally.num_bytes,
        skipped=dict(sorted(tally.skipped.items())),
        num_empty=tally.num_empty,
        seconds=elapsed,
    )
    if result.num_skipped or tally.num_empty:
        details = ", ".join(f"{reason}: {count}" for reason, count in result.skipped.items())
        print(
            f"skipped {result.num_skipped} bad records ({details or 'none'}) and {tally.num_empty} empty documents",
            file=log_stream,
        )
    return result


@dataclass
class _Tally:
    """What a run has written and skipped so far."""

    skipped: Counter = field(default_factory=Counter)
    tokens_per_key: Counter = field(default_factory=Counter)
    num_docs: int = 0
    num_tokens: int = 0
    num_bytes: int = 0
    num_empty: int = 0


def _write_temporaries(cfg: PreprocessConfig, paths: list[str], tokenizer, builders: dict, prefixes: dict[str, str],
                       tag: str, progress: _Progress, log_stream) -> _Tally:
    """Tokenises every record into ``builders`` and finalises the ``.idx`` files, all under temporary
    names (``prefix.bin|.idx`` + ``tag``); on failure the workers stop and the temporaries go."""
    init_args = (cfg.tokenizer_type, cfg.tokenizer_model, cfg.json_keys, cfg.append_eod, paths)
    pool = None
    completed = False
    try:
        records = _iter_records(paths)
        if cfg.workers == 1:
            _init_worker(*init_args, tokenizer=tokenizer)
            results = map(_encode, records)
        else:
            # fork: workers inherit the imported modules instead of re-importing megatron (~5 s).
            context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
            pool = context.Pool(cfg.workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_encode, records, chunksize=cfg.chunksize)
        tally = _add_documents(cfg, results, builders, progress, log_stream)
        for key, prefix in prefixes.items():
            builders[key].finalize(prefix + ".idx" + tag)
        completed = True
    finally:
        if pool is not None:
            if completed:
                pool.close()
            else:  # stop the workers now rather than let them tokenise the rest of the input
                pool.terminate()
            pool.join()
        if not completed:
            for key, prefix in prefixes.items():
                builders[key].data_file.close()
                _remove_quietly(prefix + ".bin" + tag)
                _remove_quietly(prefix + ".idx" + tag)
    return tally


def _add_documents(cfg: PreprocessConfig, results, builders: dict, progress: _Progress, log_stream) -> _Tally:
    """Adds the encoded records (``_encode``'s results, in input order) to ``builders``, skipping and
    counting bad and empty ones; ValueError when nothing is left (or on a bad record if strict)."""
    tally = _Tally()
    for status, payload, extra in results:
        if status == "bad":
            if cfg.strict:
                raise ValueError(f"bad record (--strict): {extra}")
            if tally.skipped[payload] < 5:  # a few examples, then only the counts
                print(f"skipping {extra}", file=log_stream)
            tally.skipped[payload] += 1
            continue
        if all(len(ids) == 0 for ids in payload):
            tally.num_empty += 1
            continue
        for key, ids in zip(cfg.json_keys, payload):
            builders[key].add_document(ids, [len(ids)])
            tally.num_tokens += len(ids)
            tally.tokens_per_key[key] += len(ids)
        tally.num_docs += 1
        tally.num_bytes += extra
        progress.maybe_log(tally.num_docs, tally.num_bytes, tally.num_tokens)
    if tally.num_docs == 0:
        raise ValueError(
            f"--input produced no documents ({sum(tally.skipped.values())} bad records skipped, "
            f"{tally.num_empty} empty): check --json-keys and the input files."
        )
    return tally


def _publish(cfg: PreprocessConfig, paths: list[str], tokenizer, dtype, prefixes: dict[str, str], tag: str,
             tally: _Tally) -> None:
    """Moves the finished temporaries into place, each with its ``.meta.json``."""
    fingerprint = tokenizer_fingerprint(cfg.tokenizer_type, cfg.tokenizer_model, tokenizer.vocab_size)
    fingerprint["model_path"] = os.path.abspath(cfg.tokenizer_model)
    for key, prefix in prefixes.items():
        # Order matters: drop any older pair's .idx first, then move .bin, meta, and .idx last,
        # so at every instant either no .idx exists or the pair (and its meta) is complete.
        _remove_quietly(prefix + ".idx")
        os.replace(prefix + ".bin" + tag, prefix + ".bin")
        write_json_atomic(
            prefix + ".meta.json",
            {
                "tokenizer": fingerprint,
                "json_key": key,
                "append_eod": cfg.append_eod,
                "inputs": [os.path.abspath(p) for p in paths],
                "num_documents": tally.num_docs,
                "num_tokens": tally.tokens_per_key[key],
                "dtype": np.dtype(dtype).name,
                "extra": cfg.extra_meta,
            },
        )
        os.replace(prefix + ".idx" + tag, prefix + ".idx")
