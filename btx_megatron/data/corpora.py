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

from btx_megatron.checkpoint.io import write_atomic, write_json_atomic
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
    write_json_atomic(record_path, record)
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
            write_atomic(jsonl_path, (json.dumps(d, ensure_ascii=False) + "\n" for d in chosen[split]))
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
    write_json_atomic(manifest_path, manifest)  # last: its presence means the build completed
    _log(f"done in {manifest['build_seconds']}s: {manifest_path}")
    return manifest


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------------------------
# Extra domains: a new domain built into an existing corpora directory.
#
# A new domain arrives after the BTX model exists (growing it by one expert), so its text is
# tokenized with the corpora's existing tokenizer: the vocabulary is fixed. The three-domain build
# above is not touched; the extra domain writes DIR/data/NAME_{train,valid}, DIR/jsonl/NAME_*.jsonl
# and its own manifest DIR/extra_domains/NAME.json (DIR/manifest.json is left as it is, so
# everything that fingerprints it stays valid).
#
# ``headers``: C header files, distinct from the Python of ``code`` and from prose: libc and
# kernel headers in /usr/include (every Debian with a C compiler has libc6-dev and
# linux-libc-dev), the Python C API (sysconfig include dirs, python3.X-dev) and the compiler's own
# headers (/usr/lib/gcc/*/*/include). C++ library headers are skipped. One document per file,
# identical files kept once, each capped at a line boundary so a few huge generated headers
# (GL, Vulkan) do not dominate. A machine with less text gives a smaller domain (down to
# ``min_tokens``); the manifest records what was found.

EXTRA_DOMAINS = ("headers",)
EXTRA_CORPORA_VERSION = 1
EXTRA_MANIFEST_DIR = "extra_domains"
_MAX_HEADER_DOC_CHARS = 16_000
_HEADER_SKIP_DIRS = {"c++"}


def header_roots() -> list[str]:
    """Directories searched for C headers, in order (the first copy of a file wins)."""
    roots = ["/usr/include", "/usr/local/include"]
    paths = sysconfig.get_paths()
    roots += [paths.get("include"), paths.get("platinclude")]
    roots += sorted(glob.glob("/usr/lib/gcc/*/*/include"))
    seen, out = set(), []
    for root in roots:
        if root and os.path.isdir(root) and os.path.realpath(root) not in seen:
            seen.add(os.path.realpath(root))
            out.append(root)
    return out


def _header_files() -> list[str]:
    files, seen = [], set()
    for root in header_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _HEADER_SKIP_DIRS)
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                real = os.path.realpath(path)
                if name.endswith(".h") and real not in seen and os.path.isfile(real):
                    seen.add(real)
                    files.append(path)
    return sorted(files)


def _cap_at_line(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut + 1 if cut > 0 else limit]


def header_documents(seed: int) -> Iterator[dict]:
    """C headers in a seeded shuffle of the sorted file list, duplicates dropped."""
    files = _header_files()
    random.Random(f"btx-headers-{seed}").shuffle(files)
    seen: set[bytes] = set()
    for path in files:
        text = _read_utf8(path)
        if not text or len(text) < _MIN_DOC_CHARS:
            continue
        key = hashlib.sha1(text.encode()).digest()
        if key in seen:
            continue
        seen.add(key)
        yield {"text": _cap_at_line(text, _MAX_HEADER_DOC_CHARS), "source": path}


def extra_domain_documents(domain: str, seed: int) -> Iterator[dict]:
    if domain == "headers":
        return header_documents(seed)
    raise ValueError(f"unknown extra domain {domain!r}; the built-in extra domains are {', '.join(EXTRA_DOMAINS)}.")


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
        if self.domain not in EXTRA_DOMAINS:
            raise ValueError(f"extra domain {self.domain!r}: choose one of {', '.join(EXTRA_DOMAINS)}.")
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

    from btx_megatron.data.preprocess import PreprocessConfig, preprocess

    start = time.perf_counter()
    base = _read_json(os.path.join(cfg.corpora, "manifest.json"))
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
    previous = _read_json(manifest_path)
    if previous.get("config") == identity and all(
            os.path.isfile(os.path.join(cfg.corpora, rel)) and sha256_file(os.path.join(cfg.corpora, rel)) == sha
            for rel, sha in previous.get("files", {}).items()):
        _log(f"extra domain {cfg.domain} up to date: {manifest_path}")
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
        _log(f"{cfg.domain}/{split}: {result.num_documents} documents, {result.num_tokens} tokens -> {prefix}")
        splits[split] = {"prefix": prefix_rel, "jsonl": jsonl_rel, "num_documents": result.num_documents,
                         "num_tokens": result.num_tokens}
        for rel in (jsonl_rel, prefix_rel + ".bin", prefix_rel + ".idx"):
            files[rel] = sha256_file(os.path.join(cfg.corpora, rel))
    manifest = {
        "config": identity, "domain": cfg.domain, "splits": splits, "files": files,
        "tokenizer": {"path": base["tokenizer"]["path"], "sha256": tokenizer_sha},
        "sources": header_roots() if cfg.domain == "headers" else [],
        "exhausted": exhausted, "selected_tokens": counts,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    os.makedirs(os.path.dirname(manifest_path), exist_ok=True)
    write_json_atomic(manifest_path, manifest)  # last: its presence means the build completed
    _log(f"extra domain {cfg.domain} done in {manifest['build_seconds']}s: {manifest_path}"
         + (f" (the machine's text ran out at {counts['train']} train tokens)" if exhausted else ""))
    return manifest


def _select_extra(cfg: ExtraDomainConfig, identity: dict, processor) -> tuple[dict, dict, bool]:
    """Documents until train has ``tokens`` and valid 1/valid_every of it, or the text runs out."""
    docs = extra_domain_documents(cfg.domain, identity["seed"])
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
            f"{', '.join(header_roots()) if cfg.domain == 'headers' else 'nothing'}. Install libc6-dev / "
            "python3-dev, or preprocess another corpus with tools/preprocess_data.py.")
    return chosen, counts, exhausted
