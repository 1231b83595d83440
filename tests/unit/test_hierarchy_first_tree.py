"""Until its first segment tree an experiment is served from its global node (SPEC §4: the cascade
uses nodes present in the current tree, and before the first tree none is); trees follow the
allocations (the allocation service wakes the growth check) and come back after a restart."""

from __future__ import annotations

import asyncio

import pytest

from allocsvc.allocation.experiments import (
    Experiment,
    Segmentation,
    SegmentationMode,
    Status,
    Variant,
)
from allocsvc.allocation.insights import Insights
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationRequest, AllocationService
from allocsvc.context import Extractor
from allocsvc.core import Engine, key_hash

pytestmark = pytest.mark.unit

# Per source, (allocations, conversions) of A and B: instagram converts far better on B,
# google on A. Both pass the minimum of 10; the tree keeps both.
COUNTS = {
    "source:instagram": ((2000, 60), (2000, 240)),
    "source:google": ((2000, 240), (2000, 60)),
}


def _experiment(key: str) -> Experiment:
    return Experiment(
        key=key,
        name=key,
        variants=(Variant(key="A", name="A"), Variant(key="B", name="B")),
        status=Status.RUNNING,
        segmentation=Segmentation(
            mode=SegmentationMode.MANUAL, segment_by=("source",), min_samples_per_segment=10
        ),
        sticky=False,
    )


def _rows(handle: int) -> list[tuple[int, int, int, int, int, float]]:
    """The store's counter rows of COUNTS: every allocation counted at global and its source."""
    rows = []
    for variant in range(2):
        total_a = sum(c[variant][0] for c in COUNTS.values())
        total_c = sum(c[variant][1] for c in COUNTS.values())
        rows.append((handle, key_hash(""), variant, total_a, total_c, 0.0))
        for key, counts in COUNTS.items():
            a, c = counts[variant]
            rows.append((handle, key_hash(key), variant, a, c, 0.0))
    return rows


async def _levels(service: AllocationService, key: str, users: int = 20) -> set[int]:
    levels = set()
    for i in range(users):
        allocation = await service.allocate(
            AllocationRequest(key, f"user-{key}-{i}", "web", {"utm_source": "instagram"})
        )
        levels.add(allocation.assignment.cascade_level)
    return levels


async def _service(*, global_first: bool) -> tuple[AllocationService, Insights, MemoryJournal]:
    journal = MemoryJournal()
    service = AllocationService(Engine(), journal, Extractor())
    if global_first:
        service.global_until_first_tree()
    return service, Insights(service, journal), journal


async def _with_counts(service: AllocationService, key: str) -> Experiment:
    experiment = await service.create_experiment(_experiment(key))
    segments = [(experiment.handle, k) for k in COUNTS]
    service.restore([], _rows(experiment.handle), [], segments)
    return experiment


async def test_served_globally_until_the_first_tree_then_by_its_kept_nodes() -> None:
    service, insights, _ = await _service(global_first=True)
    await _with_counts(service, "exp")
    # Both sources have far more than their minimum, but no tree has been built yet.
    assert await _levels(service, "exp") == {0}
    built = await insights.rebuild_tree("exp")
    assert {n.key for n in built.tree.kept_nodes()} == {"", *COUNTS}
    assert await _levels(service, "exp") == {1}
    # Changing the experiment installs it again; its tree stays.
    await service.update_experiment("exp", {"name": "renamed"})
    assert await _levels(service, "exp") == {1}


async def test_without_automatic_trees_every_node_serves() -> None:
    service, _, _ = await _service(global_first=False)
    await _with_counts(service, "exp")
    assert await _levels(service, "exp") == {1}


async def test_experiments_installed_later_wait_for_their_own_tree() -> None:
    service, insights, _ = await _service(global_first=False)
    await _with_counts(service, "early")
    await insights.rebuild_tree("early")
    # Switched on later (as the server does once trees are rebuilt automatically): the early
    # experiment keeps its tree, a new one waits for its own.
    service.global_until_first_tree()
    await _with_counts(service, "late")
    assert await _levels(service, "early") == {1}
    assert await _levels(service, "late") == {0}
    await insights.rebuild_tree("late")
    assert await _levels(service, "late") == {1}


async def test_a_restart_rebuilds_the_trees_of_experiments_with_allocations() -> None:
    service, _, journal = await _service(global_first=True)
    experiment = await _with_counts(service, "busy")
    idle = await service.create_experiment(_experiment("idle"))
    # A restarted process: the same experiments and counts, read back from the store.
    restarted = AllocationService(Engine(), journal, Extractor())
    restarted.global_until_first_tree()
    segments = [(experiment.handle, k) for k in COUNTS]
    restarted.restore([experiment, idle], _rows(experiment.handle), [], segments)
    assert await _levels(restarted, "busy") == {0}
    again = Insights(restarted, journal)
    await again.rebuild_restored()
    assert await _levels(restarted, "busy") == {1}
    assert experiment.handle in journal.trees
    # Nothing allocated yet: no tree to rebuild.
    assert idle.handle not in journal.trees
    assert await _levels(restarted, "idle") == {0}


async def test_allocations_wake_the_growth_check() -> None:
    service, _, _ = await _service(global_first=True)
    await service.create_experiment(_experiment("exp"))
    other = await service.create_experiment(_experiment("other"))
    woken: list[set[int]] = []
    service.on_growth(woken.append, every=50)
    await _levels(service, "exp", users=120)
    # Each call names the experiments allocated in since the last one, not every experiment.
    assert len(woken) == 2
    assert all(other.handle not in handles for handles in woken)
    assert woken[0] and all(len(handles) == 1 for handles in woken)


async def test_a_woken_growth_check_builds_the_first_tree_at_once() -> None:
    service, _, journal = await _service(global_first=True)
    experiment = await _with_counts(service, "exp")
    # The check would otherwise wait an hour; being woken it runs now.
    insights = Insights(service, journal, first_rebuild_at=1000, growth_check_interval=3600)
    service.on_growth(insights.wake_growth, every=10)
    assert await _levels(service, "exp", users=10) == {0}
    await asyncio.wait_for(insights.rebuild_grown_on_wake(), timeout=60)
    assert experiment.handle in journal.trees
    assert await _levels(service, "exp") == {1}
