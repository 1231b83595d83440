"""Segmentation eligibility (SPEC §6): enough traffic? which dimensions? what is it worth?

Pure functions over daily traffic stats and segment counts; the periodic task stores the returned
`Recommendation` and acts on `decide_activation`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum

from allocsvc.analytics.segments import (
    GLOBAL_SEGMENT,
    SegmentVariantCounts,
    dimension_marginals,
)
from allocsvc.analytics.stats import chi2_sf, chisquare_homogeneity
from allocsvc.errors import InvalidRequest

DEFAULT_THRESHOLD = 1000.0
DEFAULT_WINDOW_DAYS = 7


@dataclass(frozen=True, slots=True)
class DailyTraffic:
    """One row of the experiment's daily traffic stats."""

    day: date
    visitors: int
    allocations: int
    conversions: int

    def __post_init__(self) -> None:
        if min(self.visitors, self.allocations, self.conversions) < 0:
            raise InvalidRequest("traffic", f"negative counts on {self.day.isoformat()}")


@dataclass(frozen=True, slots=True)
class TrafficWindow:
    """Average visitors per day over the last `window_days` days (missing days count as 0)."""

    average_visitors: float
    window_days: int
    days_of_history: int
    first_day: date | None
    last_day: date | None

    @property
    def complete(self) -> bool:
        return self.days_of_history >= self.window_days


def traffic_window(
    daily: Sequence[DailyTraffic], window_days: int, today: date | None = None
) -> TrafficWindow:
    """Mean daily visitors over the `window_days` days ending at the last complete day.

    With `today`, that day and later ones are left out (today is still filling up) and the window
    ends yesterday, so an experiment whose traffic stopped averages its zero days too; without it
    the window ends at the latest recorded day.
    """
    if window_days < 1:
        raise InvalidRequest("window_days", "must be at least 1")
    rows = [d for d in daily if today is None or d.day < today]
    days = [d.day for d in rows]
    if len(set(days)) != len(days):
        raise InvalidRequest("traffic", "more than one row for a day")
    if not rows:
        return TrafficWindow(0.0, window_days, 0, None, None)
    first = min(days)
    last = today - timedelta(days=1) if today is not None else max(days)
    start = last - timedelta(days=window_days - 1)
    visitors = sum(d.visitors for d in rows if start <= d.day <= last)
    return TrafficWindow(
        average_visitors=visitors / window_days,
        window_days=window_days,
        days_of_history=(last - first).days + 1,
        first_day=first,
        last_day=last,
    )


# Auto-activation


@dataclass(frozen=True, slots=True)
class ActivationConfig:
    """The experiment's auto-activation settings (segmentation.auto_activation*); validated."""

    auto_activation: bool
    threshold: float = DEFAULT_THRESHOLD
    window_days: int = DEFAULT_WINDOW_DAYS
    already_active: bool = False

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise InvalidRequest("auto_activation_threshold", "must be a positive number")
        if self.window_days < 1:
            raise InvalidRequest("window_days", "must be at least 1")


@dataclass(frozen=True, slots=True)
class ActivationDecision:
    activate: bool
    reason: str
    average_daily_visitors: float | None


def decide_activation(
    config: ActivationConfig, stats: Sequence[DailyTraffic], today: date | None = None
) -> ActivationDecision:
    """Switch segmentation on when auto-activation is on, segmentation is still off, and the mean
    visitors per day over a full window (`traffic_window`) reach the threshold."""
    if not config.auto_activation:
        return ActivationDecision(False, "auto-activation is off", None)
    if config.already_active:
        return ActivationDecision(False, "segmentation is already on", None)
    window = traffic_window(stats, config.window_days, today)
    average = window.average_visitors
    if not window.complete:
        return ActivationDecision(
            False,
            f"not enough data: {window.days_of_history} of {config.window_days} days of traffic",
            average,
        )
    if average < config.threshold:
        return ActivationDecision(
            False,
            f"{average:.0f} visitors/day over the last {config.window_days} days, "
            f"below the threshold of {config.threshold:.0f}",
            average,
        )
    return ActivationDecision(
        True,
        f"{average:.0f} visitors/day over the last {config.window_days} days reach the "
        f"threshold of {config.threshold:.0f}",
        average,
    )


# Recommendations


@dataclass(frozen=True, slots=True)
class EligibilityConfig:
    """Eligibility check settings, self-validating.

    Eligible at `min_visitors_per_day` averaged over `window_days`. A dimension is recommended when
    its values' conversion rates differ at p < `alpha` / (dimensions tested) (Bonferroni), counting
    only values with `min_allocations_per_value` allocations on a variant; at most
    `max_dimensions` are named.
    """

    min_visitors_per_day: float = DEFAULT_THRESHOLD
    window_days: int = DEFAULT_WINDOW_DAYS
    alpha: float = 0.05
    min_allocations_per_value: int = 100
    max_dimensions: int = 3

    def __post_init__(self) -> None:
        if not (self.min_visitors_per_day > 0 and math.isfinite(self.min_visitors_per_day)):
            raise InvalidRequest("min_visitors_per_day", "must be a positive number")
        if self.window_days < 1:
            raise InvalidRequest("window_days", "must be at least 1")
        if not 0.0 < self.alpha < 1.0:
            raise InvalidRequest("alpha", "must lie strictly between 0 and 1")
        if self.min_allocations_per_value < 1:
            raise InvalidRequest("min_allocations_per_value", "must be at least 1")
        if self.max_dimensions < 1:
            raise InvalidRequest("max_dimensions", "must be at least 1")


class RecommendationKind(StrEnum):
    ENABLE_SEGMENTATION = "enable_segmentation"
    NOT_ELIGIBLE = "not_eligible"  # too little traffic
    NO_SIGNAL = "no_signal"  # enough traffic, but no dimension separates the rates
    INSUFFICIENT_DATA = "insufficient_data"  # too few days of traffic stats


@dataclass(frozen=True, slots=True)
class DimensionScore:
    """Homogeneity test of one dimension's conversion rates, stratified by variant.

    `statistic` and `p_value` are those of the stratified chi-square, `effect` its Cramér's V, and
    `expected_benefit` the extra conversions per day (see `score_dimensions`). `p_value` is None,
    with a `reason`, when no variant has two values with enough data.
    """

    dimension: str
    values: int
    statistic: float | None
    p_value: float | None
    effect: float
    expected_benefit: float
    significant: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What the eligibility check advises, with why; `created_at` is injected by the caller."""

    kind: RecommendationKind
    dimensions: tuple[str, ...]
    expected_benefit: float
    reason: str
    created_at: datetime
    average_daily_visitors: float
    scores: tuple[DimensionScore, ...]

    def payload(self) -> dict[str, object]:
        """JSON-ready content for the `recommendations.payload` column."""
        return {
            "dimensions": list(self.dimensions),
            "expected_benefit": self.expected_benefit,
            "reason": self.reason,
            "average_daily_visitors": self.average_daily_visitors,
            "scores": [
                {
                    "dimension": s.dimension,
                    "values": s.values,
                    "statistic": s.statistic,
                    "p_value": s.p_value,
                    "effect": s.effect,
                    "expected_benefit": s.expected_benefit,
                    "significant": s.significant,
                    "reason": s.reason,
                }
                for s in self.scores
            ],
        }


def _global_best_variant(counts: Sequence[SegmentVariantCounts]) -> str | None:
    rows = [r for r in counts if r.segment_key == GLOBAL_SEGMENT and r.allocations > 0]
    if not rows:
        return None
    return max(rows, key=lambda r: (r.conversions / r.allocations, r.variant)).variant


def score_dimensions(
    counts: Sequence[SegmentVariantCounts],
    average_daily_visitors: float,
    config: EligibilityConfig,
) -> tuple[DimensionScore, ...]:
    """Score every dimension found in the segment keys, most different first.

    Test: within each variant, Pearson's chi-square of homogeneity of the values' conversion rates
    (stats.chisquare_homogeneity over the values with `min_allocations_per_value` allocations on
    that variant); the variants are independent samples, so the statistics and degrees of freedom
    add up to one stratified test (p = Q(Σdf/2, ΣX²/2)). Unlike pooling the variants, this also
    sees a dimension that changes which variant wins while leaving the average rate alone.
    Significant at p < α/m over the m dimensions tested; effect = √(ΣX²/ΣN), Cramér's V of the
    stacked tables.

    Benefit (extra conversions per day if each value got its own best variant instead of the
    global best g*): visitors/day × Σ_values share_v·(max_k r_v,k − r_v,g*), share_v = the value's
    share of allocations, r_v,k the value's rate on variant k (variants with enough allocations
    there). It takes observed maxima at face value, so it is an optimistic, upper-bound estimate.
    """
    marginals = dimension_marginals(counts)
    best_global = _global_best_variant(counts)
    minimum = config.min_allocations_per_value
    by_dimension: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    for m in marginals:
        by_dimension.setdefault(m.dimension, {}).setdefault(m.value, {})[m.variant] = (
            m.allocations,
            m.conversions,
        )
    tested: list[tuple[str, int, float, float, float, float]] = []
    untested: list[DimensionScore] = []
    for dimension, values in sorted(by_dimension.items()):
        variants = sorted({variant for per in values.values() for variant in per})
        statistic = 0.0
        df = 0
        stacked = 0
        used: set[str] = set()
        for variant in variants:
            cells = sorted(
                (value, per[variant])
                for value, per in values.items()
                if variant in per and per[variant][0] >= minimum
            )
            if len(cells) < 2:
                continue
            test = chisquare_homogeneity([c for _, (_, c) in cells], [n for _, (n, _) in cells])
            statistic += test.statistic
            df += test.df
            stacked += sum(n for _, (n, _) in cells)
            used.update(value for value, _ in cells)
        if df == 0:
            untested.append(
                DimensionScore(
                    dimension=dimension,
                    values=len(used),
                    statistic=None,
                    p_value=None,
                    effect=0.0,
                    expected_benefit=0.0,
                    significant=False,
                    reason=(
                        f"not enough data: no variant has two values with {minimum} allocations"
                    ),
                )
            )
            continue
        shares = {value: sum(n for n, _ in values[value].values()) for value in used}
        total = sum(shares.values())
        gain = 0.0
        for value in sorted(used):
            rates = {variant: c / n for variant, (n, c) in values[value].items() if n >= minimum}
            if best_global is not None and best_global in rates:
                gain += shares[value] / total * (max(rates.values()) - rates[best_global])
        tested.append(
            (
                dimension,
                len(used),
                statistic,
                chi2_sf(statistic, df),
                math.sqrt(statistic / stacked),
                average_daily_visitors * gain,
            )
        )
    level = config.alpha / len(tested) if tested else config.alpha
    scored = [
        DimensionScore(
            dimension=dimension,
            values=n_values,
            statistic=statistic,
            p_value=p_value,
            effect=effect,
            expected_benefit=benefit,
            significant=p_value < level,
            reason=None,
        )
        for dimension, n_values, statistic, p_value, effect, benefit in tested
    ]
    scored.sort(key=lambda s: (not s.significant, -s.effect, s.dimension))
    return tuple(scored) + tuple(untested)


def recommend_segmentation(
    config: EligibilityConfig,
    daily: Sequence[DailyTraffic],
    counts: Sequence[SegmentVariantCounts],
    created_at: datetime,
    today: date | None = None,
) -> Recommendation:
    """The eligibility check: traffic over the window, then the dimensions worth segmenting by.

    Eligible when the mean visitors/day over the last `window_days` days (traffic_window) reach
    `min_visitors_per_day`. Recommended dimensions are the significant ones of `score_dimensions`,
    by decreasing effect (Cramér's V), at most `max_dimensions`. `expected_benefit` is the largest
    single recommended dimension's extra conversions per day (a combination of dimensions is not
    estimated: its cells are too thin to trust).
    """
    window = traffic_window(daily, config.window_days, today)
    average = window.average_visitors
    if not window.complete:
        return Recommendation(
            kind=RecommendationKind.INSUFFICIENT_DATA,
            dimensions=(),
            expected_benefit=0.0,
            reason=(
                f"not enough data: {window.days_of_history} of {config.window_days} days of "
                f"traffic stats"
            ),
            created_at=created_at,
            average_daily_visitors=average,
            scores=(),
        )
    if average < config.min_visitors_per_day:
        return Recommendation(
            kind=RecommendationKind.NOT_ELIGIBLE,
            dimensions=(),
            expected_benefit=0.0,
            reason=(
                f"{average:.0f} visitors/day over the last {config.window_days} days, below the "
                f"{config.min_visitors_per_day:.0f} needed for segmentation"
            ),
            created_at=created_at,
            average_daily_visitors=average,
            scores=(),
        )
    scores = score_dimensions(counts, average, config)
    chosen = [s for s in scores if s.significant][: config.max_dimensions]
    if not chosen:
        tested = [s.dimension for s in scores if s.p_value is not None]
        detail = (
            f"no dimension's conversion rates differ significantly (tested: {', '.join(tested)})"
            if tested
            else "no dimension has enough data per value to test"
        )
        return Recommendation(
            kind=RecommendationKind.NO_SIGNAL,
            dimensions=(),
            expected_benefit=0.0,
            reason=f"eligible at {average:.0f} visitors/day, but {detail}",
            created_at=created_at,
            average_daily_visitors=average,
            scores=scores,
        )
    benefit = max(s.expected_benefit for s in chosen)
    listing = ", ".join(
        f"{s.dimension} (p {'< 0.001' if (s.p_value or 0.0) < 0.001 else f'= {s.p_value:.3f}'}, "
        f"V = {s.effect:.3f})"
        for s in chosen
    )
    return Recommendation(
        kind=RecommendationKind.ENABLE_SEGMENTATION,
        dimensions=tuple(s.dimension for s in chosen),
        expected_benefit=benefit,
        reason=(
            f"eligible at {average:.0f} visitors/day; conversion rates differ by {listing}; "
            f"up to {benefit:.1f} extra conversions/day"
        ),
        created_at=created_at,
        average_daily_visitors=average,
        scores=scores,
    )
