"""Typed stub of the Rust extension built from rust_core/py.

Internal: import it only through `allocsvc.core`, which re-exports it.
Segment hashes are unsigned 64-bit integers (xxh3-64 of the canonical key's UTF-8 bytes, seed 0).
"""

from collections.abc import Sequence
from typing import final

__version__: str
__all__ = [
    "Engine",
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

# (experiment, segment hash, variant, allocations, conversions, value sum)
CountRow = tuple[int, int, int, int, int, float]
# (variant index, cascade level used, propensity, full canonical segment key)
Decision = tuple[int, int, float, str]

def segment_key(dimensions: Sequence[str], values: Sequence[str]) -> str:
    """Canonical key `dim:value|dim:value` (values trimmed, lower-cased, `%|:` escaped)."""

def path_keys(dimensions: Sequence[str], values: Sequence[str]) -> list[str]:
    """Keys of the cascade path: global (empty key), then one key per level."""

def key_hash(key: str) -> int:
    """Stable 64-bit hash of a canonical segment key."""

def parent_keys(key: str) -> list[str]:
    """The cascade path of a canonical key: `""`, first level, ..., the key itself."""

def bucket(user_id: str, seed: int) -> float:
    """Deterministic position of a user in [0, 1) for plain hash splits."""

def seed_rng(seed: int) -> None:
    """Reseed the calling thread's random generator (reproducible runs)."""

def sample_beta(alpha: float, beta: float, n: int) -> list[float]:
    """n draws from Beta(alpha, beta) with the calling thread's generator."""

def beta_throughput(alpha: float, beta: float, n: int) -> float:
    """Draw n Beta samples inside Rust and return their mean (for throughput benchmarks)."""

def thompson_select(
    alphas: Sequence[float], betas: Sequence[float], bonus: Sequence[float] | None = None
) -> int:
    """Index of the largest Beta draw plus bonus."""

def selection_probabilities(
    alphas: Sequence[float], betas: Sequence[float], bonus: Sequence[float] | None = None
) -> list[float]:
    """Monte Carlo probability that Thompson selection picks each variant."""

@final
class Engine:
    """Posterior store, experiment table and segment trees; all methods are thread-safe."""

    def __init__(self) -> None: ...
    def configure(
        self,
        experiment: int,
        *,
        variants: int,
        dimensions: Sequence[str],
        min_samples: Sequence[int],
        policy: str = "thompson",
        weights: Sequence[float] | None = None,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        warm_start: float = 10.0,
        exploration: float = 0.0,
        salt: int = 0,
    ) -> None:
        """Add or replace an experiment's allocation settings (counters are kept).

        `min_samples` has one entry per dimension: the allocations a node at that level needs
        before the cascade uses it. `policy` is `thompson`, `uniform` or `fixed`.
        """

    def remove(self, experiment: int) -> None: ...
    def has_experiment(self, experiment: int) -> bool: ...
    def decide(
        self, experiment: int, user_id: str, values: Sequence[str], record: bool = True
    ) -> Decision:
        """One whole allocation: path hashes, cascade, warm start, sampling, choice.

        With `record`, the allocation is counted at every level of the path.
        """

    def decide_batch(
        self,
        experiment: int,
        user_ids: Sequence[str],
        values: Sequence[Sequence[str]],
        record: bool = True,
    ) -> list[Decision]:
        """`decide` for many users of one experiment, with the GIL released."""

    def record_allocation(self, experiment: int, segment_key: str, variant: int) -> None: ...
    def record_conversion(
        self, experiment: int, segment_key: str, variant: int, value: float = 0.0
    ) -> None:
        """Count a conversion at every level of the key's path."""

    def counts(self, experiment: int, segment_key: str) -> list[tuple[int, int, float]]:
        """(allocations, conversions, value sum) per variant of one node."""

    def take_deltas(self) -> list[CountRow]:
        """Counter changes since the last call (atomically taken and reset)."""

    def snapshot(self, experiment: int | None = None) -> list[CountRow]:
        """Current totals of every node of one experiment (of all with None)."""

    def load_counts(self, rows: Sequence[CountRow], replace: bool = False) -> None:
        """Add rows to the totals, or with `replace` set totals to them (pending deltas kept)."""

    def set_tree(self, experiment: int, nodes: Sequence[int] | None = None) -> None:
        """Swap in the node hashes the cascade may use; None allows every node."""

    def propensities(self, experiment: int, segment_key: str) -> list[float]:
        """Selection probability of each variant at one node in its current state."""

    def node_count(self) -> int: ...
