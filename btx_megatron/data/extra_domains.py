"""Extra domains: a new domain built into an existing corpora directory.

A new domain arrives after the BTX model exists (growing it by one expert), so its text is
tokenized with the corpora's existing tokenizer: the vocabulary is fixed. The three-domain build of
:mod:`btx_megatron.data.corpora` is not touched; the extra domain writes DIR/data/NAME_{train,valid},
DIR/jsonl/NAME_*.jsonl and its own manifest DIR/extra_domains/NAME.json (DIR/manifest.json is left
as it is, so everything that fingerprints it stays valid). The documents come from
:mod:`btx_megatron.data.documents` (``headers``: C header files). A machine with less text gives a
smaller domain (down to ``min_tokens``); the manifest records what was found.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass

from btx_megatron.checkpoint.io import write_atomic, write_json_atomic
# The module, not its names: one documents.header_roots for every caller, so replacing it (as the
# tests do) changes both what is read and what the manifest and errors report.
from btx_megatron.data import documents
from btx_megatron.data.corpora import SPLITS, log_build, read_json_or_empty, sha256_file
from btx_megatron.data.preprocess import PreprocessConfig, preprocess

EXTRA_CORPORA_VERSION = 1
EXTRA_MANIFEST_DIR = "extra_domains"


@dataclass
class ExtraDomainConfig:
    """Options of :func:`build_extra_domain`."""

    corpora: str
    """An existing corpora directory (``build_corpora``'s output: tokenizer/, data/, manifest.json)."""
    domain: str = "headers"
    tokens: int | None = None
    """Train tokens to aim for (default: the corpora's ``tokens_per_domain``)."""
    min_tokens: int = 50_000
    """Fewer train tokens than this (or than ``tokens``, if smaller) on the machine is an error."""
    seed: int | None = None
    """Document order seed (default: the corpora's)."""
    valid_every: int | None = None
    """Every ``valid_every``-th document goes to validation (default: the corpora's)."""
    workers: int = 2

    def __post_init__(self) -> None:
        if self.domain not in documents.EXTRA_DOMAINS:
            raise ValueError(f"extra domain {self.domain!r}: choose one of {', '.join(documents.EXTRA_DOMAINS)}.")
        if self.tokens is not None and self.tokens < 1000:
            raise ValueError(f"extra domain tokens {self.tokens} is too small; use >= 1000.")


def extra_domain_prefix(corpora: str, domain: str, split: str) -> str:
    return os.path.join(corpora, "data", f"{domain}_{split}")


def extra_domain_manifest_path(corpora: str, domain: str) -> str:
    return os.path.join(corpora, EXTRA_MANIFEST_DIR, f"{domain}.json")


def build_extra_domain(cfg: ExtraDomainConfig) -> dict:
    """Build (or confirm up to date) ``cfg.domain`` inside the corpora directory with its existing
    tokenizer; returns the domain's manifest (prefixes relative to the corpora directory)."""
    import sentencepiece as spm

    start = time.perf_counter()
    base = read_json_or_empty(os.path.join(cfg.corpora, "manifest.json"))
    if not base.get("tokenizer"):
        raise ValueError(f"{cfg.corpora} is not a built corpora directory (no manifest.json with a tokenizer); "
                         "build it first with tools/build_corpora.py.")
    model_path = os.path.join(cfg.corpora, base["tokenizer"]["path"])
    tokenizer_sha = sha256_file(model_path)
    if tokenizer_sha != base["tokenizer"]["sha256"]:
        raise ValueError(f"{model_path} does not match {cfg.corpora}/manifest.json; the corpora directory is damaged.")
    base_cfg = base.get("config", {})
    identity = {
        "domain": cfg.domain, "version": EXTRA_CORPORA_VERSION, "tokenizer_sha256": tokenizer_sha,
        "tokens": int(cfg.tokens or base_cfg.get("tokens_per_domain", 2_000_000)), "min_tokens": cfg.min_tokens,
        "seed": int(base_cfg.get("seed", 1234) if cfg.seed is None else cfg.seed),
        "valid_every": int(cfg.valid_every or base_cfg.get("valid_every", 50)),
    }
    manifest_path = extra_domain_manifest_path(cfg.corpora, cfg.domain)
    previous = read_json_or_empty(manifest_path)
    if previous.get("config") == identity and all(
            os.path.isfile(os.path.join(cfg.corpora, rel)) and sha256_file(os.path.join(cfg.corpora, rel)) == sha
            for rel, sha in previous.get("files", {}).items()):
        log_build(f"extra domain {cfg.domain} up to date: {manifest_path}")
        return previous

    processor = spm.SentencePieceProcessor(model_file=model_path)
    chosen, counts, exhausted = _select_extra(cfg, identity, processor)
    files: dict[str, str] = {}
    splits: dict[str, dict] = {}
    for split in SPLITS:
        jsonl_rel = f"jsonl/{cfg.domain}_{split}.jsonl"
        jsonl_path = os.path.join(cfg.corpora, jsonl_rel)
        os.makedirs(os.path.dirname(jsonl_path), exist_ok=True)
        write_atomic(jsonl_path, (json.dumps(d, ensure_ascii=False) + "\n" for d in chosen[split]))
        prefix_rel = f"data/{cfg.domain}_{split}"
        prefix = os.path.join(cfg.corpora, prefix_rel)
        result = preprocess(PreprocessConfig(
            input=[jsonl_path], output_prefix=prefix, tokenizer_type="SentencePieceTokenizer",
            tokenizer_model=model_path, workers=cfg.workers, append_eod=True, log_interval=0, strict=True,
            extra_meta={"input_sha256": sha256_file(jsonl_path), "extra_domain": cfg.domain}))
        log_build(f"{cfg.domain}/{split}: {result.num_documents} documents, {result.num_tokens} tokens -> {prefix}")
        splits[split] = {"prefix": prefix_rel, "jsonl": jsonl_rel, "num_documents": result.num_documents,
                         "num_tokens": result.num_tokens}
        for rel in (jsonl_rel, prefix_rel + ".bin", prefix_rel + ".idx"):
            files[rel] = sha256_file(os.path.join(cfg.corpora, rel))
    manifest = {
        "config": identity, "domain": cfg.domain, "splits": splits, "files": files,
        "tokenizer": {"path": base["tokenizer"]["path"], "sha256": tokenizer_sha},
        "sources": documents.header_roots() if cfg.domain == "headers" else [],
        "exhausted": exhausted, "selected_tokens": counts,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    os.makedirs(os.path.dirname(manifest_path), exist_ok=True)
    write_json_atomic(manifest_path, manifest)  # last: its presence means the build completed
    log_build(f"extra domain {cfg.domain} done in {manifest['build_seconds']}s: {manifest_path}"
         + (f" (the machine's text ran out at {counts['train']} train tokens)" if exhausted else ""))
    return manifest


def _select_extra(cfg: ExtraDomainConfig, identity: dict, processor) -> tuple[dict, dict, bool]:
    """Documents until train has ``tokens`` and valid 1/valid_every of it, or the text runs out."""
    docs = documents.extra_domain_documents(cfg.domain, identity["seed"])
    every, target = identity["valid_every"], identity["tokens"]
    valid_target = max(1, target // every)
    chosen: dict[str, list[dict]] = {"train": [], "valid": []}
    counts = {"train": 0, "valid": 0}
    index, exhausted = 0, False
    while counts["train"] < target or counts["valid"] < valid_target:
        batch = list(itertools.islice(docs, 256))
        if not batch:
            exhausted = True
            break
        lengths = [len(ids) + 1 for ids in processor.encode([d["text"] for d in batch], num_threads=cfg.workers)]
        for doc, length in zip(batch, lengths):
            split = "valid" if index % every == every - 1 else "train"
            index += 1
            if counts[split] >= (target if split == "train" else valid_target):
                continue
            chosen[split].append(doc)
            counts[split] += length
    needed = min(cfg.min_tokens, target)
    if counts["train"] < needed or not chosen["valid"]:
        raise ValueError(
            f"the {cfg.domain} domain found only {counts['train']} train / {counts['valid']} valid tokens on this "
            f"machine (needs at least {needed} train tokens and one validation document); it reads "
            f"{', '.join(documents.header_roots()) if cfg.domain == 'headers' else 'nothing'}. Install libc6-dev / "
            "python3-dev, or preprocess another corpus with tools/preprocess_data.py.")
    return chosen, counts, exhausted
