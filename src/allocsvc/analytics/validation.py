"""Experiment validation: sample-ratio mismatch, pre-launch traffic, Bayesian early stopping."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from allocsvc.analytics.power import (
    SampleSize,
    SampleSizeQuery,
    TrafficPlan,
    days_needed,
    sample_size,
)
from allocsvc.analytics.stats import BetaPosterior, chisquare_goodness_of_fit, probability_best
from allocsvc.errors import InvalidRequest

# Sample-ratio mismatch


@dataclass(frozen=True, slots=True)
class SrmSettings:
    """Flag a mismatch at p < `p_threshold`; below `min_expected` expected allocations in any
    variant the chi-square approximation is unreliable and the check reports not enough data."""

    p_threshold: float = 0.001
    min_expected: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 < self.p_threshold < 1.0:
            raise InvalidRequest("p_threshold", "must lie strictly between 0 and 1")
        if not self.min_expected > 0.0:
            raise InvalidRequest("min_expected", "must be positive")


@dataclass(frozen=True, slots=True)
class SampleRatioCheck:
    """Outcome of the SRM test. `mismatch` is False whenever `reason` says the data is too thin."""

    mismatch: bool
    statistic: float
    df: int
    p_value: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    reason: str


def sample_ratio_mismatch(
    observed: Sequence[int], weights: Sequence[float], settings: SrmSettings | None = None
) -> SampleRatioCheck:
    """Chi-square goodness of fit of the allocations per variant to the configured split.

    Eᵢ = N·wᵢ/Σw, X² = Σ(Oᵢ − Eᵢ)²/Eᵢ on k − 1 degrees of freedom; a mismatch at p < 0.001 by
    default, a strict level because the check runs continuously and a true SRM gives a tiny p at
    volume (Fabijan et al., "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments",
    KDD 2019).
    The p-value equals `scipy.stats.chisquare(observed, expected)`.
    """
    settings = settings or SrmSettings()
    if len(observed) != len(weights) or len(observed) < 2:
        raise InvalidRequest("weights", "need one weight per variant and at least two variants")
    if any(not (w > 0.0 and math.isfinite(w)) for w in weights):
        raise InvalidRequest("weights", "must be positive and finite")
    if any(o < 0 for o in observed):
        raise InvalidRequest("observed", "allocations must not be negative")
    total = sum(observed)
    weight_sum = math.fsum(weights)
    expected = tuple(total * w / weight_sum for w in weights)
    counts = tuple(observed)
    if total == 0:
        return SampleRatioCheck(
            mismatch=False,
            statistic=0.0,
            df=len(counts) - 1,
            p_value=1.0,
            observed=counts,
            expected=expected,
            reason="not enough data: no allocations yet",
        )
    test = chisquare_goodness_of_fit(counts, expected)
    smallest = min(expected)
    if smallest < settings.min_expected:
        return SampleRatioCheck(
            mismatch=False,
            statistic=test.statistic,
            df=test.df,
            p_value=test.p_value,
            observed=counts,
            expected=expected,
            reason=(
                f"not enough data: a variant expects {smallest:.1f} allocations, "
                f"below {settings.min_expected:g} for the chi-square approximation"
            ),
        )
    mismatch = test.p_value < settings.p_threshold
    shares = ", ".join(f"{o / total:.2%}" for o in counts)
    targets = ", ".join(f"{w / weight_sum:.2%}" for w in weights)
    verdict = "sample-ratio mismatch" if mismatch else "no sample-ratio mismatch"
    relation = "<" if mismatch else "≥"
    return SampleRatioCheck(
        mismatch=mismatch,
        statistic=test.statistic,
        df=test.df,
        p_value=test.p_value,
        observed=counts,
        expected=expected,
        reason=(
            f"{verdict}: observed shares {shares} vs configured {targets} over {total} "
            f"allocations (chi-square {test.statistic:.2f}, p = {test.p_value:.3g} "
            f"{relation} {settings.p_threshold:g})"
        ),
    )


# Pre-launch


@dataclass(frozen=True, slots=True)
class PrelaunchCheck:
    """Whether the expected traffic reaches the sample for the chosen effect within the horizon."""

    ok: bool
    sample: SampleSize
    plan: TrafficPlan
    reason: str


def prelaunch_check(
    query: SampleSizeQuery,
    expected_daily_traffic: float,
    horizon_days: int,
    weights: Sequence[float] | None = None,
) -> PrelaunchCheck:
    """Sample size for `query` (power.sample_size), then the days the expected traffic needs.

    With `weights` (the configured split, one per variant), the least-weighted variant fills last:
    the experiment needs n·segments / min share allocations in total instead of n·variants·segments.
    """
    if weights is not None:
        if len(weights) != query.variants:
            raise InvalidRequest("weights", f"need {query.variants} weights, got {len(weights)}")
        if any(not (w > 0.0 and math.isfinite(w)) for w in weights):
            raise InvalidRequest("weights", "must be positive and finite")
    sample = sample_size(query)
    required = sample.total
    if weights is not None:
        min_share = min(weights) / math.fsum(weights)
        required = math.ceil(sample.per_variant * query.segments / min_share)
    plan = days_needed(required, expected_daily_traffic, horizon_days)
    detail = (
        f"{sample.per_variant} per variant to detect {query.baseline_rate:.2%} → "
        f"{query.treatment_rate:.2%} at α = {sample.adjusted_alpha:.3g}, power {query.power:g}"
    )
    verdict = "ready to launch" if plan.achievable else "not enough traffic"
    return PrelaunchCheck(
        ok=plan.achievable, sample=sample, plan=plan, reason=f"{verdict}: {detail}; {plan.reason}"
    )


# Early stopping


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """Allocations and conversions of one variant."""

    variant: str
    allocations: int
    conversions: int

    def __post_init__(self) -> None:
        if self.allocations < 0 or not 0 <= self.conversions <= self.allocations:
            raise InvalidRequest(
                "conversions", f"must lie in [0, allocations] for {self.variant!r}"
            )


@dataclass(frozen=True, slots=True)
class EarlyStoppingSettings:
    """Stop when one variant is best with probability > `probability_threshold` and every variant
    has at least `min_samples_per_variant` allocations; the prior matches the Thompson sampler's."""

    probability_threshold: float = 0.95
    min_samples_per_variant: int = 1000
    prior_alpha: float = 1.0
    prior_beta: float = 1.0

    def __post_init__(self) -> None:
        if not 0.5 < self.probability_threshold < 1.0:
            raise InvalidRequest("probability_threshold", "must lie strictly between 0.5 and 1")
        if self.min_samples_per_variant < 0:
            raise InvalidRequest("min_samples_per_variant", "must not be negative")
        if not (self.prior_alpha > 0.0 and self.prior_beta > 0.0):
            raise InvalidRequest("prior_alpha", "prior parameters must be positive")


@dataclass(frozen=True, slots=True)
class EarlyStoppingDecision:
    """P(best) and expected loss per variant (in input order), the decision and why."""

    stop: bool
    winner: str | None
    variants: tuple[str, ...]
    probability_best: tuple[float, ...]
    expected_loss: tuple[float, ...]
    reason: str


def early_stopping(
    arms: Sequence[ArmCounts], settings: EarlyStoppingSettings | None = None
) -> EarlyStoppingDecision:
    """Bayesian stopping rule: stop when maxᵢ P(θᵢ best) > threshold and every nᵢ ≥ the minimum.

    θᵢ ~ Beta(α0 + cᵢ, β0 + nᵢ − cᵢ), the same model the Thompson sampler allocates with, so the
    rule stops exactly when the sampler would send almost all traffic to one variant anyway (its
    allocation share is P(best)); the expected loss E[max θ − θ_winner] says what stopping could
    still cost (stats.probability_best). Unlike repeated frequentist tests, posterior probabilities
    may be monitored continuously without a sequential correction (Berger & Wolpert, The Likelihood
    Principle, 1988); the minimum sample guards against the early, prior-dominated swings and the
    novelty effects a posterior alone cannot see.
    """
    settings = settings or EarlyStoppingSettings()
    names = tuple(a.variant for a in arms)
    if len(arms) < 2:
        return EarlyStoppingDecision(
            stop=False,
            winner=None,
            variants=names,
            probability_best=(1.0,) * len(arms),
            expected_loss=(0.0,) * len(arms),
            reason="not enough data: early stopping compares at least two variants",
        )
    posteriors = [
        BetaPosterior.from_counts(
            a.allocations, a.conversions, settings.prior_alpha, settings.prior_beta
        )
        for a in arms
    ]
    best = probability_best(posteriors)
    leader = max(range(len(arms)), key=lambda i: best.probabilities[i])
    leader_p = best.probabilities[leader]
    leader_text = (
        f"{names[leader]} is best with probability {leader_p:.3f} "
        f"(expected loss {best.expected_loss[leader]:.2e})"
    )
    thin = [a for a in arms if a.allocations < settings.min_samples_per_variant]
    if thin:
        listing = ", ".join(f"{a.variant} ({a.allocations})" for a in thin)
        reason = (
            f"keep running: {listing} below {settings.min_samples_per_variant} allocations; "
            f"{leader_text}"
        )
        stop = False
    elif leader_p > settings.probability_threshold:
        reason = f"stop: {leader_text} > {settings.probability_threshold:g}"
        stop = True
    else:
        reason = f"keep running: {leader_text} ≤ {settings.probability_threshold:g}"
        stop = False
    return EarlyStoppingDecision(
        stop=stop,
        winner=names[leader] if stop else None,
        variants=names,
        probability_best=best.probabilities,
        expected_loss=best.expected_loss,
        reason=reason,
    )
