"""Sample sizes against statsmodels' NormalIndPower, and the traffic plans built on them."""

from __future__ import annotations

import itertools
import math

import pytest
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from allocsvc.analytics.power import (
    EffectKind,
    SampleSizeQuery,
    days_needed,
    power_two_proportions,
    sample_size,
)
from allocsvc.errors import InvalidRequest

pytestmark = pytest.mark.unit

BASELINES = [0.01, 0.05, 0.2, 0.6]
RELATIVE_EFFECTS = [-0.2, 0.05, 0.1, 0.3]
ALPHA_POWER = [(0.05, 0.8), (0.01, 0.9), (0.1, 0.95)]
LAYOUTS = [(2, 1), (4, 1), (3, 5)]  # (variants, segments): no correction, then Bonferroni


def _statsmodels_per_variant(query: SampleSizeQuery) -> float:
    effect = proportion_effectsize(query.treatment_rate, query.baseline_rate)
    one_sided = "larger" if effect > 0 else "smaller"
    alternative = "two-sided" if query.two_sided else one_sided
    return float(
        NormalIndPower().solve_power(
            effect_size=effect,
            nobs1=None,
            alpha=query.alpha / ((query.variants - 1) * query.segments),
            power=query.power,
            ratio=1.0,
            alternative=alternative,
        )
    )


@pytest.mark.parametrize(
    ("baseline", "effect", "alpha_power", "layout", "two_sided"),
    list(itertools.product(BASELINES, RELATIVE_EFFECTS, ALPHA_POWER, LAYOUTS, [True, False])),
)
def test_sample_size_matches_statsmodels_within_one(
    baseline: float,
    effect: float,
    alpha_power: tuple[float, float],
    layout: tuple[int, int],
    two_sided: bool,
) -> None:
    alpha, power = alpha_power
    variants, segments = layout
    query = SampleSizeQuery(
        baseline_rate=baseline,
        minimum_detectable_effect=effect,
        alpha=alpha,
        power=power,
        variants=variants,
        segments=segments,
        two_sided=two_sided,
    )
    result = sample_size(query)
    reference = math.ceil(_statsmodels_per_variant(query))
    assert abs(result.per_variant - reference) <= 1
    assert result.total == result.per_variant * variants * segments
    assert result.comparisons == (variants - 1) * segments
    assert result.adjusted_alpha == pytest.approx(alpha / result.comparisons)
    assert result.achieved_power >= power
    # the smallest such n: one fewer falls short
    below = power_two_proportions(
        result.effect_size, result.per_variant - 1, result.adjusted_alpha, two_sided
    )
    assert below < power


@pytest.mark.parametrize(
    ("baseline", "absolute_effect"), [(0.03, 0.005), (0.1, -0.02), (0.5, 0.01), (0.9, 0.05)]
)
def test_absolute_effects_match_statsmodels(baseline: float, absolute_effect: float) -> None:
    query = SampleSizeQuery(
        baseline_rate=baseline,
        minimum_detectable_effect=absolute_effect,
        effect_kind=EffectKind.ABSOLUTE,
    )
    assert query.treatment_rate == pytest.approx(baseline + absolute_effect)
    result = sample_size(query)
    assert abs(result.per_variant - math.ceil(_statsmodels_per_variant(query))) <= 1


@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize(("effect", "n"), [(0.05, 1000.0), (0.2, 150.0), (-0.1, 3000.0)])
def test_power_function_matches_statsmodels(effect: float, n: float, two_sided: bool) -> None:
    alternative = "two-sided" if two_sided else ("larger" if effect > 0 else "smaller")
    reference = NormalIndPower().power(effect, n, 0.05, ratio=1.0, alternative=alternative)
    assert power_two_proportions(effect, n, 0.05, two_sided) == pytest.approx(reference, rel=1e-12)


def test_a_textbook_case() -> None:
    # 10 % → 12 %, α = 0.05 two-sided, power 0.8: h = 0.0640, n = 2·((1.960 + 0.842)/h)² = 3834.6.
    result = sample_size(SampleSizeQuery(baseline_rate=0.10, minimum_detectable_effect=0.2))
    assert result.effect_size == pytest.approx(0.063982, abs=1e-6)
    assert result.per_variant == 3835
    assert result.total == 7670


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"baseline_rate": 0.0}, "baseline_rate"),
        ({"baseline_rate": 1.2}, "baseline_rate"),
        ({"minimum_detectable_effect": 0.0}, "minimum_detectable_effect"),
        ({"minimum_detectable_effect": 10.0}, "minimum_detectable_effect"),
        ({"minimum_detectable_effect": math.nan}, "minimum_detectable_effect"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 0.7}, "alpha"),
        ({"power": 0.3}, "power"),
        ({"power": 1.0}, "power"),
        ({"variants": 1}, "variants"),
        ({"segments": 0}, "segments"),
    ],
)
def test_queries_validate_themselves(changes: dict[str, float], field: str) -> None:
    arguments: dict[str, float] = {"baseline_rate": 0.1, "minimum_detectable_effect": 0.1}
    arguments.update(changes)
    with pytest.raises(InvalidRequest) as raised:
        SampleSizeQuery(**arguments)  # type: ignore[arg-type]
    assert raised.value.field == field


def test_days_needed_within_the_horizon() -> None:
    plan = days_needed(7682, daily_traffic=1000.0, horizon_days=14)
    assert plan.days_needed == 8
    assert plan.achievable
    assert "within the 14-day horizon" in plan.reason


def test_days_needed_beyond_the_horizon_says_what_would_do() -> None:
    plan = days_needed(100_000, daily_traffic=2_000.0, horizon_days=30)
    assert plan.days_needed == 50
    assert not plan.achievable
    assert "needs 3334 per day" in plan.reason


def test_days_needed_without_traffic_is_a_result_not_an_error() -> None:
    plan = days_needed(5000, daily_traffic=0.0, horizon_days=30)
    assert plan.days_needed is None
    assert not plan.achievable
    assert "no traffic" in plan.reason


def test_days_needed_without_a_horizon() -> None:
    plan = days_needed(5000, daily_traffic=300.0)
    assert plan.days_needed == 17
    assert plan.achievable


@pytest.mark.parametrize(
    ("required", "traffic", "horizon"),
    [(-1, 10.0, 5), (10, -1.0, 5), (10, math.inf, 5), (10, 5.0, 0)],
)
def test_days_needed_rejects_nonsense(required: int, traffic: float, horizon: int) -> None:
    with pytest.raises(InvalidRequest):
        days_needed(required, traffic, horizon)
