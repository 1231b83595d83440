"""The segment tree (SPEC §7): settings, node statistics, navigation and cascade usage shares.

A tree holds one node per segment key of an experiment: the global node (empty key, level 0) and
`dim:value|...` keys whose dimensions follow `HierarchySettings.levels`. Every node carries the
builder's verdict: kept (the allocation cascade may use it) or pruned, with a reason. Pruned nodes
stay in the tree so that tools can show why; `kept_hashes()` is what the Rust core is given.

Two views of the same nodes:
- the structural tree: each node's parent is its key minus the last `dim:value`;
- the kept tree: each kept node hangs under its nearest kept ancestor (`kept_parent_hash`), which is
  what the cascade walks once pruned nodes are removed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from allocsvc.core import path_keys
from allocsvc.errors import InvalidRequest

if TYPE_CHECKING:
    from allocsvc.allocation.experiments import Experiment

# SPEC §7 speaks of a 3-5 level tree; one or two dimensions (and auto mode's single `cluster`
# dimension) are accepted too, so that every segmented experiment can be rebuilt.
MIN_LEVELS = 1
MAX_LEVELS = 5
DEFAULT_ALPHA = 0.05
GLOBAL_LABEL = "global"
_FORBIDDEN_IN_DIMENSION = ("|", ":", "%")


class Correction(StrEnum):
    """How `HierarchySettings.alpha` is shared among the nodes one build tests."""

    # Each node is tested at alpha: of N nodes that do not differ, about alpha * N are kept.
    NODE = "node"
    # Weighted Bonferroni over the nodes tested: node i at alpha * n_i / sum(n), n = its
    # allocations. The chance of keeping any node that does not differ stays below alpha.
    TREE = "tree"


@dataclass(frozen=True, slots=True)
class HierarchySettings:
    """How a tree is built; validated on construction (errors name the offending field).

    - `levels`: segment dimensions in cascade order, level 1 first (1-5 of them).
    - `min_samples_per_level`: allocations a node needs at each level (one per dimension), the same
      minimums the Rust cascade applies.
    - `max_depth`: deepest level that may be kept; 0 means all levels (as in `HierarchyConfig`).
    - `alpha`: significance level of the pruning test (Bonferroni over the variants of a node);
      with `correction` `tree` (the default) the family-wise level over the whole tree.
    - `correction`: how alpha is shared among the nodes tested (`Correction`).
    - `prune`: False keeps every node up to `max_depth`; the tests are still computed and reported.
    """

    levels: tuple[str, ...]
    min_samples_per_level: tuple[int, ...]
    max_depth: int = 0
    alpha: float = DEFAULT_ALPHA
    prune: bool = True
    correction: Correction = Correction.TREE

    def __post_init__(self) -> None:
        levels = tuple(self.levels)
        minimums = tuple(self.min_samples_per_level)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "min_samples_per_level", minimums)
        if not MIN_LEVELS <= len(levels) <= MAX_LEVELS:
            raise InvalidRequest(
                "levels", f"needs {MIN_LEVELS} to {MAX_LEVELS} dimensions, got {len(levels)}"
            )
        for i, dim in enumerate(levels):
            if not isinstance(dim, str) or not dim or dim != dim.strip():
                raise InvalidRequest(f"levels[{i}]", "must be a non-empty trimmed string")
            if any(ch in dim for ch in _FORBIDDEN_IN_DIMENSION):
                raise InvalidRequest(f"levels[{i}]", "must not contain '|', ':' or '%'")
        if len(set(levels)) != len(levels):
            raise InvalidRequest("levels", "dimensions must be distinct")
        if len(minimums) != len(levels):
            raise InvalidRequest(
                "min_samples_per_level",
                f"needs one entry per level ({len(levels)}), got {len(minimums)}",
            )
        for i, n in enumerate(minimums):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidRequest(f"min_samples_per_level[{i}]", "must be an integer >= 0")
        if isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int):
            raise InvalidRequest("max_depth", "must be an integer")
        if not 0 <= self.max_depth <= len(levels):
            raise InvalidRequest(
                "max_depth", f"must be 0 (all levels) to {len(levels)}, got {self.max_depth}"
            )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise InvalidRequest("alpha", "must be a number")
        if not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
            raise InvalidRequest("alpha", f"must be in (0, 1), got {alpha}")
        object.__setattr__(self, "alpha", float(alpha))
        try:
            object.__setattr__(self, "correction", Correction(self.correction))
        except ValueError:
            raise InvalidRequest(
                "correction", f"one of {', '.join(c.value for c in Correction)}"
            ) from None

    @property
    def depth(self) -> int:
        """The deepest level that may be kept (max_depth, or every level when it is 0)."""
        return self.max_depth or len(self.levels)

    def min_samples(self, level: int) -> int:
        """Minimum allocations of a node at `level` (0 for the global node)."""
        return 0 if level == 0 else self.min_samples_per_level[level - 1]

    @classmethod
    def for_experiment(
        cls,
        experiment: Experiment,
        *,
        alpha: float = DEFAULT_ALPHA,
        prune: bool = True,
        correction: Correction = Correction.TREE,
    ) -> HierarchySettings:
        """Settings from an experiment's segmentation and hierarchy config."""
        return cls(
            levels=experiment.dimensions,
            min_samples_per_level=experiment.min_samples,
            max_depth=experiment.hierarchy.max_depth,
            alpha=alpha,
            prune=prune,
            correction=correction,
        )


@dataclass(frozen=True, slots=True)
class SegmentStats:
    """Counts of one segment: `(allocations, conversions)` per variant, in variant order.

    Counts are cumulative over the path (an allocation in `a:x|b:y` is counted in `""`, `a:x` and
    `a:x|b:y`), as the Rust store keeps them. `value_sum` is the node's total conversion value.
    """

    segment_key: str
    variant_counts: tuple[tuple[int, int], ...]
    value_sum: float = 0.0

    def __post_init__(self) -> None:
        counts = tuple((int(a), int(c)) for a, c in self.variant_counts)
        object.__setattr__(self, "variant_counts", counts)
        if not math.isfinite(self.value_sum):
            raise InvalidRequest("value_sum", f"{self.segment_key!r}: must be finite")
        if not counts:
            raise InvalidRequest("variant_counts", f"{self.segment_key!r}: no variants")
        for v, (allocations, conversions) in enumerate(counts):
            if allocations < 0 or conversions < 0:
                raise InvalidRequest(
                    f"variant_counts[{v}]", f"{self.segment_key!r}: counts must be >= 0"
                )
            if conversions > allocations:
                raise InvalidRequest(
                    f"variant_counts[{v}]",
                    f"{self.segment_key!r}: more conversions ({conversions}) than allocations "
                    f"({allocations})",
                )

    @property
    def allocations(self) -> int:
        return sum(a for a, _ in self.variant_counts)

    @property
    def conversions(self) -> int:
        return sum(c for _, c in self.variant_counts)

    @property
    def conversion_rates(self) -> tuple[float | None, ...]:
        """Conversions / allocations per variant (None for a variant with no allocations)."""
        return tuple(_rate(c, a) for a, c in self.variant_counts)


class NodeReason(StrEnum):
    """Why a node is kept or pruned."""

    ROOT = "root"
    SIGNIFICANT = "significant"
    # Not significant, but its nearest kept ancestor would serve it a variant its own data
    # finds worse (`builder._keep_misserved`).
    MISSERVED = "misserved"
    PRUNING_DISABLED = "pruning_disabled"
    INSUFFICIENT_DATA = "insufficient_data"
    NOT_SIGNIFICANT = "not_significant"
    BEYOND_MAX_DEPTH = "beyond_max_depth"

    @property
    def kept(self) -> bool:
        return self in _KEPT_REASONS

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_KEPT_REASONS = frozenset(
    {NodeReason.ROOT, NodeReason.SIGNIFICANT, NodeReason.MISSERVED, NodeReason.PRUNING_DISABLED}
)
_DESCRIPTIONS = {
    NodeReason.ROOT: "global segment",
    NodeReason.SIGNIFICANT: "significant",
    NodeReason.MISSERVED: "misserved by its ancestor",
    NodeReason.PRUNING_DISABLED: "pruning off",
    NodeReason.INSUFFICIENT_DATA: "insufficient data",
    NodeReason.NOT_SIGNIFICANT: "not significant",
    NodeReason.BEYOND_MAX_DEPTH: "beyond max depth",
}


@dataclass(frozen=True, slots=True)
class DifferenceTest:
    """Outcome of comparing a node with its reference (see `builder.difference_test`).

    The reference is the nearest kept ancestor (`reference_key`) minus the node, and, when
    `reference_remainder`, minus the ancestor's other kept children too. `baseline_variant` is
    the reference's best variant (None when fewer than two variants have data on both sides).
    `z` and `p_values` are per variant: the interaction test of its rate relative to the
    baseline's, node against reference (None for the baseline and where a side has no
    allocations); `p_value` is the smallest Bonferroni-adjusted p-value, min(1, m * p),
    m = `variants_tested` (1.0 when m = 0). `alpha` is the level this node was tested at
    (`HierarchySettings.alpha`, shared among the nodes of the tree by its `correction`).
    """

    reference_key: str
    reference_hash: int
    reference_remainder: bool
    reference_rates: tuple[float | None, ...]
    baseline_variant: int | None
    z: tuple[float | None, ...]
    p_values: tuple[float | None, ...]
    variants_tested: int
    p_value: float
    alpha: float

    @property
    def significant(self) -> bool:
        return self.variants_tested > 0 and self.p_value < self.alpha


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One segment of the tree with the builder's verdict.

    `visits` are the node's allocations. `enough_data` is allocations >= the level's minimum (and
    > 0). `synthesized` marks an ancestor that had no statistics of its own and was summed from its
    children. `test` is None for nodes that were not tested: the root, nodes beyond max_depth,
    and (with pruning on) nodes lacking data.
    """

    key: str
    segment_hash: int
    level: int
    parent_hash: int | None
    kept_parent_hash: int | None
    stats: SegmentStats
    reason: NodeReason
    enough_data: bool
    test: DifferenceTest | None = None
    synthesized: bool = False

    @property
    def kept(self) -> bool:
        return self.reason.kept

    @property
    def is_root(self) -> bool:
        return self.level == 0

    @property
    def label(self) -> str:
        """The node's own `dim:value` (`global` for the root)."""
        return self.key.rsplit("|", 1)[-1] if self.key else GLOBAL_LABEL

    @property
    def dimension(self) -> str | None:
        return self.label.partition(":")[0] if self.key else None

    @property
    def value(self) -> str | None:
        return self.label.partition(":")[2] if self.key else None

    @property
    def visits(self) -> int:
        return self.stats.allocations

    @property
    def conversions(self) -> int:
        return self.stats.conversions

    @property
    def conversion_rate(self) -> float | None:
        """All variants pooled."""
        return _rate(self.conversions, self.visits)

    @property
    def conversion_rates(self) -> tuple[float | None, ...]:
        return self.stats.conversion_rates

    @property
    def best_variant(self) -> int | None:
        """Index of the variant with the highest conversion rate (None without allocations)."""
        return best_variant(self.stats.variant_counts)

    @property
    def best_rate(self) -> float | None:
        v = self.best_variant
        return None if v is None else self.conversion_rates[v]


@dataclass(frozen=True, slots=True)
class LevelSummary:
    level: int
    dimension: str | None
    nodes: int
    kept: int
    pruned: int


@dataclass(frozen=True, slots=True)
class TreeSummary:
    """Counts over a tree. Leaves and depth are those of the kept tree."""

    nodes: int
    kept: int
    pruned: int
    pruned_by_reason: Mapping[str, int]
    kept_leaves: int
    kept_depth: int
    visits: int
    conversions: int
    levels: tuple[LevelSummary, ...]
    best_key: str | None
    worst_key: str | None


Context = Mapping[str, str] | Sequence[str]


class SegmentTree:
    """A built tree: nodes by key and hash, navigation, summary, best and worst nodes.

    Children are ordered by visits (descending), then key. `nodes` is in depth-first order.
    """

    def __init__(
        self,
        settings: HierarchySettings,
        variant_names: Sequence[str],
        nodes: Sequence[TreeNode],
        ignored_keys: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.variant_names = tuple(variant_names)
        self.ignored_keys = tuple(ignored_keys)
        self._by_key = {n.key: n for n in nodes}
        self._by_hash = {n.segment_hash: n for n in nodes}
        if len(self._by_key) != len(nodes):
            raise ValueError("duplicate node keys")
        if "" not in self._by_key:
            raise ValueError("a tree needs the global node (empty key)")
        children: dict[int, list[TreeNode]] = {n.segment_hash: [] for n in nodes}
        kept_children: dict[int, list[TreeNode]] = {n.segment_hash: [] for n in nodes}
        for n in nodes:
            if n.parent_hash is not None:
                children[n.parent_hash].append(n)
            if n.kept and n.kept_parent_hash is not None:
                kept_children[n.kept_parent_hash].append(n)
        self._children = {h: tuple(sorted(c, key=_display_order)) for h, c in children.items()}
        self._kept_children = {
            h: tuple(sorted(c, key=_display_order)) for h, c in kept_children.items()
        }
        self._nodes = tuple(self._depth_first(self.root))
        self._best, self._worst = self._extremes()
        self._summary = self._summarise()

    # lookup

    @property
    def root(self) -> TreeNode:
        return self._by_key[""]

    @property
    def nodes(self) -> tuple[TreeNode, ...]:
        return self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[TreeNode]:
        return iter(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def node(self, key: str) -> TreeNode:
        """The node of a canonical key; KeyError when the tree has none."""
        return self._by_key[key]

    def get(self, key: str) -> TreeNode | None:
        return self._by_key.get(key)

    def by_hash(self, segment_hash: int) -> TreeNode | None:
        return self._by_hash.get(segment_hash)

    # structure

    def parent(self, key: str, *, kept_only: bool = False) -> TreeNode | None:
        """Parent of a node: structural, or with `kept_only` its nearest kept ancestor."""
        node = self.node(key)
        h = node.kept_parent_hash if kept_only else node.parent_hash
        return None if h is None else self._by_hash[h]

    def children(self, key: str, *, kept_only: bool = False) -> tuple[TreeNode, ...]:
        """Direct children; with `kept_only`, the kept nodes whose nearest kept ancestor it is."""
        h = self.node(key).segment_hash
        return (self._kept_children if kept_only else self._children)[h]

    def ancestors(self, key: str, *, kept_only: bool = False) -> tuple[TreeNode, ...]:
        """Ancestors from the root down to the parent (only kept ones with `kept_only`)."""
        out: list[TreeNode] = []
        parent = self.parent(key)
        while parent is not None:
            if parent.kept or not kept_only:
                out.append(parent)
            parent = self.parent(parent.key)
        return tuple(reversed(out))

    def kept_nodes(self) -> tuple[TreeNode, ...]:
        return tuple(n for n in self._nodes if n.kept)

    def kept_hashes(self) -> list[int]:
        """Hashes of the kept nodes (root included), for `Engine.set_tree`."""
        return [n.segment_hash for n in self._nodes if n.kept]

    # navigation by context

    def context_keys(self, values: Context) -> list[str]:
        """Canonical keys of a context's cascade path, global first.

        `values` is either a mapping dimension -> raw value (extra entries are ignored; the path
        stops at the first level without a value) or raw values in level order.
        """
        levels = self.settings.levels
        if isinstance(values, str):
            raise InvalidRequest("values", "expected a mapping or a sequence of values")
        if isinstance(values, Mapping):
            raw: list[str] = []
            for dim in levels:
                if dim not in values:
                    break
                raw.append(values[dim])
        else:
            raw = list(values)
            if len(raw) > len(levels):
                raise InvalidRequest(
                    "values", f"at most {len(levels)} values (one per level), got {len(raw)}"
                )
        return path_keys(list(levels[: len(raw)]), raw)

    def path(self, values: Context) -> tuple[TreeNode, ...]:
        """The nodes of the context's path that exist in the tree, kept or not, root first."""
        return tuple(n for k in self.context_keys(values) if (n := self._by_key.get(k)))

    def cascade_path(self, values: Context) -> tuple[TreeNode, ...]:
        """The path nodes the cascade may use: the root, then kept nodes with enough data."""
        return tuple(n for n in self.path(values) if n.is_root or (n.kept and n.enough_data))

    def find_node(self, values: Context) -> TreeNode:
        """The node serving a context: the deepest kept node with enough data on its path."""
        return self.cascade_path(values)[-1]

    # statistics

    @property
    def best(self) -> TreeNode | None:
        """Kept non-root node with enough data whose best variant converts best."""
        return self._best

    @property
    def worst(self) -> TreeNode | None:
        """Like `best`, the lowest; None unless there are two or more candidates."""
        return self._worst

    @property
    def summary(self) -> TreeSummary:
        return self._summary

    def _depth_first(self, node: TreeNode) -> Iterator[TreeNode]:
        stack = [node]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed(self._children[n.segment_hash]))

    def _extremes(self) -> tuple[TreeNode | None, TreeNode | None]:
        rated = [
            (rate, n)
            for n in self._nodes
            if n.kept and not n.is_root and n.enough_data and (rate := n.best_rate) is not None
        ]
        if not rated:
            return None, None
        # Ties go to the node with more visits, then to the smaller key.
        best = min(rated, key=lambda r: (-r[0], -r[1].visits, r[1].key))[1]
        if len(rated) < 2:
            return best, None
        worst = min(rated, key=lambda r: (r[0], -r[1].visits, r[1].key))[1]
        return best, worst

    def _summarise(self) -> TreeSummary:
        levels = self.settings.levels
        per_level: list[LevelSummary] = []
        for level in range(len(levels) + 1):
            at = [n for n in self._nodes if n.level == level]
            kept = sum(1 for n in at if n.kept)
            per_level.append(
                LevelSummary(
                    level=level,
                    dimension=levels[level - 1] if level else None,
                    nodes=len(at),
                    kept=kept,
                    pruned=len(at) - kept,
                )
            )
        reasons = Counter(n.reason.value for n in self._nodes if not n.kept)
        kept_nodes = [n for n in self._nodes if n.kept]
        leaves = sum(1 for n in kept_nodes if not self._kept_children[n.segment_hash])
        return TreeSummary(
            nodes=len(self._nodes),
            kept=len(kept_nodes),
            pruned=len(self._nodes) - len(kept_nodes),
            pruned_by_reason=dict(sorted(reasons.items())),
            kept_leaves=leaves,
            kept_depth=max(n.level for n in kept_nodes),
            visits=self.root.visits,
            conversions=self.root.conversions,
            levels=tuple(per_level),
            best_key=None if self._best is None else self._best.key,
            worst_key=None if self._worst is None else self._worst.key,
        )


def _display_order(node: TreeNode) -> tuple[int, str]:
    return (-node.visits, node.key)


def best_variant(variant_counts: Iterable[tuple[int, int]]) -> int | None:
    """Index of the variant with the highest conversion rate among (allocations, conversions)
    per variant, the lowest index on ties (None when nothing was allocated)."""
    rated = [(c / a, -v) for v, (a, c) in enumerate(variant_counts) if a > 0]
    return -max(rated)[1] if rated else None


def _rate(conversions: int, allocations: int) -> float | None:
    return conversions / allocations if allocations else None


# cascade usage analytics


@dataclass(frozen=True, slots=True)
class CascadeLevelUsage:
    """Allocations served at one cascade level and their shares of all allocations/conversions."""

    level: int
    name: str
    allocations: int
    conversions: int
    share: float
    conversion_share: float
    conversion_rate: float | None


@dataclass(frozen=True, slots=True)
class CascadeUsage:
    levels: tuple[CascadeLevelUsage, ...]
    allocations: int
    conversions: int
    mean_level: float | None


def cascade_usage(
    counts: Mapping[int, tuple[int, int]], dimensions: Sequence[str] = ()
) -> CascadeUsage:
    """Shares of the allocations (and conversions) served at each cascade level.

    `counts` maps the cascade level used (0 = global) to (allocations, conversions). Every level
    from 0 to the deepest (given or counted) appears in the result, with zeros where nothing was
    served. Shares are 0.0 when nothing was allocated; `mean_level` is the allocation-weighted mean
    level (None when nothing was allocated).
    """
    for level, pair in counts.items():
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise InvalidRequest("counts", f"levels are integers >= 0, got {level!r}")
        if dimensions and level > len(dimensions):
            raise InvalidRequest("counts", f"level {level} deeper than {len(dimensions)} levels")
        allocations, conversions = pair
        if allocations < 0 or conversions < 0 or conversions > allocations:
            raise InvalidRequest(
                f"counts[{level}]", f"need 0 <= conversions <= allocations, got {pair}"
            )
    deepest = max([len(dimensions), *counts.keys()])
    total_a = sum(a for a, _ in counts.values())
    total_c = sum(c for _, c in counts.values())
    levels: list[CascadeLevelUsage] = []
    for level in range(deepest + 1):
        a, c = counts.get(level, (0, 0))
        if level == 0:
            name = GLOBAL_LABEL
        elif level <= len(dimensions):
            name = dimensions[level - 1]
        else:
            name = f"level {level}"
        levels.append(
            CascadeLevelUsage(
                level=level,
                name=name,
                allocations=a,
                conversions=c,
                share=a / total_a if total_a else 0.0,
                conversion_share=c / total_c if total_c else 0.0,
                conversion_rate=_rate(c, a),
            )
        )
    mean = sum(u.level * u.allocations for u in levels) / total_a if total_a else None
    return CascadeUsage(
        levels=tuple(levels), allocations=total_a, conversions=total_c, mean_level=mean
    )
