"""A clustering model older than its maximum age raises an alert on the experiments it serves
(`auto` segmentation), through ValidateExperiment and the periodic check behind the metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.insights import Insights
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService
from allocsvc.analytics import AlertKind
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import Engine

MAX_AGE = timedelta(days=7)


async def _insights(trained_days_ago: float | None) -> Insights:
    journal = MemoryJournal()
    service = AllocationService(Engine(), journal, Extractor())
    for key, mode in (("auto", pb.SEGMENTATION_MODE_AUTO), ("manual", pb.SEGMENTATION_MODE_MANUAL)):
        message = pb.Experiment(
            id=key,
            name=key,
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[pb.Variant(id="A", name="A"), pb.Variant(id="B", name="B")],
            segmentation=pb.SegmentationConfig(
                mode=mode, segment_by=["source"] if mode == pb.SEGMENTATION_MODE_MANUAL else []
            ),
        )
        await service.create_experiment(convert.experiment_from_pb(message))

    def deployed() -> tuple[str, datetime, timedelta] | None:
        if trained_days_ago is None:
            return None
        return "v3", datetime.now(UTC) - timedelta(days=trained_days_ago), MAX_AGE

    return Insights(service, journal, deployed_model=deployed)


def _stale(insights: Insights, key: str) -> list[str]:
    return [a.subject for a in insights.validate(key).alerts if a.kind == AlertKind.STALE_MODEL]


@pytest.mark.parametrize(("days", "alerted"), [(8.0, ["v3"]), (6.5, []), (None, [])])
async def test_auto_experiments_are_alerted_of_a_stale_model(
    days: float | None, alerted: list[str]
) -> None:
    insights = await _insights(days)
    assert _stale(insights, "auto") == alerted
    # Experiments not served by the model hear nothing of it.
    assert _stale(insights, "manual") == []


async def test_the_periodic_check_keeps_the_alert_for_the_metrics() -> None:
    insights = await _insights(10.0)
    await insights.run_eligibility_checks()
    kinds = {a.kind for a in insights.alerts.get("auto", ())}
    assert AlertKind.STALE_MODEL in kinds
    assert AlertKind.STALE_MODEL not in {a.kind for a in insights.alerts.get("manual", ())}
