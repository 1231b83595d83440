"""The experiment's propensity floor in PostgreSQL (migration 006): saved, changed, read back,
0 for rows written without it, and refused by the table when negative."""

from __future__ import annotations

import asyncpg
import pytest

from allocsvc.allocation.experiments import Experiment, Status, Variant
from allocsvc.store import PostgresStore
from allocsvc.store.writebehind import experiment_from_row, experiment_row

pytestmark = pytest.mark.integration


def _experiment(key: str, floor: float) -> Experiment:
    return Experiment(
        key=key,
        name=key,
        variants=(Variant("a", "a"), Variant("b", "b")),
        status=Status.RUNNING,
        propensity_floor=floor,
    )


async def test_the_floor_is_saved_changed_and_read_back(store: PostgresStore) -> None:
    saved = experiment_from_row(
        await store.insert_experiment(experiment_row(_experiment("f", 0.01)))
    )
    assert saved.propensity_floor == 0.01
    await store.update_experiment(experiment_row(saved.with_changes(propensity_floor=0.2)))
    row = await store.get_experiment("f")
    assert row is not None and experiment_from_row(row).propensity_floor == 0.2
    listed = {r.key: experiment_from_row(r) for r in await store.list_experiments()}
    assert listed["f"].propensity_floor == 0.2


async def test_rows_without_a_floor_read_as_off_and_negative_ones_are_refused(
    store: PostgresStore, migrated_db: str
) -> None:
    conn = await asyncpg.connect(migrated_db)
    try:
        await conn.execute("INSERT INTO experiments (key, status) VALUES ('old', 'running')")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO experiments (key, propensity_floor) VALUES ('neg', -0.1)"
            )
    finally:
        await conn.close()
    row = await store.get_experiment("old")
    assert row is not None and row.propensity_floor == 0.0
