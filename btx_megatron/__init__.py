"""btx-megatron: Branch-Train-MiX pretraining on Megatron-Core."""

from .runtime.cpu_compat import eager_megatron_fusions

__version__ = "0.1.0"

# Before anything imports megatron.core (a no-op with CUDA; see the function).
eager_megatron_fusions()
