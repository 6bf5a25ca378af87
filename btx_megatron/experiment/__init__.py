"""One experiment file, every BTX stage: the resumable pipeline (:mod:`.pipeline`), its stage
records (:mod:`.state`), the jobs it runs in child processes (:mod:`.worker`) and its results
table (:mod:`.results`)."""

from .pipeline import OPTIONAL_STAGES, STAGE_GROUPS, STAGES, Pipeline, PipelineError, load_pipeline

__all__ = ["OPTIONAL_STAGES", "STAGE_GROUPS", "STAGES", "Pipeline", "PipelineError", "load_pipeline"]
