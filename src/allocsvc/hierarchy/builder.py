"""Building a segment tree from segment statistics, and the test that prunes it (SPEC §7).

Rules, in order, for each node below the global one (levels are processed top-down):

1. Deeper than `max_depth`: pruned, `beyond_max_depth`.
2. Fewer allocations than its level's minimum: pruned, `insufficient_data`.
3. Otherwise the node is compared with a reference and kept (`significant`) only if its variants
   perform differently relative to each other (a different ranking or lift, not merely a different
   base rate); else
4. kept (`misserved`) when its nearest kept ancestor is pulled away from what its other users
   need, or it is a child of a significant node preferring another variant (below); else
   pruned, `not_significant`.

The reference. Let A be the node's nearest kept ancestor (a child of a pruned node is still
tested, against A, and kept if it differs from it: a pruned node's subtree is not pruned with it).
The reference is what A still serves without the node: A minus the node minus every node kept so
far under A. Candidates under one A are selected forward: the most significant is kept first and
taken out of A's remainder, then the others are tested again (small candidates are taken several
per round, see `_select`). Comparing with "A minus the node" alone lets one strong segment make
all its siblings look different: with 4% of the traffic converting 12% on variant B against 4%
elsewhere, every other country differs from "global minus that country" at z of about 3 to 4
although it converts exactly like the rest, and the same happens to the siblings at every level
below.

When that remainder (without the node) has less data than the node's level minimum, the node is
nearly all A still serves, and the reference is A minus the node instead. The Rust cascade serves
a pruned node's users from A's full counts, kept children included, so the last of two children
that differ (mobile / desktop) must not be pruned for lack of anything left to compare with.

The test itself (`difference_test`): does the node rank the variants differently from the
reference? A segment that converts at 3% where the reference converts at 5%, with the same best
variant and the same relative lifts, gains nothing from its own posteriors: it only splits the data
(and a posterior warm-started from the reference's rates would even mislead it). So the test is
on the interaction of segment and variant, on the log scale: let b be the reference's best
variant (highest conversion rate among the variants with allocations on both sides); for every
other such variant v, the log relative rate of v over b in the node, log(r_v / r_b), is compared
with the same in the reference by a Wald z-test (`interaction_ztest`, the "difference between two
estimates" of Altman & Bland, BMJ 2003; 0.5 is added to every count, Haldane's correction). The
node differs when the smallest Bonferroni-adjusted p-value over those m = (variants tested - 1)
comparisons is below alpha: min_v p_v < alpha / m. A node whose base rate alone differs is
pruned; one where another variant wins, or where the lift of a variant clearly differs, is kept.

Many nodes are tested in one build. With `Correction.NODE` each is tested at alpha, so of N nodes
that do not differ about alpha * N are kept by chance, and each costs: a kept node relearns from
its own, smaller sample what its ancestor knew (with 27 nodes at alpha 0.05, the simulator's
homogeneous population lost 1.5 to 1.9 times global Thompson sampling's regret). The default,
`Correction.TREE`, tests each node at alpha / m, m = the nodes the build tests (those with their
level's minimum, up to the kept depth): Bonferroni over the tree, so where no node differs the
chance of keeping any is at most alpha (`_node_alphas`).

Pulled ancestors (rule 4). The cascade serves a pruned node from its nearest kept ancestor's
full counts, kept children included. When those children pull the ancestor's best variant away
from the one its remainder (its users that no kept node serves, pooled) converts best at, the
ancestor serves those users a variant their own data does not favour, and being sure of it, its
Thompson sampling hardly explores the others for them: their data stays too thin for any test.
Then every candidate left under that ancestor is kept, to learn from its own posteriors until a
later build decides (`_keep_misserved`). Likewise a child of a node kept as significant is kept
when its own data prefers another variant than that node's best. Where nothing is kept under an
ancestor its remainder is the ancestor itself, never pulled: a population without structure
gains no node this way. These rules trade a few more kept nodes where structure was found for
not leaving a segment served a variant nobody re-checks (measured in bench/QUALITY.md).

With `prune` off every node up to `max_depth` is kept, and each is tested against its parent
minus itself, for information.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from allocsvc.core import key_hash
from allocsvc.errors import InvalidRequest
from allocsvc.hierarchy.tree import (
    Correction,
    DifferenceTest,
    HierarchySettings,
    NodeReason,
    SegmentStats,
    SegmentTree,
    TreeNode,
    best_variant,
)

# (experiment, segment hash, variant, allocations, conversions, value sum): `Engine.snapshot` rows
CountRow = tuple[int, int, int, int, int, float]
Counts = list[tuple[int, int]]
# Share of an ancestor's remainder that one round of forward selection may take (see `_select`).
BATCH_SHARE = 0.01


def two_proportion_ztest(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of x1/n1 against x2/n2: (z, two-sided p-value).

    p = (x1 + x2) / (n1 + n2), z = (x1/n1 - x2/n2) / sqrt(p (1 - p) (1/n1 + 1/n2)),
    p-value = erfc(|z| / sqrt(2)). Same as statsmodels `proportions_ztest` (pooled variance).
    When both samples convert all or nothing (zero variance) z = 0 and p = 1: nothing to tell apart.
    Needs n1, n2 > 0.
    """
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both samples need at least one observation")
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def bonferroni(p_values: Sequence[float]) -> list[float]:
    """Bonferroni-adjusted p-values: min(1, m * p) for m tests (Dunn 1961)."""
    m = len(p_values)
    return [min(1.0, m * p) for p in p_values]


def interaction_ztest(
    node_v: tuple[int, int],
    node_b: tuple[int, int],
    reference_v: tuple[int, int],
    reference_b: tuple[int, int],
) -> tuple[float, float]:
    """Is variant v's rate relative to variant b the same in a node as in a reference?

    Each argument is (allocations, conversions). With r = (x + 0.5) / (n + 0.5) (Haldane's
    correction, so that no count of 0 breaks the logarithm), d = log(r_node_v / r_node_b) -
    log(r_ref_v / r_ref_b) and Var(d) = sum over the four cells of 1/(x + 0.5) - 1/(n + 0.5)
    (delta method for a log rate). z = d / sqrt(Var(d)), two-sided p-value = erfc(|z| / sqrt(2)):
    a Wald test of the interaction on the log scale (Altman & Bland, "Interaction revisited: the
    difference between two estimates", BMJ 2003). Needs allocations in every cell.
    """
    cells = (node_v, node_b, reference_v, reference_b)
    if any(n <= 0 for n, _ in cells):
        raise ValueError("every cell needs at least one allocation")
    logs = []
    variance = 0.0
    for n, x in cells:
        logs.append(math.log((x + 0.5) / (n + 0.5)))
        variance += 1.0 / (x + 0.5) - 1.0 / (n + 0.5)
    if variance <= 0.0:
        return 0.0, 1.0
    z = ((logs[0] - logs[1]) - (logs[2] - logs[3])) / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def difference_test(
    node: Sequence[tuple[int, int]],
    reference: Sequence[tuple[int, int]],
    *,
    alpha: float,
    reference_key: str = "",
    reference_remainder: bool = False,
) -> DifferenceTest:
    """Does a node rank the variants differently from a reference? (allocations, conversions)
    per variant.

    The baseline b is the reference's best variant among those with allocations on both sides;
    one `interaction_ztest` of every other such variant against b; the node differs when the
    smallest Bonferroni-adjusted p-value is below `alpha` (the family-wise error rate over the
    comparisons is at most alpha). Fewer than two such variants: nothing is tested, p = 1.
    `reference_key` and `reference_remainder` only describe the reference in the result.
    """
    baseline, zs, ps = _per_variant(node, reference)
    tested = [p for p in ps if p is not None]
    return DifferenceTest(
        reference_key=reference_key,
        reference_hash=key_hash(reference_key),
        reference_remainder=reference_remainder,
        reference_rates=tuple(c / a if a else None for a, c in reference),
        baseline_variant=baseline,
        z=tuple(zs),
        p_values=tuple(ps),
        variants_tested=len(tested),
        p_value=min(bonferroni(tested), default=1.0),
        alpha=alpha,
    )


def _per_variant(
    node: Sequence[tuple[int, int]], reference: Sequence[tuple[int, int]]
) -> tuple[int | None, list[float | None], list[float | None]]:
    """The baseline variant, then z and p of every other variant against it (None for the
    baseline and where a side has no allocations)."""
    if len(node) != len(reference):
        raise ValueError("node and reference need the same variants")
    pairs = enumerate(zip(node, reference, strict=True))
    both = [v for v, ((n1, _), (n2, _)) in pairs if n1 and n2]
    zs: list[float | None] = [None] * len(node)
    ps: list[float | None] = [None] * len(node)
    if len(both) < 2:
        return None, zs, ps
    b = max(both, key=lambda v: (reference[v][1] / reference[v][0], -v))
    for v in both:
        if v != b:
            zs[v], ps[v] = interaction_ztest(node[v], node[b], reference[v], reference[b])
    return b, zs, ps


def _screen(node: Counts, reference: Counts) -> tuple[float, float]:
    """`difference_test`'s adjusted p-value and -max |z|, without building the record."""
    _, zs, ps = _per_variant(node, reference)
    tested = [p for p in ps if p is not None]
    p_value = min(1.0, len(tested) * min(tested)) if tested else 1.0
    return p_value, -max((abs(z) for z in zs if z is not None), default=0.0)


def build_tree(
    stats: Iterable[SegmentStats],
    settings: HierarchySettings,
    *,
    variant_names: Sequence[str] | None = None,
) -> SegmentTree:
    """Build and prune the tree of one experiment (rules in the module docstring).

    `stats` holds one entry per node, the global one (empty key) included. Keys whose dimensions
    do not follow `settings.levels` (stale keys from an earlier segmentation) are left out and
    listed in `SegmentTree.ignored_keys`. A missing ancestor (the global node included) is summed
    from its children and marked `synthesized`. Variant names default to v0, v1, ...
    """
    levels = settings.levels
    counts: dict[str, Counts] = {}
    value_sums: dict[str, float] = {}
    ignored: list[str] = []
    seen: set[str] = set()
    n_variants = None if variant_names is None else len(variant_names)
    for s in stats:
        key = s.segment_key
        if key in seen:
            raise InvalidRequest("segment_stats", f"duplicate segment key {key!r}")
        seen.add(key)
        if not _follows_levels(key, levels):
            ignored.append(key)
            continue
        if n_variants is None:
            n_variants = len(s.variant_counts)
        if len(s.variant_counts) != n_variants:
            raise InvalidRequest(
                "segment_stats",
                f"{key!r} has {len(s.variant_counts)} variants, expected {n_variants}",
            )
        counts[key] = list(s.variant_counts)
        value_sums[key] = s.value_sum
    if n_variants is None:
        raise InvalidRequest("segment_stats", "no statistics and no variant names")
    if n_variants < 1:
        raise InvalidRequest("variant_names", "needs at least one variant")
    names = tuple(variant_names) if variant_names is not None else _default_names(n_variants)

    synthesized = _add_missing_ancestors(counts, value_sums, n_variants)
    by_level: list[list[str]] = [[] for _ in range(len(levels) + 1)]
    for key in counts:
        by_level[_level(key)].append(key)

    alphas = _node_alphas(counts, settings)
    reasons: dict[str, NodeReason] = {"": NodeReason.ROOT}
    tests: dict[str, DifferenceTest] = {}
    kept_parent: dict[str, str | None] = {"": None}
    # What each kept node still serves: its counts minus its kept children's.
    remainder: dict[str, Counts] = {"": list(counts[""])}

    for level in range(1, len(levels) + 1):
        minimum = settings.min_samples(level)
        groups: dict[str, list[str]] = {}
        for key in sorted(by_level[level]):
            ancestor = _parent(key)
            while not reasons[ancestor].kept:
                ancestor = _parent(ancestor)
            kept_parent[key] = ancestor
            if level > settings.depth:
                reasons[key] = NodeReason.BEYOND_MAX_DEPTH
            elif not settings.prune:
                reasons[key] = NodeReason.PRUNING_DISABLED
                tests[key] = difference_test(
                    counts[key],
                    _minus(counts[ancestor], counts[key]),
                    alpha=alphas[key],
                    reference_key=ancestor,
                )
            elif not _enough(counts[key], minimum):
                reasons[key] = NodeReason.INSUFFICIENT_DATA
            else:
                groups.setdefault(ancestor, []).append(key)
        for ancestor, candidates in groups.items():
            _select(ancestor, candidates, minimum, counts, remainder, reasons, tests, alphas)

    nodes = [
        TreeNode(
            key=key,
            segment_hash=key_hash(key),
            level=_level(key),
            parent_hash=None if not key else key_hash(_parent(key)),
            kept_parent_hash=None if (kp := kept_parent[key]) is None else key_hash(kp),
            stats=SegmentStats(key, tuple(counts[key]), value_sums.get(key, 0.0)),
            reason=reasons[key],
            enough_data=_enough(counts[key], settings.min_samples(_level(key))),
            test=tests.get(key),
            synthesized=key in synthesized,
        )
        for key in counts
    ]
    return SegmentTree(settings, names, nodes, ignored)


def _select(
    ancestor: str,
    candidates: list[str],
    minimum: int,
    counts: dict[str, Counts],
    remainder: dict[str, Counts],
    reasons: dict[str, NodeReason],
    tests: dict[str, DifferenceTest],
    alphas: Mapping[str, float],
) -> None:
    """Forward selection of the candidates that differ from what `ancestor` still serves.

    Each round keeps the most significant candidate, and after it, in order of significance, the
    next significant ones while together they take less than `BATCH_SHARE` of the ancestor's
    remainder: so small a change of the reference moves no test noticeably, and an ancestor with
    thousands of candidates needs a few rounds instead of one per kept node.
    """

    def record(key: str) -> None:
        reference, is_remainder = references[key]
        tests[key] = difference_test(
            counts[key],
            reference,
            alpha=alphas[key],
            reference_key=ancestor,
            reference_remainder=is_remainder,
        )

    remaining = list(candidates)
    while remaining:
        references = {
            key: _reference(remainder[ancestor], counts[ancestor], counts[key], minimum)
            for key in remaining
        }
        scores = {key: _screen(counts[key], references[key][0]) for key in remaining}
        order = sorted(remaining, key=lambda k: (*scores[k], k))
        budget = BATCH_SHARE * _allocations(remainder[ancestor])
        taken = 0
        kept = 0
        for key in order:
            size = _allocations(counts[key])
            if scores[key][0] >= alphas[key] or (kept and taken + size > budget):
                break
            reasons[key] = NodeReason.SIGNIFICANT
            record(key)
            remainder[ancestor] = _minus(remainder[ancestor], counts[key])
            remainder[key] = list(counts[key])
            taken += size
            kept += 1
        if not kept:
            for key in remaining:
                record(key)
            _keep_misserved(ancestor, remaining, counts, remainder, reasons)
            return
        remaining = order[kept:]


def _keep_misserved(
    ancestor: str,
    candidates: list[str],
    counts: dict[str, Counts],
    remainder: dict[str, Counts],
    reasons: dict[str, NodeReason],
) -> None:
    """Keep the candidates left (not significant) when `ancestor` would serve them badly;
    else prune them.

    A pruned node's users are served from the ancestor's full counts, kept children
    included, not from the remainder the node was compared with. Kept children can pull the
    ancestor's best variant away from what its other users need; its sampling, sure of its
    choice, then hardly explores the other variants for them, and their own data stays too
    thin to pass any test (or to be trusted one node at a time). So when the ancestor is
    pulled (its remainder, the users no kept node serves, pooled, converts better at another
    variant than the ancestor's best), every candidate left is kept (`MISSERVED`) and learns
    from its own posteriors until a later tree decides. The same holds one node at a time
    below a node kept as significant (structure was found there): a child whose own data
    prefers another variant than its parent's best is kept. Where nothing is kept (a
    population without structure) the remainder is the ancestor, never pulled, and there is
    no significant parent: nothing more is kept.
    """
    served = best_variant(counts[ancestor])
    if served is None:
        for key in candidates:
            reasons[key] = NodeReason.NOT_SIGNIFICANT
        return
    pulled = _prefers_another(remainder[ancestor], served)
    found = reasons[ancestor] is NodeReason.SIGNIFICANT
    for key in candidates:
        child = found and _parent(key) == ancestor
        if not (pulled or (child and _prefers_another(counts[key], served))):
            reasons[key] = NodeReason.NOT_SIGNIFICANT
            continue
        reasons[key] = NodeReason.MISSERVED
        remainder[ancestor] = _minus(remainder[ancestor], counts[key])
        remainder[key] = list(counts[key])


def _prefers_another(counts: Counts, served: int) -> bool:
    """Whether another variant than `served` converts strictly better in `counts` (False
    when `served` has no allocations there: nothing to compare)."""
    best = best_variant(counts)
    if best is None or best == served or counts[served][0] == 0:
        return False
    (n_best, x_best), (n_served, x_served) = counts[best], counts[served]
    return x_best * n_served > x_served * n_best


def _node_alphas(counts: dict[str, Counts], settings: HierarchySettings) -> dict[str, float]:
    """The significance level of each node below the global one (`Correction`).

    With `tree`: alpha / m, m = the number of nodes this build tests (those up to the kept
    depth with their level's minimum of allocations, known before any test). Bonferroni over
    the tree (Dunn 1961): where no node differs, the chance of keeping any is at most alpha.
    """
    keys = [k for k in counts if k]
    if settings.correction is Correction.NODE:
        return dict.fromkeys(keys, settings.alpha)
    tested = sum(
        1
        for k in keys
        if _level(k) <= settings.depth and _enough(counts[k], settings.min_samples(_level(k)))
    )
    return dict.fromkeys(keys, settings.alpha / max(tested, 1))


def _reference(served: Counts, ancestor: Counts, node: Counts, minimum: int) -> tuple[Counts, bool]:
    """What a node is compared with: the ancestor's remainder (`served`) without the node, or
    the whole ancestor without it when that remainder has too little data (module docstring).
    The flag says which."""
    rest = _minus(served, node)
    if _allocations(rest) >= max(minimum, 1):
        return rest, True
    return _minus(ancestor, node), False


def stats_from_counts(
    rows: Iterable[CountRow], keys: Iterable[str], *, variants: int
) -> list[SegmentStats]:
    """`SegmentStats` of the given keys from `Engine.snapshot(experiment)` rows.

    The Rust store knows hashes only; `keys` are the canonical keys to report (e.g. the
    experiment's known segments), matched by hash. Rows of other hashes or of variants
    >= `variants` are skipped; a key without rows gets zero counts.
    """
    if variants < 1:
        raise InvalidRequest("variants", "needs at least one variant")
    by_hash = {key_hash(k): k for k in keys}
    table = {k: [(0, 0)] * variants for k in by_hash.values()}
    values = dict.fromkeys(by_hash.values(), 0.0)
    for _, segment_hash, variant, allocations, conversions, value_sum in rows:
        key = by_hash.get(segment_hash)
        if key is None or not 0 <= variant < variants:
            continue
        a, c = table[key][variant]
        table[key][variant] = (a + allocations, c + conversions)
        values[key] += value_sum
    return [SegmentStats(k, tuple(v), values[k]) for k, v in table.items()]


def _follows_levels(key: str, levels: Sequence[str]) -> bool:
    if not key:
        return True
    parts = key.split("|")
    if len(parts) > len(levels):
        return False
    return all(
        sep == ":" and dim == expected
        for (dim, sep, _), expected in zip((p.partition(":") for p in parts), levels, strict=False)
    )


def _add_missing_ancestors(
    counts: dict[str, Counts], value_sums: dict[str, float], n_variants: int
) -> set[str]:
    """Sum every missing ancestor from its children, deepest first; return the added keys."""
    added: set[str] = set()
    deepest = max(map(_level, counts), default=0)
    for level in range(deepest, 0, -1):
        for key in [k for k in counts if _level(k) == level]:
            parent = _parent(key)
            if parent in counts and parent not in added:
                continue
            if parent not in counts:
                counts[parent] = [(0, 0)] * n_variants
                value_sums[parent] = 0.0
                added.add(parent)
            counts[parent] = _plus(counts[parent], counts[key])
            value_sums[parent] += value_sums[key]
    if "" not in counts:
        counts[""] = [(0, 0)] * n_variants
        value_sums[""] = 0.0
        added.add("")
    return added


def _level(key: str) -> int:
    return key.count("|") + 1 if key else 0


def _parent(key: str) -> str:
    return key.rpartition("|")[0]


def _allocations(counts: Counts) -> int:
    return sum(a for a, _ in counts)


def _enough(counts: Counts, minimum: int) -> bool:
    allocations = _allocations(counts)
    return allocations > 0 and allocations >= minimum


def _plus(a: Counts, b: Counts) -> Counts:
    return [(a1 + b1, c1 + c2) for (a1, c1), (b1, c2) in zip(a, b, strict=True)]


def _minus(a: Counts, b: Counts) -> Counts:
    """a - b per variant, clamped so that 0 <= conversions <= allocations (racy snapshots)."""
    out: Counts = []
    for (a1, c1), (b1, c2) in zip(a, b, strict=True):
        allocations = max(0, a1 - b1)
        out.append((allocations, min(allocations, max(0, c1 - c2))))
    return out


def _default_names(n: int) -> tuple[str, ...]:
    return tuple(f"v{i}" for i in range(n))
