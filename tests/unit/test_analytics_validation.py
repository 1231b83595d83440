"""Experiment validation: SRM against scipy.stats.chisquare, pre-launch traffic, early stopping."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from allocsvc.analytics.power import SampleSizeQuery, sample_size
from allocsvc.analytics.validation import (
    ArmCounts,
    EarlyStoppingSettings,
    SrmSettings,
    early_stopping,
    prelaunch_check,
    sample_ratio_mismatch,
)
from allocsvc.errors import InvalidRequest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("observed", "weights"),
    [
        ([10_400, 9_600], [1.0, 1.0]),
        ([10_020, 9_980], [50.0, 50.0]),
        ([7_100, 2_900], [0.7, 0.3]),
        ([3_300, 3_350, 3_350], [1.0, 1.0, 1.0]),
        ([1_000, 1_000, 2_100], [0.25, 0.25, 0.5]),
        ([52, 48], [1.0, 1.0]),
        ([200_000, 201_500, 199_000, 199_500], [1.0, 1.0, 1.0, 1.0]),
        ([600, 400], [1.0, 1.0]),
    ],
)
def test_srm_p_value_equals_scipy_chisquare(observed: list[int], weights: list[float]) -> None:
    total = sum(observed)
    expected = np.array(weights) / sum(weights) * total
    reference = sps.chisquare(observed, expected)
    check = sample_ratio_mismatch(observed, weights)
    assert check.statistic == pytest.approx(reference.statistic, rel=1e-12)
    assert check.p_value == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-300)
    assert check.df == len(observed) - 1
    assert check.mismatch == (reference.pvalue < 0.001)


def test_a_52_48_split_of_20000_users_is_a_mismatch() -> None:
    check = sample_ratio_mismatch([10_400, 9_600], [0.5, 0.5])
    assert check.mismatch
    assert check.p_value < 1e-6
    assert check.reason.startswith("sample-ratio mismatch")


def test_a_50_1_49_9_split_of_20000_users_is_not() -> None:
    check = sample_ratio_mismatch([10_020, 9_980], [0.5, 0.5])
    assert not check.mismatch
    assert check.p_value > 0.5
    assert check.reason.startswith("no sample-ratio mismatch")


def test_the_threshold_is_configurable() -> None:
    observed, weights = [10_150, 9_850], [1.0, 1.0]  # p ≈ 0.034
    assert not sample_ratio_mismatch(observed, weights).mismatch
    assert sample_ratio_mismatch(observed, weights, SrmSettings(p_threshold=0.05)).mismatch


def test_srm_without_enough_data_reports_a_reason() -> None:
    empty = sample_ratio_mismatch([0, 0], [1.0, 1.0])
    assert not empty.mismatch
    assert empty.reason == "not enough data: no allocations yet"
    thin = sample_ratio_mismatch([6, 0], [1.0, 1.0])
    assert not thin.mismatch
    assert thin.reason.startswith("not enough data")


@pytest.mark.parametrize(
    ("observed", "weights"),
    [([10, 10], [1.0]), ([10], [1.0]), ([10, 10], [1.0, 0.0]), ([10, -1], [1.0, 1.0])],
)
def test_srm_rejects_malformed_input(observed: list[int], weights: list[float]) -> None:
    with pytest.raises(InvalidRequest):
        sample_ratio_mismatch(observed, weights)


def test_srm_settings_validate_themselves() -> None:
    with pytest.raises(InvalidRequest):
        SrmSettings(p_threshold=0.0)
    with pytest.raises(InvalidRequest):
        SrmSettings(min_expected=0.0)


QUERY = SampleSizeQuery(baseline_rate=0.05, minimum_detectable_effect=0.1)


def test_prelaunch_passes_with_enough_traffic() -> None:
    check = prelaunch_check(QUERY, expected_daily_traffic=5_000.0, horizon_days=28)
    sample = sample_size(QUERY)
    assert check.ok
    assert check.sample == sample
    assert check.plan.required_samples == sample.total
    assert check.plan.days_needed == -(-sample.total // 5_000)
    assert check.reason.startswith("ready to launch")


def test_prelaunch_fails_with_too_little_traffic() -> None:
    check = prelaunch_check(QUERY, expected_daily_traffic=500.0, horizon_days=28)
    assert not check.ok
    assert check.reason.startswith("not enough traffic")


def test_prelaunch_with_an_uneven_split_waits_for_the_smallest_variant() -> None:
    even = prelaunch_check(QUERY, 5_000.0, 60)
    uneven = prelaunch_check(QUERY, 5_000.0, 60, weights=[0.9, 0.1])
    per_variant = even.sample.per_variant
    assert uneven.plan.required_samples == per_variant * 10
    assert even.plan.days_needed is not None and uneven.plan.days_needed is not None
    assert uneven.plan.days_needed > even.plan.days_needed
    with pytest.raises(InvalidRequest):
        prelaunch_check(QUERY, 5_000.0, 60, weights=[1.0, 1.0, 1.0])


def test_a_clear_winner_with_enough_data_stops_the_experiment() -> None:
    arms = [ArmCounts("a", 5_000, 250), ArmCounts("b", 5_000, 330)]
    decision = early_stopping(arms)
    assert decision.stop
    assert decision.winner == "b"
    assert decision.probability_best[1] > 0.95
    assert decision.expected_loss[1] < decision.expected_loss[0]
    assert decision.reason.startswith("stop: b is best")


def test_a_clear_winner_below_the_minimum_sample_keeps_running() -> None:
    arms = [ArmCounts("a", 400, 10), ArmCounts("b", 5_000, 400)]
    decision = early_stopping(arms)
    assert not decision.stop
    assert decision.winner is None
    assert decision.probability_best[1] > 0.95
    assert "a (400) below 1000" in decision.reason


def test_a_close_race_keeps_running() -> None:
    arms = [ArmCounts("a", 5_000, 250), ArmCounts("b", 5_000, 262), ArmCounts("c", 5_000, 255)]
    decision = early_stopping(arms)
    assert not decision.stop
    assert max(decision.probability_best) < 0.95
    assert sum(decision.probability_best) == pytest.approx(1.0)


def test_the_probability_threshold_is_configurable() -> None:
    arms = [ArmCounts("a", 5_000, 250), ArmCounts("b", 5_000, 280)]
    p_best = early_stopping(arms).probability_best[1]
    assert 0.8 < p_best < 0.95
    assert not early_stopping(arms).stop
    assert early_stopping(arms, EarlyStoppingSettings(probability_threshold=0.8)).stop


def test_early_stopping_probabilities_match_monte_carlo() -> None:
    arms = [ArmCounts("a", 2_000, 60), ArmCounts("b", 2_100, 75), ArmCounts("c", 1_900, 70)]
    decision = early_stopping(arms)
    rng = np.random.default_rng(7)
    draws = np.array(
        [rng.beta(1 + a.conversions, 1 + a.allocations - a.conversions, 300_000) for a in arms]
    )
    wins = np.bincount(draws.argmax(axis=0), minlength=3) / draws.shape[1]
    np.testing.assert_allclose(decision.probability_best, wins, atol=0.01)


def test_one_variant_cannot_be_stopped_early() -> None:
    decision = early_stopping([ArmCounts("a", 5_000, 250)])
    assert not decision.stop
    assert decision.reason.startswith("not enough data")


def test_early_stopping_inputs_validate_themselves() -> None:
    with pytest.raises(InvalidRequest):
        ArmCounts("a", 10, 11)
    with pytest.raises(InvalidRequest):
        EarlyStoppingSettings(probability_threshold=0.4)
    with pytest.raises(InvalidRequest):
        EarlyStoppingSettings(min_samples_per_variant=-1)
