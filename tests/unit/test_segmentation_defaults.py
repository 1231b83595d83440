"""The server's segmentation defaults: filled where an experiment leaves a setting unset."""

from __future__ import annotations

import pytest

from allocsvc.allocation.experiments import (
    Experiment,
    Hierarchy,
    Segmentation,
    SegmentationDefaults,
    SegmentationMode,
    Variant,
)
from allocsvc.errors import InvalidRequest

pytestmark = pytest.mark.unit

DEFAULTS = SegmentationDefaults(
    context_features=("country", "device", "source"),
    min_samples_per_segment=40,
    hierarchy_levels=("country", "device", "source"),
    max_depth=2,
)


def _experiment(mode: SegmentationMode, *segment_by: str, **changes: object) -> Experiment:
    return Experiment(
        key="e",
        name="e",
        variants=(Variant("a", "a"), Variant("b", "b")),
        segmentation=Segmentation(mode=mode, segment_by=segment_by),
        **changes,  # type: ignore[arg-type]
    )


def test_unset_settings_are_filled() -> None:
    filled = DEFAULTS.fill(_experiment(SegmentationMode.MANUAL))
    assert filled.dimensions == ("country", "device", "source")
    assert filled.min_samples == (40, 40, 40)
    assert filled.hierarchy.max_depth == 2


def test_given_settings_win() -> None:
    given = _experiment(
        SegmentationMode.MANUAL,
        "device",
        hierarchy=Hierarchy(min_samples_per_level=(5,), max_depth=0),
    )
    assert DEFAULTS.fill(given) == given
    assert DEFAULTS.fill(given).min_samples == (5,)


def test_disabled_experiments_are_left_alone() -> None:
    disabled = _experiment(SegmentationMode.DISABLED)
    assert DEFAULTS.fill(disabled) == disabled
    assert DEFAULTS.served(disabled) is disabled


def test_plain_defaults_change_nothing() -> None:
    manual = _experiment(SegmentationMode.MANUAL, "hour", "channel")
    plain = SegmentationDefaults()
    assert plain.fill(manual) == manual
    plain.check(manual)
    assert plain.served(manual) is manual


def test_dimensions_outside_context_features() -> None:
    manual = _experiment(SegmentationMode.MANUAL, "device", "hour")
    with pytest.raises(InvalidRequest) as err:
        DEFAULTS.check(manual)
    assert err.value.field == "experiment.segmentation.segment_by[1]"
    # Stored before the limit: served from the global posteriors.
    assert DEFAULTS.served(manual).dimensions == ()
    assert manual.dimensions == ("device", "hour")


def test_contextual_off_serves_global_only() -> None:
    off = SegmentationDefaults(contextual=False)
    for experiment in (
        _experiment(SegmentationMode.MANUAL, "device"),
        _experiment(SegmentationMode.AUTO),
    ):
        served = off.served(experiment)
        assert served.dimensions == () and served.min_samples == ()
        assert served.segmentation.segment_by == experiment.segmentation.segment_by
