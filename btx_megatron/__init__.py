"""btx-megatron: Branch-Train-MiX pretraining on Megatron-Core."""

__version__ = "0.1.0"
