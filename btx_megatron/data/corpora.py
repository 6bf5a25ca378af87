"""Built-in BTX corpora: three clearly different domains made offline from what a machine has.

- ``math``: generated worksheets of worked problems (arithmetic, long multiplication, division,
  fractions, linear equations, 2x2 systems, expansion, factoring, polynomials, percentages, word
  problems) with step-by-step solutions (:mod:`btx_megatron.data.math_problems`).
- ``code``: Python source files of the interpreter's standard library
  (``sysconfig.get_paths()['stdlib']``, test directories skipped), one file per document.
- ``wiki``: English documentation prose, interleaved round-robin from: the Python language
  reference topics shipped in ``pydoc_data``, standard-library docstrings (one document per
  module, extracted with ``ast``), Python's LICENSE and ``/usr/share/common-licenses``,
  ``/usr/share/doc/*/{copyright,README*}`` and English man pages (sections 1, 5, 7, 8, roff markup
  stripped). Repeated paragraphs (license texts copied into many packages) are kept once.
  Every source is optional; too little text overall is a clear error.

``build_corpora`` writes JSONL per domain and split, trains a sentencepiece tokenizer on a
balanced sample of the train documents, preprocesses everything into ``DIR/data/{domain}_{split}``
indexed datasets and writes ``DIR/manifest.json``. Every stage is deterministic given the config
and the machine's files, and skipped when its outputs exist and match.

Registry packages, checked against the PyPI list (none installed here): ``mathematics-dataset``
(DeepMind's offline generator of school-level questions across algebra, arithmetic, calculus,
probability; sympy-based) would be the better ``math`` source for breadth, but it gives answers
without worked steps. For ``wiki`` and ``code`` nothing on PyPI ships a real corpus offline:
``nltk``'s corpora and Hugging Face ``datasets`` (wikitext-103, codeparrot, GSM8K/MATH) are
downloads. For a real experiment, preprocess those with ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import itertools
import json
import os
import random
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Iterator

from btx_megatron.data.math_problems import math_documents

DOMAINS = ("math", "code", "wiki")
SPLITS = ("train", "valid")
CORPORA_VERSION = 2
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
_MIN_DOC_CHARS = 200
# Some Debian copyright files run to hundreds of KB of file lists; capping every prose document
# keeps the round-robin mix balanced in characters, not only in document count.
_MAX_WIKI_DOC_CHARS = 16_000


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
# Document sources. Each yields {"text": ..., "source": ...} in a deterministic order.


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> list[str]:
    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files)


def _read_utf8(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def code_documents(seed: int) -> Iterator[dict]:
    """Standard-library modules in a seeded shuffle of the sorted file list."""
    root = stdlib_dir()
    files = _stdlib_files()
    # Shuffled so that a size-limited build samples the whole library, not modules a..m.
    random.Random(f"btx-code-{seed}").shuffle(files)
    for path in files:
        text = _read_utf8(path)
        if text and len(text) >= _MIN_DOC_CHARS:
            yield {"text": text, "source": "stdlib/" + os.path.relpath(path, root)}


def _pydoc_topics() -> Iterator[dict]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield {"text": topics[name].strip() + "\n", "source": f"pydoc_data/{name}"}


def _docstring_documents() -> Iterator[dict]:
    root = stdlib_dir()
    for path in _stdlib_files():
        text = _read_utf8(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        parts = []
        module_doc = ast.get_docstring(tree)
        if module_doc:
            parts.append(f"{module}\n\n{module_doc}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(f"{node.name}\n\n{doc}")
        body = "\n\n".join(parts)
        if len(body) >= _MIN_DOC_CHARS:
            yield {"text": body + "\n", "source": f"docstrings/{module}"}


def _license_documents() -> Iterator[dict]:
    paths = sorted(glob.glob(os.path.join(stdlib_dir(), "LICENSE*")))
    paths += sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    for path in paths:
        text = _read_utf8(path)
        if text:
            yield {"text": text, "source": path}


def _usr_share_doc_documents(seed: int) -> Iterator[dict]:
    paths = []
    for path in sorted(glob.glob("/usr/share/doc/*/*")):
        name = os.path.basename(path).removesuffix(".gz")
        if (name == "copyright" or name.upper().startswith("README")) and os.path.isfile(path):
            paths.append(path)
    random.Random(f"btx-doc-{seed}").shuffle(paths)
    for path in paths:
        text = _read_utf8(path)
        if text:
            yield {"text": text, "source": path}


_ROFF_SKIP = {"TH", "ds", "de", "nr", "so", "ll", "in", "ti", "ft", "ps", "vs", "ne", "if", "ie", "el", "tr", "ad", "na", "nh", "hy", "Dd", "Dt", "Os", "nf", "fi", "ce", "ta", "ig", "EX", "EE", "UR", "UE", "MT", "ME", "RS", "RE", "IX", "mso", "ec", "eo", "cs", "lf", "pc", "rm", "am", "as", "bd", "ss", "ul", "cu", "it", "tm"}
_ROFF_BREAK = {"PP", "P", "LP", "TP", "sp", "br", "HP", "IP", "Pp", "Sh", "Ss", "Bl", "El", "Bd", "Ed", "It"}
_ROFF_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(co"), "(c)"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^/,:%]"), ""),
    (re.compile(r"\\[e\\]"), r"\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r'\\"'), ""),
]


def _roff_args(args: str) -> list[str]:
    return [a[1:-1] if len(a) >= 2 and a[0] == a[-1] == '"' else a for a in re.findall(r'"[^"]*"|\S+', args)]


def roff_to_text(source: str) -> str:
    """Plain text of a man page: good enough for prose, not a formatter (tables are dropped)."""
    out: list[str] = []
    in_table = False
    for line in source.splitlines():
        if line.startswith((".TS", "'TS")):
            in_table = True
        if in_table:
            in_table = not line.startswith((".TE", "'TE"))
            continue
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')) or line.strip() in (".", "'"):
            continue
        if line[:1] in ".'":
            match = re.match(r"[.']\s*(\S+)\s*(.*)", line)
            if not match:
                continue
            macro, args = match.groups()
            if macro in _ROFF_SKIP:
                continue
            words = _roff_args(args)
            if macro in ("SH", "SS", "Sh", "Ss"):
                out.extend(["", " ".join(words).capitalize(), ""])
            elif macro in _ROFF_BREAK:
                out.append("")
                if macro in ("IP", "HP") and words:
                    out.append(words[0])
            elif macro in _ROFF_ALTERNATING:
                out.append("".join(words))
            elif words:
                out.append(" ".join(words))
        else:
            out.append(line)
    text = "\n".join(out)
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _man_documents(seed: int) -> Iterator[dict]:
    paths = []
    for section in ("1", "5", "7", "8"):
        paths.extend(sorted(glob.glob(f"/usr/share/man/man{section}/*")))
    random.Random(f"btx-man-{seed}").shuffle(paths)
    for path in paths:
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        source = _read_utf8(path)
        if source and not source.lstrip().startswith(".so "):
            yield {"text": roff_to_text(source), "source": path}


def wiki_documents(seed: int) -> Iterator[dict]:
    """Prose sources interleaved round-robin, repeated paragraphs dropped, short leftovers skipped."""
    sources = [
        _pydoc_topics(),
        _docstring_documents(),
        _license_documents(),
        _usr_share_doc_documents(seed),
        _man_documents(seed),
    ]
    seen: set[bytes] = set()
    sentinel = object()
    for doc in itertools.chain.from_iterable(itertools.zip_longest(*sources, fillvalue=sentinel)):
        if doc is sentinel:
            continue
        kept, size = [], 0
        for paragraph in re.split(r"\n\s*\n", doc["text"]):
            if size >= _MAX_WIKI_DOC_CHARS:
                break
            key = hashlib.sha1(" ".join(paragraph.split()).encode()).digest()
            if paragraph.strip() and key not in seen:
                seen.add(key)
                kept.append(paragraph.strip("\n"))
                size += len(paragraph)
        text = "\n\n".join(kept)
        if len(text) >= _MIN_DOC_CHARS:
            yield {"text": text + "\n", "source": doc["source"]}


def domain_documents(domain: str, seed: int) -> Iterator[dict]:
    if domain == "math":
        return ({"text": text, "source": f"generated/math/{i}"} for i, text in enumerate(math_documents(seed)))
    if domain == "code":
        return code_documents(seed)
    if domain == "wiki":
        return wiki_documents(seed)
    raise ValueError(f"unknown domain {domain!r}; the built-in domains are {', '.join(DOMAINS)}.")


# ---------------------------------------------------------------------------------------------
# The build.


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: str, lines: Iterator[str]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
    os.replace(tmp, path)


def _atomic_write_json(path: str, payload: dict) -> None:
    _atomic_write_text(path, [json.dumps(payload, indent=2, sort_keys=True) + "\n"])


def _log(message: str) -> None:
    print(f"[build_corpora] {message}", file=sys.stderr, flush=True)


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
    from btx_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece

    tok_dir = os.path.join(cfg.output, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    sample_path = os.path.join(tok_dir, "sample.txt")
    _atomic_write_text(sample_path, _tokenizer_sample(pools, cfg.tokenizer_sample_chars))
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
            _log(f"tokenizer up to date: {model_path}")
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
    _atomic_write_json(record_path, record)
    _log(f"trained tokenizer ({cfg.vocab_size} pieces) in {time.perf_counter() - start:.1f}s: {model_path}")
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
                "this machine lacks the sources listed in btx_megatron/data/corpora.py: use a "
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

    from btx_megatron.data.preprocess import PreprocessConfig, preprocess

    start = time.perf_counter()
    os.makedirs(cfg.output, exist_ok=True)
    manifest_path = os.path.join(cfg.output, "manifest.json")
    if corpora_up_to_date(manifest_path, cfg):
        _log(f"up to date: {manifest_path}")
        with open(manifest_path) as f:
            return json.load(f)

    pools = {domain: _Pool(domain, cfg) for domain in DOMAINS}
    model_path = _train_tokenizer(cfg, pools)
    processor = spm.SentencePieceProcessor(model_file=model_path)
    tokenizer_sha = sha256_file(model_path)

    jsonl_dir = os.path.join(cfg.output, "jsonl")
    data_dir = os.path.join(cfg.output, "data")
    os.makedirs(jsonl_dir, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)
    files: dict[str, str] = {"tokenizer/tokenizer.model": tokenizer_sha}
    domains: dict[str, dict] = {}
    for domain in DOMAINS:
        chosen = _select_documents(pools[domain], processor, cfg)
        domains[domain] = {}
        for split in SPLITS:
            jsonl_rel = f"jsonl/{domain}_{split}.jsonl"
            jsonl_path = os.path.join(cfg.output, jsonl_rel)
            _atomic_write_text(jsonl_path, (json.dumps(d, ensure_ascii=False) + "\n" for d in chosen[split]))
            jsonl_sha = sha256_file(jsonl_path)
            prefix_rel = f"data/{domain}_{split}"
            prefix = os.path.join(cfg.output, prefix_rel)
            meta = _read_json(prefix + ".meta.json")
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
            _log(f"{domain}/{split}: {num_documents} documents, {num_tokens} tokens -> {prefix}")
            domains[domain][split] = {
                "prefix": prefix_rel,
                "jsonl": jsonl_rel,
                "num_documents": num_documents,
                "num_tokens": num_tokens,
            }
            files[jsonl_rel] = jsonl_sha
            for suffix in (".bin", ".idx"):
                files[prefix_rel + suffix] = sha256_file(prefix + suffix)

    manifest = {
        "config": cfg.identity(),
        "tokenizer": {"path": "tokenizer/tokenizer.model", "sha256": tokenizer_sha, "vocab_size": processor.get_piece_size()},
        "domains": domains,
        "files": files,
        "python": sys.version.split()[0],
        "stdlib": stdlib_dir(),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    _atomic_write_json(manifest_path, manifest)  # last: its presence means the build completed
    _log(f"done in {manifest['build_seconds']}s: {manifest_path}")
    return manifest


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
