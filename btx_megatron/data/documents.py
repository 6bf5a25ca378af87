"""Documents of the built-in domains, made offline from what a machine has.

Each source yields ``{"text": ..., "source": ...}`` in a deterministic order (given the seed and the
machine's files); :mod:`btx_megatron.data.corpora` and :mod:`btx_megatron.data.extra_domains` pick
and tokenize them.

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
- ``headers`` (an extra domain, added after the BTX model exists): C header files, distinct from
  the Python of ``code`` and from prose: libc and kernel headers in /usr/include (every Debian
  with a C compiler has libc6-dev and linux-libc-dev), the Python C API (sysconfig include dirs,
  python3.X-dev) and the compiler's own headers (/usr/lib/gcc/*/*/include). C++ library headers
  are skipped. One document per file, identical files kept once, each capped at a line boundary
  so a few huge generated headers (GL, Vulkan) do not dominate.

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
import os
import random
import re
import sysconfig
from typing import Iterator

from btx_megatron.data.math_problems import math_documents

DOMAINS = ("math", "code", "wiki")
EXTRA_DOMAINS = ("headers",)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}
_MIN_DOC_CHARS = 200
# Some Debian copyright files run to hundreds of KB of file lists; capping every prose document
# keeps the round-robin mix balanced in characters, not only in document count.
_MAX_WIKI_DOC_CHARS = 16_000
_MAX_HEADER_DOC_CHARS = 16_000
_HEADER_SKIP_DIRS = {"c++"}


# ---------------------------------------------------------------------------------------------
# The built-in domains.


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
# The extra domain: C headers.


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
