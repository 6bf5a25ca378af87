"""Built-in BTX corpora: three clearly different domains (``math``, ``code``, ``wiki``) made offline
from what a machine has; the documents come from :mod:`btx_megatron.data.documents`.

``build_corpora`` writes JSONL per domain and split, trains a sentencepiece tokenizer on a
balanced sample of the train documents, preprocesses everything into ``DIR/data/{domain}_{split}``
indexed datasets and writes ``DIR/manifest.json``. Every stage is deterministic given the config
and the machine's files, and skipped when its outputs exist and match.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterator

from btx_megatron.checkpoint.io import write_atomic, write_json_atomic
from btx_megatron.data.documents import DOMAINS, domain_documents, stdlib_dir
from btx_megatron.data.preprocess import PreprocessConfig, preprocess
from btx_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece

SPLITS = ("train", "valid")
CORPORA_VERSION = 2


@dataclass
class CorporaConfig:
    """Options of ``tools/build_corpora.py``."""

    output: str
    """Output directory (jsonl/, tokenizer/, data/, manifest.json)."""
    tokens_per_domain: int = 2_000_000
    """Minimum train tokens per domain, counted with the trained tokenizer (EOD included)."""
    vocab_size: int = 8000
    seed: int = 1234
    valid_every: int = 50
    """Every ``valid_every``-th document goes to validation (2% by default), spread uniformly."""
    workers: int = 2
    """Processes for preprocessing and threads for tokenizer training / token counting."""
    tokenizer_sample_chars: int | None = None
    """Characters per domain the tokenizer learns from (default: scales with the size, <= 1.5M)."""
    model_type: str = "bpe"

    def __post_init__(self) -> None:
        if self.tokens_per_domain < 1000:
            raise ValueError(f"--tokens-per-domain {self.tokens_per_domain} is too small; use >= 1000.")
        if self.valid_every < 2:
            raise ValueError(f"valid_every must be >= 2, got {self.valid_every}.")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}.")
        if self.tokenizer_sample_chars is None:
            self.tokenizer_sample_chars = int(min(1_500_000, max(100_000, 3 * self.tokens_per_domain)))

    def identity(self) -> dict:
        """What the outputs depend on (``workers`` does not change a byte)."""
        d = asdict(self)
        d.pop("output")
        d.pop("workers")
        d["version"] = CORPORA_VERSION
        return d


# ---------------------------------------------------------------------------------------------
# The build.


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_build(message: str) -> None:
    """A progress line on stderr, marked as the corpora build's."""
    print(f"[build_corpora] {message}", file=sys.stderr, flush=True)


def read_json_or_empty(path: str) -> dict:
    """The JSON at ``path``, or ``{}`` when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def corpora_up_to_date(manifest_path: str, cfg: CorporaConfig) -> bool:
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("config") != cfg.identity():
        return False
    for rel, sha in manifest.get("files", {}).items():
        path = os.path.join(cfg.output, rel)
        if not os.path.isfile(path) or sha256_file(path) != sha:
            return False
    return True


class _Pool:
    """Documents of one domain pulled lazily, with their split and (once known) token counts."""

    def __init__(self, domain: str, cfg: CorporaConfig):
        self.domain = domain
        self.iterator = domain_documents(domain, cfg.seed)
        self.valid_every = cfg.valid_every
        self.docs: list[dict] = []
        self.exhausted = False

    def split_of(self, index: int) -> str:
        return "valid" if index % self.valid_every == self.valid_every - 1 else "train"

    def pull(self) -> bool:
        doc = next(self.iterator, None)
        if doc is None:
            self.exhausted = True
            return False
        self.docs.append(doc)
        return True


def _tokenizer_sample(pools: dict[str, _Pool], chars_per_domain: int) -> Iterator[str]:
    """Balanced sample: the first ``chars_per_domain`` characters of each domain's train docs."""
    for domain in DOMAINS:
        pool = pools[domain]
        budget = chars_per_domain
        index = 0
        while budget > 0:
            if index >= len(pool.docs) and not pool.pull():
                break
            if pool.split_of(index) == "train":
                text = pool.docs[index]["text"][:budget]
                budget -= len(text)
                yield text if text.endswith("\n") else text + "\n"
            index += 1


def _train_tokenizer(cfg: CorporaConfig, pools: dict[str, _Pool]) -> str:
    tok_dir = os.path.join(cfg.output, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    sample_path = os.path.join(tok_dir, "sample.txt")
    write_atomic(sample_path, _tokenizer_sample(pools, cfg.tokenizer_sample_chars))
    record_path = os.path.join(tok_dir, "train_record.json")
    model_path = os.path.join(tok_dir, "tokenizer.model")
    record = {
        "sample_sha256": sha256_file(sample_path),
        "vocab_size": cfg.vocab_size,
        "model_type": cfg.model_type,
        "seed": cfg.seed,
    }
    if os.path.isfile(record_path) and os.path.isfile(model_path):
        with open(record_path) as f:
            previous = json.load(f)
        if {k: previous.get(k) for k in record} == record and previous.get("model_sha256") == sha256_file(model_path):
            log_build(f"tokenizer up to date: {model_path}")
            return model_path
    start = time.perf_counter()
    train_sentencepiece(
        TokenizerTrainingConfig(
            input=[sample_path],
            model_prefix=os.path.join(tok_dir, "tokenizer"),
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            seed=cfg.seed,
            num_threads=cfg.workers,
        )
    )
    record["model_sha256"] = sha256_file(model_path)
    write_json_atomic(record_path, record)
    log_build(f"trained tokenizer ({cfg.vocab_size} pieces) in {time.perf_counter() - start:.1f}s: {model_path}")
    return model_path


def _select_documents(pool: _Pool, processor, cfg: CorporaConfig) -> dict[str, list[dict]]:
    """Pulls documents until train has >= tokens_per_domain tokens and valid >= 1/valid_every of it."""
    counts = {"train": 0, "valid": 0}
    chosen: dict[str, list[dict]] = {"train": [], "valid": []}
    index = 0
    batch = 256
    valid_target = max(1, cfg.tokens_per_domain // cfg.valid_every)
    while counts["train"] < cfg.tokens_per_domain or counts["valid"] < valid_target:
        while len(pool.docs) < index + batch and pool.pull():
            pass
        if index >= len(pool.docs):
            raise ValueError(
                f"the {pool.domain} domain ran out of text at {counts['train']} train / "
                f"{counts['valid']} valid tokens (needs {cfg.tokens_per_domain} / {valid_target}); "
                "this machine lacks the sources listed in btx_megatron/data/documents.py: use a "
                "smaller --tokens-per-domain, or preprocess a real corpus with tools/preprocess_data.py."
            )
        docs = pool.docs[index : index + batch]
        # +1: the EOD preprocessing appends to every document.
        lengths = [len(ids) + 1 for ids in processor.encode([d["text"] for d in docs], num_threads=cfg.workers)]
        for offset, (doc, length) in enumerate(zip(docs, lengths)):
            split = pool.split_of(index + offset)
            if split == "train" and counts["train"] >= cfg.tokens_per_domain:
                continue  # only more validation text is still needed
            if split == "valid" and counts["valid"] >= valid_target and counts["train"] >= cfg.tokens_per_domain:
                continue
            chosen[split].append(doc)
            counts[split] += length
        index += len(docs)
    return chosen


def build_corpora(cfg: CorporaConfig) -> dict:
    """Builds (or confirms up to date) the corpora under ``cfg.output``; returns the manifest."""
    import sentencepiece as spm

    start = time.perf_counter()
    os.makedirs(cfg.output, exist_ok=True)
    manifest_path = os.path.join(cfg.output, "manifest.json")
    if corpora_up_to_date(manifest_path, cfg):
        log_build(f"up to date: {manifest_path}")
        with open(manifest_path) as f:
            return json.load(f)

    pools = {domain: _Pool(domain, cfg) for domain in DOMAINS}
    model_path = _train_tokenizer(cfg, pools)
    processor = spm.SentencePieceProcessor(model_file=model_path)
    tokenizer_sha = sha256_file(model_path)

    os.makedirs(os.path.join(cfg.output, "jsonl"), exist_ok=True)
    os.makedirs(os.path.join(cfg.output, "data"), exist_ok=True)
    files: dict[str, str] = {"tokenizer/tokenizer.model": tokenizer_sha}
    domains: dict[str, dict] = {}
    for domain in DOMAINS:
        chosen = _select_documents(pools[domain], processor, cfg)
        domains[domain] = {}
        for split in SPLITS:
            domains[domain][split], split_files = _write_split(cfg, domain, split, chosen[split], model_path,
                                                               tokenizer_sha)
            files.update(split_files)

    manifest = {
        "config": cfg.identity(),
        "tokenizer": {"path": "tokenizer/tokenizer.model", "sha256": tokenizer_sha, "vocab_size": processor.get_piece_size()},
        "domains": domains,
        "files": files,
        "python": sys.version.split()[0],
        "stdlib": stdlib_dir(),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    write_json_atomic(manifest_path, manifest)  # last: its presence means the build completed
    log_build(f"done in {manifest['build_seconds']}s: {manifest_path}")
    return manifest


def _write_split(cfg: CorporaConfig, domain: str, split: str, docs: list[dict], model_path: str,
                 tokenizer_sha: str) -> tuple[dict, dict[str, str]]:
    """Writes ``jsonl/{domain}_{split}.jsonl`` and its indexed dataset ``data/{domain}_{split}``
    (kept when its meta records the same JSONL and tokenizer); returns the split's manifest entry
    and the sha256 of the files written."""
    jsonl_rel = f"jsonl/{domain}_{split}.jsonl"
    jsonl_path = os.path.join(cfg.output, jsonl_rel)
    write_atomic(jsonl_path, (json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    jsonl_sha = sha256_file(jsonl_path)
    prefix_rel = f"data/{domain}_{split}"
    prefix = os.path.join(cfg.output, prefix_rel)
    meta = read_json_or_empty(prefix + ".meta.json")
    up_to_date = (
        meta.get("extra", {}).get("input_sha256") == jsonl_sha
        and meta.get("tokenizer", {}).get("sha256") == tokenizer_sha
        and os.path.isfile(prefix + ".bin")
        and os.path.isfile(prefix + ".idx")
    )
    if up_to_date:
        num_documents, num_tokens = meta["num_documents"], meta["num_tokens"]
    else:
        result = preprocess(
            PreprocessConfig(
                input=[jsonl_path],
                output_prefix=prefix,
                tokenizer_type="SentencePieceTokenizer",
                tokenizer_model=model_path,
                workers=cfg.workers,
                append_eod=True,
                log_interval=0,
                strict=True,
                extra_meta={"input_sha256": jsonl_sha},
            )
        )
        num_documents, num_tokens = result.num_documents, result.num_tokens
    log_build(f"{domain}/{split}: {num_documents} documents, {num_tokens} tokens -> {prefix}")
    entry = {"prefix": prefix_rel, "jsonl": jsonl_rel, "num_documents": num_documents, "num_tokens": num_tokens}
    files = {jsonl_rel: jsonl_sha}
    for suffix in (".bin", ".idx"):
        files[prefix_rel + suffix] = sha256_file(prefix + suffix)
    return entry, files
