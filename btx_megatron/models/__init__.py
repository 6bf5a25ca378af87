"""Model construction from Megatron-Core specs."""

from .gpt import HAVE_TE, build_model_chunks, transformer_config, virtual_pipeline_size

__all__ = ["HAVE_TE", "build_model_chunks", "transformer_config", "virtual_pipeline_size"]
