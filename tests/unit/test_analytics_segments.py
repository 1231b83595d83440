"""Segment analyzer: statistics against statsmodels, anomalies, performers and recommendations."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_effectsize, proportions_ztest

from allocsvc.analytics.segments import (
    AnomalyKind,
    Correction,
    SegmentAnalysisSettings,
    SegmentVariantCounts,
    analyze_segments,
    dimension_marginals,
    key_levels,
    parent_key,
)
from allocsvc.errors import InvalidRequest

pytestmark = pytest.mark.unit

Row = SegmentVariantCounts

# Variant b converts 65 % above global on mobile/instagram; the other segments are ordinary.
DATASET = [
    Row("", "a", 40_000, 2_000),
    Row("", "b", 40_000, 2_200),
    Row("device:desktop", "a", 20_000, 1_010),
    Row("device:desktop", "b", 20_000, 1_080),
    Row("device:mobile", "a", 16_000, 790),
    Row("device:mobile", "b", 16_000, 960),
    Row("device:tablet", "a", 4_000, 200),
    Row("device:tablet", "b", 4_000, 160),
    Row("device:mobile|source:instagram", "a", 3_000, 148),
    Row("device:mobile|source:instagram", "b", 3_000, 272),
    Row("device:mobile|source:google", "a", 9_000, 455),
    Row("device:mobile|source:google", "b", 9_000, 480),
    Row("device:mobile|source:email", "a", 60, 3),
    Row("device:mobile|source:email", "b", 60, 4),
]


def test_keys_parents_and_levels() -> None:
    assert parent_key("device:mobile|source:instagram") == "device:mobile"
    assert parent_key("device:mobile") == ""
    assert parent_key("") == ""
    assert key_levels("country:us|device:mobile") == (("country", "us"), ("device", "mobile"))
    assert key_levels("") == ()


def test_statistics_match_statsmodels_segment_vs_rest_of_traffic() -> None:
    analysis = analyze_segments(DATASET)
    glob = {r.variant: r for r in DATASET if r.segment_key == ""}
    tested = [r for r in analysis.results if r.reason is None]
    assert len(tested) == 10
    for result in tested:
        g = glob[result.variant]
        rest_c = g.conversions - result.conversions
        rest_n = g.allocations - result.allocations
        z_ref, p_ref = proportions_ztest([result.conversions, rest_c], [result.allocations, rest_n])
        assert result.z == pytest.approx(z_ref, rel=1e-12)
        assert result.p_value == pytest.approx(p_ref, rel=1e-10)
        rate = result.conversions / result.allocations
        assert result.conversion_rate == pytest.approx(rate)
        global_rate = g.conversions / g.allocations
        assert result.lift == pytest.approx((rate - global_rate) / global_rate)
        assert result.cohens_h == pytest.approx(proportion_effectsize(rate, rest_c / rest_n))
    p_values = [r.p_value for r in tested]
    np.testing.assert_allclose(
        [r.p_bonferroni for r in tested], multipletests(p_values, method="bonferroni")[1]
    )
    np.testing.assert_allclose(
        [r.p_holm for r in tested], multipletests(p_values, method="holm")[1]
    )


def test_high_performers_underperformers_and_recommendations() -> None:
    analysis = analyze_segments(DATASET)
    assert analysis.reason is None
    top = analysis.high_performers[0]
    assert (top.segment_key, top.variant) == ("device:mobile|source:instagram", "b")
    assert top.lift == pytest.approx(272 / 3000 / (2200 / 40000) - 1)
    assert top.significant
    assert [(r.segment_key, r.variant) for r in analysis.underperformers] == [
        ("device:tablet", "b")
    ]
    assert analysis.recommendations[0] == (
        "device:mobile|source:instagram converts 65% above global on variant b "
        "(9.07% vs 5.50%, adjusted p < 0.001): consider a segment-specific default."
    )
    assert analysis.recommendations[1] == (
        "device:tablet converts 27% below global on variant b (4.00% vs 5.50%, adjusted "
        "p < 0.001): review what this segment is shown on b."
    )
    # mobile converts 9 % above global on b: significant, but under the 10 % minimum lift
    mobile_b = next(
        r for r in analysis.results if (r.segment_key, r.variant) == ("device:mobile", "b")
    )
    assert mobile_b.significant
    assert [(r.segment_key, r.variant) for r in analysis.high_performers] == [
        ("device:mobile|source:instagram", "b")
    ]
    assert analyze_segments(list(reversed(DATASET))) == analysis


def test_thin_segments_are_reported_with_a_reason() -> None:
    analysis = analyze_segments(DATASET)
    email = [r for r in analysis.results if r.segment_key == "device:mobile|source:email"]
    assert len(email) == 2
    for r in email:
        assert r.reason == "not enough data: 60 allocations, fewer than 100"
        assert r.p_value is None
        assert not r.significant
        assert r.conversion_rate == pytest.approx(r.conversions / 60)


def test_bonferroni_is_stricter_than_holm() -> None:
    holm = analyze_segments(DATASET, SegmentAnalysisSettings(correction=Correction.HOLM))
    bonf = analyze_segments(DATASET, SegmentAnalysisSettings(correction=Correction.BONFERRONI))
    assert {(r.segment_key, r.variant) for r in bonf.results if r.significant} <= {
        (r.segment_key, r.variant) for r in holm.results if r.significant
    }


def test_nothing_to_analyze_is_a_result_with_a_reason() -> None:
    assert analyze_segments([]).reason == "not enough data: no global counts"
    only_global = analyze_segments([Row("", "a", 100, 5)])
    assert only_global.reason == "not enough data: no segment counts"
    thin = analyze_segments([Row("", "a", 1000, 50), Row("device:mobile", "a", 30, 2)])
    assert thin.reason == "not enough data: no segment has 100 allocations on a variant"
    no_global = analyze_segments([Row("", "a", 1000, 50), Row("device:mobile", "b", 300, 20)])
    assert no_global.results[0].reason == "no global counts for variant b"
    whole = analyze_segments([Row("", "a", 1000, 50), Row("device:mobile", "a", 950, 48)])
    assert whole.results[0].reason is not None
    assert "rest of the traffic" in whole.results[0].reason


def _siblings(outlier_conversions: int) -> list[SegmentVariantCounts]:
    conversions = [100, 104, 98, 101, 97, 103, outlier_conversions]
    rows = [Row(f"country:us|source:s{i}", "a", 2_000, c) for i, c in enumerate(conversions)]
    total_c = sum(conversions)
    return [Row("", "a", 30_000, total_c + 700), Row("country:us", "a", 14_000, total_c), *rows]


def test_mad_flags_a_planted_outlier_and_not_the_rest() -> None:
    analysis = analyze_segments(_siblings(outlier_conversions=300))
    sibling = [a for a in analysis.anomalies if a.kind is AnomalyKind.SIBLINGS]
    assert [(a.segment_key, a.variant) for a in sibling] == [("country:us|source:s6", "a")]
    assert sibling[0].score > 3.5
    assert sibling[0].reference == pytest.approx(101 / 2000)
    assert any("far from its siblings under country:us" in r for r in analysis.recommendations)


def test_no_anomaly_without_an_outlier() -> None:
    assert analyze_segments(_siblings(outlier_conversions=99)).anomalies == ()


def test_a_departure_from_the_segments_own_history_is_flagged() -> None:
    history = {
        ("device:desktop", "a"): [0.030, 0.031, 0.029, 0.032, 0.030, 0.028, 0.031],
        ("device:desktop", "b"): [0.052, 0.055, 0.053, 0.054, 0.056, 0.052, 0.055],
        ("device:mobile", "a"): [0.05, 0.05, 0.05],  # too short to judge
    }
    analysis = analyze_segments(DATASET, history=history)
    flagged = [a for a in analysis.anomalies if a.kind is AnomalyKind.HISTORY]
    assert [(a.segment_key, a.variant) for a in flagged] == [("device:desktop", "a")]
    assert flagged[0].reference == pytest.approx(0.030)
    assert any("far from its recent daily rates" in r for r in analysis.recommendations)


def test_inputs_validate_themselves() -> None:
    with pytest.raises(InvalidRequest):
        Row("device:mobile", "a", 10, 11)
    with pytest.raises(InvalidRequest):
        analyze_segments([Row("", "a", 10, 1), Row("", "a", 10, 1)])
    with pytest.raises(InvalidRequest):
        SegmentAnalysisSettings(alpha=1.5)
    with pytest.raises(InvalidRequest):
        SegmentAnalysisSettings(min_siblings=2)


def test_dimension_marginals_sum_the_keys_ending_in_each_value() -> None:
    rows = [
        Row("", "a", 300, 30),
        Row("country:us", "a", 200, 20),
        Row("country:fr", "a", 100, 10),
        Row("country:us|device:mobile", "a", 120, 15),
        Row("country:us|device:desktop", "a", 80, 5),
        Row("country:fr|device:mobile", "a", 60, 4),
        Row("country:fr|device:desktop", "a", 40, 6),
    ]
    marginals = {
        (m.dimension, m.value): (m.allocations, m.conversions) for m in dimension_marginals(rows)
    }
    assert marginals == {
        ("country", "fr"): (100, 10),
        ("country", "us"): (200, 20),
        ("device", "desktop"): (120, 11),
        ("device", "mobile"): (180, 19),
    }
