"""Tokenizers through Megatron-Core's tokenizer classes, plus the identity checks around them.

``build_tokenizer`` is the one place the trainer and ``tools/preprocess_data.py`` obtain a
tokenizer, so a dataset and the model that reads it agree on token ids. The identity of a
tokenizer (``tokenizer_fingerprint``) is a sha256 over its model file(s) plus its vocabulary
size; preprocessing records it next to the ``.bin``/``.idx`` pair and training compares it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

SUPPORTED_TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# Files that define a Hugging Face tokenizer directory; weights and model configs are not part
# of the tokenizer's identity, so they are left out of the fingerprint.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
)


def build_tokenizer(
    tokenizer_type: str | None, tokenizer_model: str | None, vocab_size: int | None = None
):
    """Returns a Megatron-Core tokenizer (``.vocab_size``, ``.eod``, ``.tokenize``, ``.detokenize``).

    ``SentencePieceTokenizer``: ``tokenizer_model`` is a sentencepiece ``.model`` file (the
    Llama-2 ``tokenizer.model`` kind, or one from ``tools/train_tokenizer.py``).
    ``HuggingFaceTokenizer``: ``tokenizer_model`` is a local Hugging Face tokenizer directory.
    ``NullTokenizer``: no model; ``vocab_size`` is required (used with ``--mock-data``).
    """
    # Imported here: megatron.core.tokenizers pulls in a good part of megatron.core, which CLI
    # tools that only print --help should not pay for.
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type is None:
        raise ValueError(
            "--tokenizer-type is required: pass one of "
            f"{', '.join(SUPPORTED_TOKENIZER_TYPES)} (NullTokenizer only with --mock-data)."
        )
    if tokenizer_type not in SUPPORTED_TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_TOKENIZER_TYPES)}."
        )

    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError(
                "--tokenizer-type NullTokenizer needs a positive --vocab-size (the token ids it "
                "stands for are 0..vocab_size-1)."
            )
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "null-text"}, vocab_size=int(vocab_size)
        )

    if not tokenizer_model:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type} needs --tokenizer-model: "
            + (
                "the path of a sentencepiece .model file (train one with tools/train_tokenizer.py)."
                if tokenizer_type == "SentencePieceTokenizer"
                else "the path of a local Hugging Face tokenizer directory."
            )
        )
    if tokenizer_type == "SentencePieceTokenizer":
        if not os.path.isfile(tokenizer_model):
            raise ValueError(
                f"--tokenizer-model {tokenizer_model!r} is not a file; SentencePieceTokenizer needs "
                "a sentencepiece .model file (train one with tools/train_tokenizer.py)."
            )
        try:
            return MegatronTokenizer.from_pretrained(
                tokenizer_path=tokenizer_model, metadata_path={"library": "sentencepiece"}
            )
        except (RuntimeError, OSError) as err:  # sentencepiece raises RuntimeError on bad files
            raise ValueError(
                f"--tokenizer-model {tokenizer_model!r} could not be loaded as a sentencepiece "
                f"model ({err}); check the path, or use --tokenizer-type HuggingFaceTokenizer "
                "for a Hugging Face tokenizer directory."
            ) from err

    # HuggingFaceTokenizer
    if not os.path.isdir(tokenizer_model):
        raise ValueError(
            f"--tokenizer-model {tokenizer_model!r} is not a directory; HuggingFaceTokenizer needs "
            "a local tokenizer directory (e.g. one holding tokenizer.json), nothing is downloaded."
        )
    try:
        return MegatronTokenizer.from_pretrained(
            tokenizer_path=tokenizer_model, metadata_path={"library": "huggingface"}
        )
    except Exception as err:  # transformers raises many types for a malformed directory
        raise ValueError(
            f"--tokenizer-model {tokenizer_model!r} could not be loaded as a Hugging Face "
            f"tokenizer ({type(err).__name__}: {err}); check the directory's contents."
        ) from err


def check_vocab_fits(tokenizer, vocab_size: int) -> None:
    """Raises ValueError when the tokenizer can emit ids the model's embedding cannot hold."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but --vocab-size is {vocab_size}: "
            f"set --vocab-size to at least {tokenizer.vocab_size} (or leave it unset so it is "
            "taken from the tokenizer), or use the tokenizer the model was built for."
        )


def _sha256_files(paths: list[str]) -> str:
    # Keyed on (path, size, mtime) so every rank and every prefix of a blend hashes a
    # (possibly large) tokenizer.json once, and a replaced file is hashed again.
    key = tuple((os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths)
    return _sha256_files_cached(key)


@functools.lru_cache(maxsize=32)
def _sha256_files_cached(key: tuple) -> str:
    paths = [entry[0] for entry in key]
    digest = hashlib.sha256()
    for path in paths:
        # The name is hashed too, so moving bytes between files changes the identity.
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int) -> dict[str, Any]:
    """The identity recorded beside a preprocessed dataset (``<prefix>.meta.json``)."""
    if tokenizer_type == "NullTokenizer" or tokenizer_model is None:
        sha = None
    elif os.path.isdir(tokenizer_model):
        files = [
            os.path.join(tokenizer_model, name)
            for name in _HF_TOKENIZER_FILES
            if os.path.isfile(os.path.join(tokenizer_model, name))
        ]
        sha = _sha256_files(files)
    else:
        sha = _sha256_files([tokenizer_model])
    return {"tokenizer_type": tokenizer_type, "sha256": sha, "vocab_size": int(vocab_size)}


def fingerprint_of(tokenizer) -> dict[str, Any] | None:
    """Fingerprint of a tokenizer object from ``build_tokenizer``; None when it has no model file."""
    path = getattr(tokenizer, "path", None)
    if not path or not os.path.exists(path):
        return None
    library = getattr(tokenizer, "library", None)
    tokenizer_type = {"sentencepiece": "SentencePieceTokenizer", "huggingface": "HuggingFaceTokenizer"}.get(
        library, str(library)
    )
    return tokenizer_fingerprint(tokenizer_type, path, tokenizer.vocab_size)
