"""Branch-Train-MiX: merging dense branches into a mixture-of-experts model.

:mod:`.merge` holds the arithmetic (averaging, expert stacking, split / blend / upcycle,
router initialisation) on in-memory tensors; :mod:`.merge_io` reads branch checkpoints slice
by slice and writes the MoE checkpoint with Megatron-Core distributed checkpointing
(``tools/merge_branches.py`` is its command line).
"""

from .merge import ExpertPlan, average, centroid_router, fill_experts, random_router

__all__ = ["ExpertPlan", "MergeOptions", "average", "centroid_router", "fill_experts", "random_router", "run_merge"]


def __getattr__(name):
    # merge_io pulls in Megatron-Core; import it only when used.
    if name in ("MergeOptions", "run_merge"):
        from . import merge_io

        return getattr(merge_io, name)
    raise AttributeError(name)
