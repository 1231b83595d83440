"""The Rust core, re-exported: the only module that imports `allocsvc._core`.

See `_core.pyi` for the typed surface. Everything in the package imports from here.
"""

from allocsvc._core import (
    BatchCatalogue,
    Engine,
    PreparedBatch,
    __version__,
    beta_throughput,
    bucket,
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
    "BatchCatalogue",
    "Engine",
    "PreparedBatch",
    "__version__",
    "beta_throughput",
    "bucket",
    "key_hash",
    "parent_keys",
    "path_keys",
    "sample_beta",
    "seed_rng",
    "segment_key",
    "selection_probabilities",
    "thompson_select",
]
