"""Segmentation eligibility, recommendations, auto-activation, and the alerts on that data."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from scipy import stats as sps

from allocsvc.analytics.alerts import (
    ActivationFailure,
    AlertKind,
    Severity,
    UnderperformanceSettings,
    activation_failed_alert,
    stale_model_alert,
    underperforming_segments,
)
from allocsvc.analytics.eligibility import (
    ActivationConfig,
    DailyTraffic,
    EligibilityConfig,
    RecommendationKind,
    decide_activation,
    recommend_segmentation,
    score_dimensions,
    traffic_window,
)
from allocsvc.analytics.segments import SegmentVariantCounts
from allocsvc.errors import InvalidRequest

pytestmark = pytest.mark.unit

NOW = datetime(2024, 6, 11, 9, 30, tzinfo=UTC)
DAY0 = date(2024, 6, 1)


def _days(visitors: list[int], start: date = DAY0) -> list[DailyTraffic]:
    return [DailyTraffic(start + timedelta(days=i), v, v, v // 20) for i, v in enumerate(visitors)]


def test_traffic_window_averages_the_last_days() -> None:
    window = traffic_window(
        _days([100, 100, 100, 1_400, 1_400, 1_400, 1_400, 1_400, 1_400, 1_400]), 7
    )
    assert window.average_visitors == pytest.approx(1_400.0)
    assert window.days_of_history == 10
    assert window.complete
    assert window.last_day == DAY0 + timedelta(days=9)


def test_traffic_window_leaves_out_today_and_counts_missing_days_as_zero() -> None:
    daily = _days([1_000] * 7)
    today = DAY0 + timedelta(days=9)  # two days without traffic since the last row
    window = traffic_window([*daily, DailyTraffic(today, 5, 5, 0)], 7, today=today)
    assert window.last_day == today - timedelta(days=1)
    assert window.average_visitors == pytest.approx(5_000 / 7)


def test_traffic_window_rejects_duplicate_days() -> None:
    with pytest.raises(InvalidRequest):
        traffic_window([*_days([10]), *_days([20])], 7)


def test_activation_follows_the_threshold() -> None:
    on = ActivationConfig(auto_activation=True, threshold=1_000)
    busy = decide_activation(on, _days([1_200] * 7))
    assert busy.activate
    assert busy.reason == "1200 visitors/day over the last 7 days reach the threshold of 1000"
    quiet = decide_activation(on, _days([800] * 7))
    assert not quiet.activate
    assert quiet.reason == "800 visitors/day over the last 7 days, below the threshold of 1000"
    young = decide_activation(on, _days([5_000] * 3))
    assert not young.activate
    assert young.reason == "not enough data: 3 of 7 days of traffic"


def test_no_activation_when_off_or_already_on() -> None:
    daily = _days([5_000] * 7)
    assert decide_activation(ActivationConfig(auto_activation=False), daily).reason == (
        "auto-activation is off"
    )
    already = ActivationConfig(auto_activation=True, already_active=True)
    assert not decide_activation(already, daily).activate
    with pytest.raises(InvalidRequest):
        ActivationConfig(auto_activation=True, threshold=0)


DEVICE_RATES = {"mobile": (0.040, 0.060), "desktop": (0.060, 0.045), "tablet": (0.050, 0.050)}
COUNTRIES = ("us", "fr", "de")


def _synthetic_counts(seed: int = 11, per_cell: int = 3_000) -> list[SegmentVariantCounts]:
    """device changes which variant wins; country (level 2) changes nothing."""
    rng = np.random.default_rng(seed)
    rows = []
    totals: dict[tuple[str, str], list[int]] = {}
    for device, rates in DEVICE_RATES.items():
        for variant, rate in zip(("a", "b"), rates, strict=True):
            device_n = device_c = 0
            for country in COUNTRIES:
                conversions = int(rng.binomial(per_cell, rate))
                rows.append(
                    SegmentVariantCounts(
                        f"device:{device}|country:{country}", variant, per_cell, conversions
                    )
                )
                device_n += per_cell
                device_c += conversions
            rows.append(SegmentVariantCounts(f"device:{device}", variant, device_n, device_c))
            slot = totals.setdefault(("", variant), [0, 0])
            slot[0] += device_n
            slot[1] += device_c
    rows += [SegmentVariantCounts("", v, n, c) for (_, v), (n, c) in totals.items()]
    return rows


def test_recommends_the_dimension_that_differs_and_not_the_null_one() -> None:
    counts = _synthetic_counts()
    recommendation = recommend_segmentation(
        EligibilityConfig(), _days([6_000] * 10), counts, created_at=NOW
    )
    assert recommendation.kind is RecommendationKind.ENABLE_SEGMENTATION
    assert recommendation.dimensions == ("device",)
    assert recommendation.created_at == NOW
    scores = {s.dimension: s for s in recommendation.scores}
    assert scores["device"].significant
    assert scores["device"].p_value is not None and scores["device"].p_value < 1e-6
    assert not scores["country"].significant
    assert scores["country"].p_value is not None and scores["country"].p_value > 0.05 / 2
    assert recommendation.reason.startswith("eligible at 6000 visitors/day; conversion rates")
    json.dumps(recommendation.payload())


def test_dimension_tests_and_benefit_are_what_the_docstring_says() -> None:
    counts = _synthetic_counts()
    scores = {s.dimension: s for s in score_dimensions(counts, 6_000.0, EligibilityConfig())}
    by_device: dict[str, dict[str, tuple[int, int]]] = {}
    for r in counts:
        if r.segment_key.count("|") == 0 and r.segment_key:
            by_device.setdefault(r.segment_key.split(":")[1], {})[r.variant] = (
                r.allocations,
                r.conversions,
            )
    devices = sorted(by_device)
    # one values × (converted, not) table per variant; the chi-squares and dfs add up
    statistic = 0.0
    df = 0
    stacked = 0
    for variant in ("a", "b"):
        table = [
            [by_device[d][variant][1], by_device[d][variant][0] - by_device[d][variant][1]]
            for d in devices
        ]
        chi2, _, dof, _ = sps.chi2_contingency(table, correction=False)
        statistic += chi2
        df += dof
        stacked += sum(sum(row) for row in table)
    assert scores["device"].statistic == pytest.approx(statistic, rel=1e-12)
    assert scores["device"].p_value == pytest.approx(sps.chi2.sf(statistic, df), rel=1e-9)
    assert scores["device"].effect == pytest.approx((statistic / stacked) ** 0.5)
    glob = {r.variant: r.conversions / r.allocations for r in counts if r.segment_key == ""}
    best = max(glob, key=lambda v: glob[v])
    gain = 0.0
    for d in devices:
        rates = {v: c / n for v, (n, c) in by_device[d].items()}
        share = sum(n for n, _ in by_device[d].values()) / stacked
        gain += share * (max(rates.values()) - rates[best])
    assert scores["device"].expected_benefit == pytest.approx(6_000.0 * gain)
    assert scores["device"].expected_benefit > 0


def test_pooling_the_variants_would_have_missed_the_device_effect() -> None:
    # the average rate barely moves across devices: only the winner changes
    counts = _synthetic_counts()
    pooled: dict[str, list[int]] = {}
    for r in counts:
        if r.segment_key.startswith("device:") and "|" not in r.segment_key:
            slot = pooled.setdefault(r.segment_key, [0, 0])
            slot[0] += r.conversions
            slot[1] += r.allocations - r.conversions
    assert sps.chi2_contingency(list(pooled.values()), correction=False)[1] > 0.01


def test_a_quiet_experiment_is_not_eligible() -> None:
    recommendation = recommend_segmentation(
        EligibilityConfig(), _days([300] * 10), _synthetic_counts(), created_at=NOW
    )
    assert recommendation.kind is RecommendationKind.NOT_ELIGIBLE
    assert recommendation.dimensions == ()
    assert recommendation.reason == (
        "300 visitors/day over the last 7 days, below the 1000 needed for segmentation"
    )


def test_too_little_history_is_insufficient_data() -> None:
    recommendation = recommend_segmentation(
        EligibilityConfig(), _days([6_000] * 2), _synthetic_counts(), created_at=NOW
    )
    assert recommendation.kind is RecommendationKind.INSUFFICIENT_DATA


def test_no_signal_when_no_dimension_differs() -> None:
    rng = np.random.default_rng(3)
    counts = [
        SegmentVariantCounts(f"country:{c}", v, 5_000, int(rng.binomial(5_000, 0.05)))
        for c in COUNTRIES
        for v in ("a", "b")
    ]
    recommendation = recommend_segmentation(
        EligibilityConfig(), _days([6_000] * 7), counts, created_at=NOW
    )
    assert recommendation.kind is RecommendationKind.NO_SIGNAL
    assert "tested: country" in recommendation.reason


def test_eligibility_config_validates_itself() -> None:
    with pytest.raises(InvalidRequest):
        EligibilityConfig(alpha=0.0)
    with pytest.raises(InvalidRequest):
        EligibilityConfig(window_days=0)


def test_a_segment_under_half_the_average_alerts() -> None:
    counts = [
        SegmentVariantCounts("", "a", 20_000, 1_000),
        SegmentVariantCounts("", "b", 20_000, 1_000),
        SegmentVariantCounts("source:spam", "a", 1_000, 10),
        SegmentVariantCounts("source:spam", "b", 1_000, 12),
        SegmentVariantCounts("source:ads", "a", 1_000, 45),
        SegmentVariantCounts("source:ads", "b", 1_000, 50),
        SegmentVariantCounts("source:tiny", "a", 100, 0),
    ]
    alerts = underperforming_segments("exp-1", counts)
    assert len(alerts) == 1
    alert = alerts[0]
    assert (alert.kind, alert.severity, alert.subject) == (
        AlertKind.SEGMENT_UNDERPERFORMING,
        Severity.WARNING,
        "source:spam",
    )
    assert alert.message == (
        "segment source:spam of experiment exp-1 converts at 1.10%, under 50% of the "
        "experiment's 5.00% (22/2000)"
    )
    assert underperforming_segments("exp-1", counts[:2]) == ()
    lenient = UnderperformanceSettings(ratio=0.2)
    assert underperforming_segments("exp-1", counts, lenient) == ()


def test_auto_activation_failure_alert() -> None:
    alert = activation_failed_alert(ActivationFailure("exp-7", "store unavailable", NOW))
    assert alert.kind is AlertKind.AUTO_ACTIVATION_FAILED
    assert alert.severity is Severity.CRITICAL
    assert alert.subject == "exp-7"
    assert alert.message == (
        "auto-activation of segmentation failed for experiment exp-7 at "
        "2024-06-11T09:30:00+00:00: store unavailable"
    )


def test_stale_model_alert_after_seven_days() -> None:
    assert stale_model_alert("default v3", NOW - timedelta(days=7), NOW) is None
    alert = stale_model_alert("default v3", NOW - timedelta(days=9, hours=2), NOW)
    assert alert is not None
    assert alert.kind is AlertKind.STALE_MODEL
    assert alert.subject == "default v3"
    assert "is 9 days old" in alert.message
    with pytest.raises(InvalidRequest):
        stale_model_alert("m", datetime(2024, 6, 1), NOW)
