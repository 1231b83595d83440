"""Alerts (SPEC §9): pure functions from data to `Alert` values; delivery is another layer's job."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from allocsvc.analytics.segments import GLOBAL_SEGMENT, SegmentVariantCounts
from allocsvc.errors import InvalidRequest

STALE_MODEL_AGE = timedelta(days=7)


class AlertKind(StrEnum):
    SEGMENT_UNDERPERFORMING = "segment_underperforming"
    AUTO_ACTIVATION_FAILED = "auto_activation_failed"
    STALE_MODEL = "stale_model"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Alert:
    """`subject` names what the alert is about: a segment key, an experiment, a model."""

    kind: AlertKind
    severity: Severity
    message: str
    subject: str
    experiment_id: str = ""


@dataclass(frozen=True, slots=True)
class UnderperformanceSettings:
    """A segment alerts below `ratio` × the experiment's rate, once it has `min_allocations` and
    would expect `min_expected_conversions` at the experiment's rate (so noise rarely fires it)."""

    ratio: float = 0.5
    min_allocations: int = 500
    min_expected_conversions: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise InvalidRequest("ratio", "must lie strictly between 0 and 1")
        if self.min_allocations < 1:
            raise InvalidRequest("min_allocations", "must be at least 1")
        if self.min_expected_conversions < 0:
            raise InvalidRequest("min_expected_conversions", "must not be negative")


def underperforming_segments(
    experiment_id: str,
    counts: Sequence[SegmentVariantCounts],
    settings: UnderperformanceSettings | None = None,
) -> tuple[Alert, ...]:
    """Segments converting under `ratio` (½) of the experiment's average, variants pooled.

    Average = global conversions / global allocations (segment ""); a segment's rate pools its
    variants the same way. One WARNING per segment, by segment key.
    """
    settings = settings or UnderperformanceSettings()
    pooled: dict[str, list[int]] = {}
    for row in counts:
        slot = pooled.setdefault(row.segment_key, [0, 0])
        slot[0] += row.allocations
        slot[1] += row.conversions
    glob = pooled.get(GLOBAL_SEGMENT)
    if glob is None or glob[0] == 0 or glob[1] == 0:
        return ()
    average = glob[1] / glob[0]
    alerts = []
    for key, (allocations, conversions) in sorted(pooled.items()):
        if key == GLOBAL_SEGMENT or allocations < settings.min_allocations:
            continue
        if allocations * average < settings.min_expected_conversions:
            continue
        rate = conversions / allocations
        if rate < settings.ratio * average:
            alerts.append(
                Alert(
                    kind=AlertKind.SEGMENT_UNDERPERFORMING,
                    severity=Severity.WARNING,
                    message=(
                        f"segment {key} of experiment {experiment_id} converts at {rate:.2%}, "
                        f"under {settings.ratio:.0%} of the experiment's {average:.2%} "
                        f"({conversions}/{allocations})"
                    ),
                    subject=key,
                    experiment_id=experiment_id,
                )
            )
    return tuple(alerts)


@dataclass(frozen=True, slots=True)
class ActivationFailure:
    """An auto-activation attempt that failed: when, and the error it raised or the reason given."""

    experiment_id: str
    error: str
    at: datetime


def activation_failed_alert(failure: ActivationFailure) -> Alert:
    """A CRITICAL alert: the experiment qualified for segmentation but could not be switched on."""
    return Alert(
        kind=AlertKind.AUTO_ACTIVATION_FAILED,
        severity=Severity.CRITICAL,
        message=(
            f"auto-activation of segmentation failed for experiment {failure.experiment_id} at "
            f"{failure.at.isoformat()}: {failure.error}"
        ),
        subject=failure.experiment_id,
        experiment_id=failure.experiment_id,
    )


def stale_model_alert(
    model: str, created_at: datetime, now: datetime, max_age: timedelta = STALE_MODEL_AGE
) -> Alert | None:
    """A WARNING when the clustering model `model` (e.g. "default v3") is older than `max_age`."""
    if (created_at.tzinfo is None) != (now.tzinfo is None):
        raise InvalidRequest("created_at", "created_at and now must both be aware or both naive")
    age = now - created_at
    if age <= max_age:
        return None
    return Alert(
        kind=AlertKind.STALE_MODEL,
        severity=Severity.WARNING,
        message=(
            f"clustering model {model} is {age.days} days old (created "
            f"{created_at.isoformat()}), older than {max_age.days} days: retrain it"
        ),
        subject=model,
    )
