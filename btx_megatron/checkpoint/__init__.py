"""Checkpoints on disk: the format (tracker, iteration directories, atomic publish), the
manifest every checkpoint carries, DCP verification and fingerprints, atomic file writes and
provenance. Used by training, the merge, the converters and evaluation alike."""

from .format import (
    FORMAT_VERSION, MANIFEST, TRACKER, CheckpointError, clean_stale_staging, iteration_dir, is_checkpoint_dir,
    new_staging_dir, publish, read_manifest, read_tracker, resolve, restore_tracked,
)
from .io import (
    FAULT_POINT_ENV, check_output, fault_point, mark_output, publish_directory, remove_stale_staging, staging_dir_for, write_json_atomic,
    write_text_atomic,
)
from .manifest import Manifest, offline_layout
from .provenance import git_revision
from .verify import fingerprint, verify_files

__all__ = [
    "FAULT_POINT_ENV", "FORMAT_VERSION", "fault_point", "MANIFEST", "TRACKER", "CheckpointError", "Manifest", "check_output", "clean_stale_staging",
    "fingerprint", "mark_output", "remove_stale_staging",
    "git_revision", "is_checkpoint_dir", "iteration_dir", "new_staging_dir", "offline_layout", "publish",
    "publish_directory", "read_manifest", "read_tracker", "resolve", "restore_tracked", "staging_dir_for", "verify_files",
    "write_json_atomic", "write_text_atomic",
]
