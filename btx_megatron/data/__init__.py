"""Data pipeline: tokenizers, preprocessing, domain blends, per-domain evaluation, built-in corpora.

The trainer calls ``build_tokenizer``, ``check_vocab_fits``, ``build_pretraining_datasets`` and
``build_domain_eval_datasets``; the tools in ``tools/`` call ``preprocess``,
``train_sentencepiece`` and ``build_corpora``. Heavy imports (megatron.core, sentencepiece)
happen inside the functions, so importing this package is cheap.
"""

from btx_megatron.config.blend import Blend, parse_blend
from btx_megatron.data.corpora import CorporaConfig, build_corpora
from btx_megatron.data.documents import DOMAINS
from btx_megatron.data.datasets import (
    build_domain_eval_datasets,
    build_pretraining_datasets,
    meta_path,
    validate_prefix,
)
from btx_megatron.data.preprocess import PreprocessConfig, PreprocessResult, preprocess
from btx_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece
from btx_megatron.data.tokenizers import (
    build_tokenizer,
    check_vocab_fits,
    tokenizer_fingerprint,
)

__all__ = [
    "Blend",
    "CorporaConfig",
    "DOMAINS",
    "PreprocessConfig",
    "PreprocessResult",
    "TokenizerTrainingConfig",
    "build_corpora",
    "build_domain_eval_datasets",
    "build_pretraining_datasets",
    "build_tokenizer",
    "check_vocab_fits",
    "meta_path",
    "parse_blend",
    "preprocess",
    "tokenizer_fingerprint",
    "train_sentencepiece",
    "validate_prefix",
]
