"""Hugging Face <-> Megatron-Core conversion (Llama / Mistral dense, Mixtral MoE).

``mapping`` holds the pure name and tensor mappings; ``hf_import`` / ``hf_export`` do the I/O.
"""

from .hf_export import export_hf
from .hf_import import import_hf

__all__ = ["export_hf", "import_hf"]
