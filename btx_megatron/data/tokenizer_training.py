"""Offline sentencepiece training, Llama-2 style, the core of ``tools/train_tokenizer.py``.

Llama-2's ``tokenizer.model`` conventions are kept so a model trained here reads like one of
those: unk=0, bos=1, eos=2 (eos is Megatron's EOD), no pad piece, byte fallback (any UTF-8 text
round-trips; unseen characters become byte pieces instead of ``<unk>``), digits split, identity
normalisation and kept whitespace (code indentation survives a round trip).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterator

from btx_megatron.checkpoint.io import write_atomic


@dataclass
class TokenizerTrainingConfig:
    """Options of ``tools/train_tokenizer.py``."""

    input: list[str]
    """Plain-text files; every line is a training sentence."""
    model_prefix: str
    """Writes ``<model_prefix>.model`` and ``<model_prefix>.vocab``."""
    vocab_size: int = 8000
    model_type: str = "bpe"
    """bpe (as Llama-2) or unigram."""
    character_coverage: float = 0.9995
    """Share of characters covered by pieces; the rest fall back to bytes."""
    input_sentence_size: int = 2_000_000
    """Sentences sampled from the input (0: all). Sampling is seeded, so still deterministic."""
    seed: int = 1234
    num_threads: int = 2
    """Training threads. sentencepiece's result does not depend on the thread count for bpe."""
    max_sentence_length: int = 8192
    """Longer lines (bytes) are skipped by sentencepiece."""

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ValueError("--input is required: one or more plain-text files.")
        for path in self.input:
            if not os.path.isfile(path):
                raise ValueError(f"--input {path!r} does not exist or is not a file.")
        if all(os.path.getsize(p) == 0 for p in self.input):
            raise ValueError("--input files are all empty; the tokenizer needs text to learn from.")
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"--model-type {self.model_type!r}: use bpe or unigram.")
        # 3 special pieces + 256 byte pieces are always present.
        if self.vocab_size < 300:
            raise ValueError(f"--vocab-size {self.vocab_size} is too small: byte fallback alone needs 259 pieces; use >= 300.")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"--character-coverage {self.character_coverage} must be in [0.9, 1.0].")
        if self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {self.num_threads}.")


def train_sentencepiece(cfg: TokenizerTrainingConfig) -> str:
    """Trains the model and returns the path of ``<model_prefix>.model`` (written atomically)."""
    import sentencepiece as spm

    out_dir = os.path.dirname(os.path.abspath(cfg.model_prefix)) or "."
    os.makedirs(out_dir, exist_ok=True)
    # Sentences are streamed in and the model comes back as bytes: with file arguments
    # sentencepiece stores the input paths and model prefix inside the .model, so the same text
    # trained in two directories would give two different files (and two tokenizer identities).
    model_bytes = io.BytesIO()
    # The seed drives sentence sampling/shuffling; TrainerSpec has no seed field of its own.
    spm.set_random_generator_seed(cfg.seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(cfg.input),
        model_writer=model_bytes,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        character_coverage=cfg.character_coverage,
        input_sentence_size=cfg.input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        max_sentence_length=cfg.max_sentence_length,
        num_threads=cfg.num_threads,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        minloglevel=2,
    )
    model_proto = _canonical_model_proto(model_bytes.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab_lines = [f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.get_piece_size())]
    # .vocab first, .model last, each via a temporary name: a killed run must not leave a
    # half-written .model that a later build would accept.
    write_atomic(cfg.model_prefix + ".vocab", "".join(vocab_lines).encode("utf-8"))
    write_atomic(cfg.model_prefix + ".model", model_proto)
    return cfg.model_prefix + ".model"


def _sentences(paths: list[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line


def _canonical_model_proto(model_proto: bytes) -> bytes:
    """Drops the thread count sentencepiece records in the model: it does not change the pieces
    (checked for bpe), but would make the file's bytes, and so the tokenizer identity, depend on
    the machine's core count."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: keep the bytes as trained
        return model_proto
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    model.trainer_spec.ClearField("num_threads")
    return model.SerializeToString(deterministic=True)
