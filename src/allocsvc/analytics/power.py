"""Sample size for comparing conversion rates, and how long the experiment's traffic takes.

The calculation is statsmodels' `NormalIndPower().solve_power(effect_size=proportion_effectsize(p2,
p1), alpha=α, power=1 − β, ratio=1, alternative=...)` in the standard library: Cohen's h effect
size, the normal approximation, the two-sided power including the far tail, solved by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from allocsvc.analytics.stats import cohens_h, normal_cdf, normal_isf, normal_sf
from allocsvc.errors import InvalidRequest

_MAX_SAMPLE: Final = 1e15


class EffectKind(StrEnum):
    """How a minimum detectable effect is expressed."""

    RELATIVE = "relative"  # p2 = p1·(1 + mde), e.g. 0.1 for +10 %
    ABSOLUTE = "absolute"  # p2 = p1 + mde, e.g. 0.005 for +0.5 points


@dataclass(frozen=True, slots=True)
class SampleSizeQuery:
    """What a two-proportion power analysis needs; validates itself (InvalidRequest on bad input).

    `variants` arms are each compared with the control, `segments` times when each segment is tested
    on its own: Bonferroni divides α by comparisons = (variants − 1)·segments. A one-sided test
    (`two_sided=False`) tests in the direction of the effect.
    """

    baseline_rate: float
    minimum_detectable_effect: float
    effect_kind: EffectKind = EffectKind.RELATIVE
    alpha: float = 0.05
    power: float = 0.8
    variants: int = 2
    segments: int = 1
    two_sided: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.baseline_rate < 1.0:
            raise InvalidRequest("baseline_rate", "must lie strictly between 0 and 1")
        if not math.isfinite(self.minimum_detectable_effect) or self.minimum_detectable_effect == 0:
            raise InvalidRequest("minimum_detectable_effect", "must be a non-zero finite number")
        if not 0.0 < self.treatment_rate < 1.0:
            raise InvalidRequest(
                "minimum_detectable_effect",
                f"moves the rate to {self.treatment_rate:.6g}, outside (0, 1)",
            )
        if not 0.0 < self.alpha < 0.5:
            raise InvalidRequest("alpha", "must lie strictly between 0 and 0.5")
        if not 0.5 <= self.power < 1.0:
            raise InvalidRequest("power", "must lie in [0.5, 1)")
        if isinstance(self.variants, bool) or self.variants < 2:
            raise InvalidRequest("variants", "must be at least 2")
        if isinstance(self.segments, bool) or self.segments < 1:
            raise InvalidRequest("segments", "must be at least 1")

    @property
    def treatment_rate(self) -> float:
        """p2, the rate the minimum detectable effect moves the baseline to."""
        if self.effect_kind is EffectKind.RELATIVE:
            return self.baseline_rate * (1.0 + self.minimum_detectable_effect)
        return self.baseline_rate + self.minimum_detectable_effect

    @property
    def comparisons(self) -> int:
        return (self.variants - 1) * self.segments

    @property
    def adjusted_alpha(self) -> float:
        """Bonferroni: α / comparisons (Dunn, JASA 56, 1961)."""
        return self.alpha / self.comparisons


@dataclass(frozen=True, slots=True)
class SampleSize:
    """Samples per variant (rounded up) and in total, with what they were computed from."""

    per_variant: int
    total: int
    effect_size: float
    adjusted_alpha: float
    comparisons: int
    achieved_power: float
    query: SampleSizeQuery


def power_two_proportions(
    effect_size: float, per_variant: float, alpha: float, two_sided: bool
) -> float:
    """Power of the two-sample z-test of proportions with n per arm, for Cohen's h effect size.

    The test statistic is approximately N(h·√(n/2), 1) (equal arms: 1/(1/n + 1/n) = n/2).
    One-sided (in the direction of h): 1 − Φ(z₁₋α − |h|√(n/2)). Two-sided: 1 − Φ(z₁₋α/₂ − |h|√(n/2))
    + Φ(−z₁₋α/₂ − |h|√(n/2)), the second term being rejections in the far tail (Cohen 1988, §6.3;
    statsmodels `NormalIndPower.power` with ratio=1).
    """
    shift = abs(effect_size) * math.sqrt(per_variant / 2.0)
    if not two_sided:
        return normal_sf(normal_isf(alpha) - shift)
    crit = normal_isf(alpha / 2.0)
    return normal_sf(crit - shift) + normal_cdf(-crit - shift)


def sample_size(query: SampleSizeQuery) -> SampleSize:
    """Smallest n per variant whose power reaches `query.power` at the Bonferroni-adjusted α.

    h = 2·asin(√p2) − 2·asin(√p1) (Cohen's h); the closed form n = 2·((z₁₋α/₂ + z₁₋β)/h)² ignores
    the far tail, so n solves power(n) = 1 − β exactly by bisection on log n (power increases with
    n), then is rounded up: the value of statsmodels `NormalIndPower().solve_power(...)` rounded up,
    within one sample. Total = per variant × variants × segments (every segment needs a full sample;
    this assumes traffic splits evenly across segments, the smallest one actually sets the pace).
    """
    effect = cohens_h(query.treatment_rate, query.baseline_rate)
    alpha = query.adjusted_alpha
    target = query.power
    low, high = 1e-9, 2.0
    while power_two_proportions(effect, high, alpha, query.two_sided) < target:
        low, high = high, high * 2.0
        if high > _MAX_SAMPLE:
            raise InvalidRequest("minimum_detectable_effect", "too small to detect with any sample")
    for _ in range(200):
        mid = math.sqrt(low * high)
        if power_two_proportions(effect, mid, alpha, query.two_sided) < target:
            low = mid
        else:
            high = mid
        if high - low <= 1e-9 * high:
            break
    # The smallest whole n reaching the target (bisection leaves `high` within 1e-9 of the root).
    per_variant = max(1, math.ceil(high))
    while per_variant > 1 and (
        power_two_proportions(effect, per_variant - 1, alpha, query.two_sided) >= target
    ):
        per_variant -= 1
    return SampleSize(
        per_variant=per_variant,
        total=per_variant * query.variants * query.segments,
        effect_size=effect,
        adjusted_alpha=alpha,
        comparisons=query.comparisons,
        achieved_power=power_two_proportions(effect, per_variant, alpha, query.two_sided),
        query=query,
    )


@dataclass(frozen=True, slots=True)
class TrafficPlan:
    """Days the experiment's traffic needs to collect a sample, and whether the horizon allows it.

    `days_needed` is None when there is no traffic to divide by; `reason` always says why in words.
    """

    days_needed: int | None
    achievable: bool
    daily_traffic: float
    horizon_days: int | None
    required_samples: int
    reason: str


def days_needed(
    required_samples: int, daily_traffic: float, horizon_days: int | None = None
) -> TrafficPlan:
    """⌈required / daily traffic⌉ days at the observed traffic; achievable when ≤ the horizon.

    `daily_traffic` is the experiment's visitors (allocations) per day across all variants; no
    horizon means any finite duration is achievable.
    """
    if required_samples < 0:
        raise InvalidRequest("required_samples", "must not be negative")
    if horizon_days is not None and horizon_days < 1:
        raise InvalidRequest("horizon_days", "must be at least 1")
    if not math.isfinite(daily_traffic) or daily_traffic < 0:
        raise InvalidRequest("daily_traffic", "must be a finite number ≥ 0")
    if daily_traffic == 0:
        return TrafficPlan(
            days_needed=None,
            achievable=False,
            daily_traffic=daily_traffic,
            horizon_days=horizon_days,
            required_samples=required_samples,
            reason="no traffic observed: the sample can never be collected at the current rate",
        )
    days = math.ceil(required_samples / daily_traffic)
    if horizon_days is None:
        achievable = True
        reason = f"{required_samples} samples at {daily_traffic:.0f} per day take {days} days"
    elif days <= horizon_days:
        achievable = True
        reason = (
            f"{required_samples} samples at {daily_traffic:.0f} per day take {days} days, "
            f"within the {horizon_days}-day horizon"
        )
    else:
        achievable = False
        needed_rate = math.ceil(required_samples / horizon_days)
        reason = (
            f"{required_samples} samples at {daily_traffic:.0f} per day take {days} days, beyond "
            f"the {horizon_days}-day horizon (needs {needed_rate} per day, or a larger effect)"
        )
    return TrafficPlan(
        days_needed=days,
        achievable=achievable,
        daily_traffic=daily_traffic,
        horizon_days=horizon_days,
        required_samples=required_samples,
        reason=reason,
    )
