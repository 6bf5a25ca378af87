"""Shared helpers of the tests in tests/data (a plain module: this directory has no conftest)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Texts a small byte-fallback sentencepiece model round-trips exactly: indentation, tabs,
# repeated spaces, non-ASCII letters, an emoji (bytes), blank lines.
ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))\n",
    "Solve 3x + 7 = 22.\nStep 1: 3x = 15.\nStep 2: x = 5.",
    "Ünïcödé façade, naïve café — 東京 😀 done.",
    "  leading spaces\tand\ttabs  and  double  spaces  ",
    "x" * 300,
]


def training_text() -> str:
    """A few hundred KB of mixed text for a tiny tokenizer (deterministic)."""
    from btx_megatron.data.math_problems import math_document

    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    parts = [math_document(7, i) for i in range(60)]
    for name in ("argparse.py", "json/decoder.py", "textwrap.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            parts.append(f.read())
    parts.extend(ROUND_TRIP_TEXTS)
    return "\n".join(parts)


def train_tiny_tokenizer(directory: str, vocab_size: int = 600, seed: int = 1234) -> str:
    from btx_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece

    os.makedirs(directory, exist_ok=True)
    text_path = os.path.join(directory, "train.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(training_text())
    return train_sentencepiece(
        TokenizerTrainingConfig(
            input=[text_path], model_prefix=os.path.join(directory, "tok"), vocab_size=vocab_size, seed=seed
        )
    )


def write_jsonl(path: str, texts: list[str], key: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text}, ensure_ascii=False) + "\n")
    return path


@dataclass
class DataCfg:
    """Stand-in for btx_megatron.config.DataConfig (same fields, duck-typed)."""

    mock_data: bool = False
    data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    eval_domains: dict[str, list[str]] = field(default_factory=dict)
    tokenizer_type: str | None = "SentencePieceTokenizer"
    tokenizer_model: str | None = None
    data_cache_path: str | None = None
    vocab_size: int | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


def preprocess_texts(tmp_dir: str, name: str, texts: list[str], tokenizer_model: str, **kwargs):
    from btx_megatron.data.preprocess import PreprocessConfig, preprocess

    jsonl = write_jsonl(os.path.join(tmp_dir, f"{name}.jsonl"), texts)
    prefix = os.path.join(tmp_dir, name)
    kwargs.setdefault("append_eod", True)
    kwargs.setdefault("log_interval", 0)
    result = preprocess(
        PreprocessConfig(
            input=[jsonl],
            output_prefix=prefix,
            tokenizer_type="SentencePieceTokenizer",
            tokenizer_model=tokenizer_model,
            **kwargs,
        )
    )
    return prefix, result
