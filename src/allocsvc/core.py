"""The Rust core, re-exported: the only module that imports `allocsvc._core`.

See `_core.pyi` for the typed surface. Everything in the package imports from here.
"""

from allocsvc._core import (
    ASSIGNMENT_COPY_COLUMNS,
    RESTORE_COPY_COLUMNS,
    AssignmentLog,
    BatchCatalogue,
    Engine,
    HeldAssignments,
    MadeAssignments,
    PreparedBatch,
    __version__,
    batch_items,
    beta_throughput,
    bucket,
    copy_assignments,
    decompress_block,
    key_hash,
    parent_keys,
    path_keys,
    sample_beta,
    seed_rng,
    segment_key,
    selection_probabilities,
    thompson_select,
)

__all__ = [
    "ASSIGNMENT_COPY_COLUMNS",
    "RESTORE_COPY_COLUMNS",
    "AssignmentLog",
    "BatchCatalogue",
    "Engine",
    "HeldAssignments",
    "MadeAssignments",
    "PreparedBatch",
    "__version__",
    "batch_items",
    "beta_throughput",
    "bucket",
    "copy_assignments",
    "decompress_block",
    "key_hash",
    "parent_keys",
    "path_keys",
    "sample_beta",
    "seed_rng",
    "segment_key",
    "selection_probabilities",
    "thompson_select",
]
