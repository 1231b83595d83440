"""Segment analyzer: how each segment converts on each variant compared with the whole experiment.

Input is the per (segment key, variant) counts the store keeps, the global segment being key "".
Every statement comes from stats.py; the output is plain frozen data and deterministic text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from allocsvc.analytics.stats import (
    bonferroni,
    cohens_h,
    holm,
    median,
    modified_z_scores,
    robust_z_score,
    two_proportion_ztest,
)
from allocsvc.errors import InvalidRequest

GLOBAL_SEGMENT = ""
LEVEL_SEPARATOR = "|"
VALUE_SEPARATOR = ":"


@dataclass(frozen=True, slots=True)
class SegmentVariantCounts:
    """Allocations and conversions of one variant in one segment ("" = global)."""

    segment_key: str
    variant: str
    allocations: int
    conversions: int

    def __post_init__(self) -> None:
        if self.allocations < 0 or not 0 <= self.conversions <= self.allocations:
            raise InvalidRequest(
                "conversions",
                f"must lie in [0, allocations] for ({self.segment_key!r}, {self.variant!r})",
            )

    @property
    def rate(self) -> float | None:
        return self.conversions / self.allocations if self.allocations else None


def parent_key(segment_key: str) -> str:
    """The key one level up: everything before the last "|" ("" for a first-level key)."""
    cut = segment_key.rfind(LEVEL_SEPARATOR)
    return segment_key[:cut] if cut >= 0 else GLOBAL_SEGMENT


def key_levels(segment_key: str) -> tuple[tuple[str, str], ...]:
    """("dim", "value") pairs of a canonical key; values are percent-escaped, so splits are safe."""
    if segment_key == GLOBAL_SEGMENT:
        return ()
    levels = []
    for part in segment_key.split(LEVEL_SEPARATOR):
        dimension, _, value = part.partition(VALUE_SEPARATOR)
        levels.append((dimension, value))
    return tuple(levels)


def describe_segment(segment_key: str) -> str:
    return segment_key or "global"


class Correction(StrEnum):
    BONFERRONI = "bonferroni"
    HOLM = "holm"


@dataclass(frozen=True, slots=True)
class SegmentAnalysisSettings:
    """Knobs of the analyzer; they validate themselves.

    A segment is tested on a variant only with `min_allocations` there and in the rest of traffic.
    High / under performers must be significant after `correction` at `alpha` and at least
    `min_abs_lift` away from global (relative). Anomalies: |robust z| > `anomaly_threshold`, among
    at least `min_siblings` siblings, or against at least `min_history_days` daily rates.
    """

    min_allocations: int = 100
    alpha: float = 0.05
    correction: Correction = Correction.HOLM
    min_abs_lift: float = 0.1
    anomaly_threshold: float = 3.5
    min_siblings: int = 3
    min_history_days: int = 7

    def __post_init__(self) -> None:
        if self.min_allocations < 1:
            raise InvalidRequest("min_allocations", "must be at least 1")
        if not 0.0 < self.alpha < 1.0:
            raise InvalidRequest("alpha", "must lie strictly between 0 and 1")
        if self.min_abs_lift < 0.0:
            raise InvalidRequest("min_abs_lift", "must not be negative")
        if not self.anomaly_threshold > 0.0:
            raise InvalidRequest("anomaly_threshold", "must be positive")
        if self.min_siblings < 3:
            raise InvalidRequest("min_siblings", "must be at least 3 for a median and MAD")
        if self.min_history_days < 3:
            raise InvalidRequest("min_history_days", "must be at least 3 for a median and MAD")


@dataclass(frozen=True, slots=True)
class SegmentVariantResult:
    """One segment on one variant. Statistics are None, with a `reason`, when it was not tested.

    lift = (p_seg − p_global)/p_global. The test compares the segment with the rest of the variant's
    traffic (global minus segment): z, p_value (two-sided, pooled SE), cohens_h = h(p_seg, p_rest);
    p_bonferroni / p_holm are adjusted over every (segment, variant) pair tested, and `significant`
    uses the configured correction.
    """

    segment_key: str
    variant: str
    allocations: int
    conversions: int
    conversion_rate: float | None
    global_rate: float | None
    lift: float | None
    z: float | None
    p_value: float | None
    cohens_h: float | None
    p_bonferroni: float | None
    p_holm: float | None
    significant: bool
    reason: str | None


class AnomalyKind(StrEnum):
    SIBLINGS = "siblings"
    HISTORY = "history"


@dataclass(frozen=True, slots=True)
class SegmentAnomaly:
    """A rate whose robust z-score against `reference` (a median) exceeds the threshold."""

    segment_key: str
    variant: str
    kind: AnomalyKind
    rate: float
    reference: float
    score: float


@dataclass(frozen=True, slots=True)
class SegmentAnalysis:
    """Everything the analyzer found; `reason` is set when nothing could be tested."""

    results: tuple[SegmentVariantResult, ...]
    global_rates: tuple[tuple[str, float], ...]
    anomalies: tuple[SegmentAnomaly, ...]
    high_performers: tuple[SegmentVariantResult, ...]
    underperformers: tuple[SegmentVariantResult, ...]
    recommendations: tuple[str, ...]
    reason: str | None


def _untested(
    row: SegmentVariantCounts, global_rate: float | None, lift: float | None, reason: str
) -> SegmentVariantResult:
    return SegmentVariantResult(
        segment_key=row.segment_key,
        variant=row.variant,
        allocations=row.allocations,
        conversions=row.conversions,
        conversion_rate=row.rate,
        global_rate=global_rate,
        lift=lift,
        z=None,
        p_value=None,
        cohens_h=None,
        p_bonferroni=None,
        p_holm=None,
        significant=False,
        reason=reason,
    )


def _lift(rate: float | None, global_rate: float | None) -> float | None:
    if rate is None or not global_rate:
        return None
    return (rate - global_rate) / global_rate


def format_p(p_value: float) -> str:
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"


def analyze_segments(
    counts: Sequence[SegmentVariantCounts],
    settings: SegmentAnalysisSettings | None = None,
    history: Mapping[tuple[str, str], Sequence[float]] | None = None,
) -> SegmentAnalysis:
    """Lift, two-proportion z-test, Cohen's h, corrected significance and anomalies per segment.

    For segment s and variant v with global counts (C, N): p_seg = c/n, p_global = C/N, lift =
    (p_seg − p_global)/p_global; the z-test compares the segment (c, n) with the rest of the traffic
    (C − c, N − n) with the pooled standard error (stats.two_proportion_ztest) — the segment is
    part of global, so testing against global itself would compare a sample with a superset of it.
    Cohen's h is h(p_seg, p_rest). The family of the Bonferroni / Holm corrections is every
    (segment, variant) pair tested.

    Anomalies: among siblings (same parent key and variant, at least `min_siblings` tested), a
    modified z-score |M| > 3.5 of the rate (Iglewicz & Hoaglin); against the segment's own recent
    daily rates `history[(segment_key, variant)]` (oldest first), |robust z| > 3.5 with the
    history's median and MAD.
    """
    settings = settings or SegmentAnalysisSettings()
    history = history or {}
    seen: set[tuple[str, str]] = set()
    for row in counts:
        ident = (row.segment_key, row.variant)
        if ident in seen:
            raise InvalidRequest("counts", f"duplicate counts for segment/variant {ident!r}")
        seen.add(ident)
    global_rows = {r.variant: r for r in counts if r.segment_key == GLOBAL_SEGMENT}
    global_rates = tuple(
        sorted((v, r.conversions / r.allocations) for v, r in global_rows.items() if r.allocations)
    )
    segment_rows = sorted(
        (r for r in counts if r.segment_key != GLOBAL_SEGMENT),
        key=lambda r: (r.segment_key, r.variant),
    )

    minimum = settings.min_allocations
    slots: list[SegmentVariantResult | None] = []
    pending: list[tuple[int, SegmentVariantCounts, SegmentVariantCounts]] = []
    for row in segment_rows:
        glob = global_rows.get(row.variant)
        global_rate = glob.rate if glob is not None else None
        lift = _lift(row.rate, global_rate)
        reason: str | None = None
        if glob is None or not glob.allocations:
            reason = f"no global counts for variant {row.variant}"
        elif row.allocations > glob.allocations or row.conversions > glob.conversions:
            reason = "inconsistent counts: the segment exceeds the global segment"
        elif row.allocations < minimum:
            reason = f"not enough data: {row.allocations} allocations, fewer than {minimum}"
        elif glob.allocations - row.allocations < minimum:
            reason = (
                f"not enough data: the rest of the traffic has "
                f"{glob.allocations - row.allocations} allocations, fewer than {minimum}"
            )
        if reason is not None:
            slots.append(_untested(row, global_rate, lift, reason))
        else:
            assert glob is not None
            pending.append((len(slots), row, glob))
            slots.append(None)

    raw_tests = []
    for _, row, glob in pending:
        rest_n = glob.allocations - row.allocations
        rest_c = glob.conversions - row.conversions
        test = two_proportion_ztest(row.conversions, row.allocations, rest_c, rest_n)
        h = cohens_h(row.conversions / row.allocations, rest_c / rest_n)
        raw_tests.append((test, h))
    p_values = [t.p_value for t, _ in raw_tests]
    p_bonf = bonferroni(p_values)
    p_holm = holm(p_values)
    for k, (slot, row, glob) in enumerate(pending):
        test, h = raw_tests[k]
        adjusted = p_holm[k] if settings.correction is Correction.HOLM else p_bonf[k]
        global_rate = glob.conversions / glob.allocations
        slots[slot] = SegmentVariantResult(
            segment_key=row.segment_key,
            variant=row.variant,
            allocations=row.allocations,
            conversions=row.conversions,
            conversion_rate=row.conversions / row.allocations,
            global_rate=global_rate,
            lift=_lift(row.rate, global_rate),
            z=test.z,
            p_value=test.p_value,
            cohens_h=h,
            p_bonferroni=p_bonf[k],
            p_holm=p_holm[k],
            significant=adjusted <= settings.alpha,
            reason=None,
        )
    results = tuple(s for s in slots if s is not None)
    tested = [r for r in results if r.reason is None]

    anomalies = _sibling_anomalies(tested, settings) + _history_anomalies(tested, history, settings)
    high = tuple(
        sorted(
            (
                r
                for r in tested
                if r.significant and r.lift is not None and r.lift >= settings.min_abs_lift
            ),
            key=lambda r: (-(r.lift or 0.0), r.segment_key, r.variant),
        )
    )
    low = tuple(
        sorted(
            (
                r
                for r in tested
                if r.significant and r.lift is not None and r.lift <= -settings.min_abs_lift
            ),
            key=lambda r: (r.lift or 0.0, r.segment_key, r.variant),
        )
    )
    recommendations = _recommendations(high, low, anomalies, settings)

    overall: str | None = None
    if not global_rows:
        overall = "not enough data: no global counts"
    elif not segment_rows:
        overall = "not enough data: no segment counts"
    elif not tested:
        overall = f"not enough data: no segment has {minimum} allocations on a variant"
    return SegmentAnalysis(
        results=results,
        global_rates=global_rates,
        anomalies=anomalies,
        high_performers=high,
        underperformers=low,
        recommendations=recommendations,
        reason=overall,
    )


def _sibling_anomalies(
    tested: Sequence[SegmentVariantResult], settings: SegmentAnalysisSettings
) -> tuple[SegmentAnomaly, ...]:
    groups: dict[tuple[str, str], list[SegmentVariantResult]] = {}
    for r in tested:
        groups.setdefault((parent_key(r.segment_key), r.variant), []).append(r)
    found = []
    for (_, variant), members in sorted(groups.items()):
        if len(members) < settings.min_siblings:
            continue
        rates = [m.conversion_rate or 0.0 for m in members]
        center = median(rates)
        for member, rate, score in zip(members, rates, modified_z_scores(rates), strict=True):
            if abs(score) > settings.anomaly_threshold:
                found.append(
                    SegmentAnomaly(
                        segment_key=member.segment_key,
                        variant=variant,
                        kind=AnomalyKind.SIBLINGS,
                        rate=rate,
                        reference=center,
                        score=score,
                    )
                )
    return tuple(found)


def _history_anomalies(
    tested: Sequence[SegmentVariantResult],
    history: Mapping[tuple[str, str], Sequence[float]],
    settings: SegmentAnalysisSettings,
) -> tuple[SegmentAnomaly, ...]:
    found = []
    for r in tested:
        past = history.get((r.segment_key, r.variant))
        if past is None or len(past) < settings.min_history_days or r.conversion_rate is None:
            continue
        score = robust_z_score(r.conversion_rate, past)
        if abs(score) > settings.anomaly_threshold:
            found.append(
                SegmentAnomaly(
                    segment_key=r.segment_key,
                    variant=r.variant,
                    kind=AnomalyKind.HISTORY,
                    rate=r.conversion_rate,
                    reference=median(past),
                    score=score,
                )
            )
    return tuple(found)


def _recommendations(
    high: Sequence[SegmentVariantResult],
    low: Sequence[SegmentVariantResult],
    anomalies: Sequence[SegmentAnomaly],
    settings: SegmentAnalysisSettings,
) -> tuple[str, ...]:
    lines = []
    for r in high:
        lines.append(
            f"{r.segment_key} converts {r.lift or 0.0:.0%} above global on variant {r.variant} "
            f"({r.conversion_rate or 0.0:.2%} vs {r.global_rate or 0.0:.2%}, adjusted "
            f"{format_p(_adjusted(r, settings))}): consider a segment-specific default."
        )
    for r in low:
        lines.append(
            f"{r.segment_key} converts {-(r.lift or 0.0):.0%} below global on variant {r.variant} "
            f"({r.conversion_rate or 0.0:.2%} vs {r.global_rate or 0.0:.2%}, adjusted "
            f"{format_p(_adjusted(r, settings))}): review what this segment is shown on "
            f"{r.variant}."
        )
    for a in anomalies:
        if a.kind is AnomalyKind.SIBLINGS:
            lines.append(
                f"{a.segment_key} on variant {a.variant} converts at {a.rate:.2%}, far from its "
                f"siblings under {describe_segment(parent_key(a.segment_key))} (median "
                f"{a.reference:.2%}, robust z = {a.score:.1f}): check tracking and traffic quality."
            )
        else:
            lines.append(
                f"{a.segment_key} on variant {a.variant} converts at {a.rate:.2%}, far from its "
                f"recent daily rates (median {a.reference:.2%}, robust z = {a.score:.1f}): check "
                f"for a tracking change or a shift in traffic."
            )
    return tuple(lines)


def _adjusted(result: SegmentVariantResult, settings: SegmentAnalysisSettings) -> float:
    if settings.correction is Correction.HOLM:
        return result.p_holm if result.p_holm is not None else 1.0
    return result.p_bonferroni if result.p_bonferroni is not None else 1.0


@dataclass(frozen=True, slots=True)
class DimensionValueCounts:
    """Counts of one value of one dimension on one variant, over every parent path."""

    dimension: str
    value: str
    variant: str
    allocations: int
    conversions: int


def dimension_marginals(counts: Sequence[SegmentVariantCounts]) -> tuple[DimensionValueCounts, ...]:
    """Marginal counts per (dimension, value, variant), from segment keys of any depth.

    An allocation is counted once at every level of its path, and a dimension sits at a fixed level
    (keys follow the experiment's dimension order), so the keys whose last level is `dim:value`
    partition that value's traffic: summing them gives its marginal counts.
    """
    totals: dict[tuple[str, str, str], list[int]] = {}
    for row in counts:
        levels = key_levels(row.segment_key)
        if not levels:
            continue
        dimension, value = levels[-1]
        slot = totals.setdefault((dimension, value, row.variant), [0, 0])
        slot[0] += row.allocations
        slot[1] += row.conversions
    return tuple(
        DimensionValueCounts(dimension=d, value=v, variant=var, allocations=n, conversions=c)
        for (d, v, var), (n, c) in sorted(totals.items())
    )
