"""The BTX merge: dense branch checkpoints -> one MoE checkpoint (``tools/merge_branches.py``).

``plan``         pure tensor arithmetic: experts (btx / split / blend / upcycle), float64 averages
``sources``      inspect and check the source checkpoints
``units``        the output slices and which process makes each
``router_init``  random and centroid routers (centroids from each branch's own data)
``options``      MergeOptions -> the checked MergeJob
``writer``       run_merge: the distributed, streaming read / merge / write
``edit``         grow and prune a BTX checkpoint: add / remove an expert on every process (``tools/edit_experts.py``)
``edit_options`` AddOptions / RemoveOptions -> the checked EditJob (counts, output chunks, provenance)
``edit_writer``  write_edit: the distributed write of an edit's chunks, staged then published
``edit_list``    describe / format_description: the experts, their sources and the edit history

Importing this package does not import Megatron-Core; only centroid routers need it.
"""

from .edit import add_expert, remove_expert
from .edit_list import describe
from .edit_options import AddOptions, RemoveOptions
from .options import MergeJob, MergeOptions, prepare
from .plan import ExpertPlan, average, average_into, expert_shape, fill_experts, normalized_weights
from .router_init import ROUTER_INITS, centroid_router, compute_centroids, random_router, replicate_centroids
from .sources import Source, check_sources, inspect_source
from .units import Unit, assign_units, build_units
from .writer import run_merge

__all__ = [
    "AddOptions", "RemoveOptions", "add_expert", "describe", "remove_expert",
    "ExpertPlan", "MergeJob", "MergeOptions", "ROUTER_INITS", "Source", "Unit", "assign_units", "average",
    "average_into", "build_units", "centroid_router", "check_sources", "compute_centroids", "expert_shape",
    "fill_experts", "inspect_source", "normalized_weights", "prepare", "random_router", "replicate_centroids",
    "run_merge",
]
