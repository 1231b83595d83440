"""What the dashboard shows, as plain JSON-ready data, read from the live service.

Every method runs on the server's event loop (the allocation service is not thread-safe); the
HTTP threads reach it through `asyncio.run_coroutine_threadsafe`.
"""

from __future__ import annotations

import logging
from typing import Any

from allocsvc.allocation.insights import Insights
from allocsvc.allocation.service import AllocationService
from allocsvc.dashboard.history import ShareHistory
from allocsvc.errors import AllocsvcError
from allocsvc.hierarchy import render_html

log = logging.getLogger(__name__)

# Segments listed per experiment, most allocated first.
MAX_SEGMENTS = 200


def _rate(conversions: int, allocations: int) -> float | None:
    return conversions / allocations if allocations else None


class DashboardData:
    def __init__(
        self, service: AllocationService, insights: Insights, history: ShareHistory
    ) -> None:
        self._service = service
        self._insights = insights
        self.history = history

    async def sample_history(self) -> None:
        """Record every experiment's allocation totals (the scheduler's job)."""
        for experiment in self._service.list_experiments():
            totals = self._variant_totals(experiment.key)
            self.history.record(experiment.key, [a for _, a, _ in totals])

    def _variant_totals(self, key: str) -> list[tuple[str, int, int]]:
        """(variant id, allocations, conversions) of the global segment."""
        experiment = self._service.get_experiment(key)
        overall = next((s for s in self._insights.segments(key) if s.segment_key == ""), None)
        if overall is None:
            return [(v.key, 0, 0) for v in experiment.variants]
        return [(vid, a, c) for vid, a, c, _ in overall.variants]

    async def overview(self) -> dict[str, Any]:
        experiments = []
        for experiment in self._service.list_experiments():
            totals = self._variant_totals(experiment.key)
            allocations = sum(a for _, a, _ in totals)
            experiments.append(
                {
                    "id": experiment.key,
                    "name": experiment.name,
                    "status": str(experiment.status),
                    "policy": str(experiment.policy),
                    "segment_by": list(experiment.dimensions),
                    "allocations": allocations,
                    "conversions": sum(c for _, _, c in totals),
                    "variants": self._variants(totals),
                    "alerts": len(self._insights.alerts.get(experiment.key, ())),
                }
            )
        return {"experiments": experiments}

    @staticmethod
    def _variants(totals: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
        allocations = sum(a for _, a, _ in totals)
        return [
            {
                "id": vid,
                "allocations": a,
                "conversions": c,
                "conversion_rate": _rate(c, a),
                "share": a / allocations if allocations else None,
            }
            for vid, a, c in totals
        ]

    async def experiment(self, key: str) -> dict[str, Any]:
        """Everything about one experiment; NotFound for an unknown key."""
        experiment = self._service.get_experiment(key)
        totals = self._variant_totals(key)
        segments = sorted(
            self._insights.segments(key),
            key=lambda s: (-sum(a for _, a, _, _ in s.variants), s.segment_key),
        )
        validation = self._insights.validate(key)
        try:
            recommendations = await self._insights.recommendations(key, None)
        except AllocsvcError:
            recommendations = []
        return {
            "id": experiment.key,
            "name": experiment.name,
            "description": experiment.description,
            "status": str(experiment.status),
            "policy": str(experiment.policy),
            "segment_by": list(experiment.dimensions),
            "variants": self._variants(totals),
            "segments": [
                {
                    "segment_key": s.segment_key,
                    "level": s.level,
                    "variants": [
                        {
                            "id": vid,
                            "allocations": a,
                            "conversions": c,
                            "conversion_rate": _rate(c, a),
                        }
                        for vid, a, c, _ in s.variants
                    ],
                }
                for s in segments[:MAX_SEGMENTS]
            ],
            "segments_total": len(segments),
            "cascade": [
                {"level": u.level, "name": u.name, "allocations": u.allocations, "share": u.share}
                for u in self._insights.cascade(key).levels
            ],
            "alerts": [
                {
                    "kind": str(a.kind),
                    "severity": str(a.severity),
                    "message": a.message,
                    "subject": a.subject,
                }
                for a in validation.alerts
            ],
            "early_stopping": validation.early_stopping.reason,
            "recommendations": [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "dimensions": list(r.dimensions),
                    "reason": r.reason,
                    "status": r.status,
                    "created_at_ms": r.created_ms,
                }
                for r in recommendations[:20]
            ],
            "history": self._history(key, [vid for vid, _, _ in totals]),
        }

    def _history(self, key: str, variant_ids: list[str]) -> dict[str, Any]:
        sampled = self.history.points(key)
        return {
            "variants": variant_ids,
            # Allocations counted by the newest sample (how far the chart has caught up).
            "sampled_allocations": sum(sampled[-1].allocations) if sampled else 0,
            "points": [
                {"at_ms": at, "shares": list(shares)} for at, shares in self.history.shares(key)
            ],
        }

    async def tree_html(self, key: str) -> str | None:
        """The segment tree as a self-contained HTML page; None without segmentation (or
        with contextual bandits off in this server)."""
        experiment = self._service.served_experiment(key)
        if not experiment.dimensions:
            return None
        built = await self._insights.tree(key)
        return render_html(built.tree, title=f"Segment tree of {experiment.key}")
