"""Reading back what the write-behind wrote."""

from __future__ import annotations

import asyncpg

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.allocation.service import AllocationService, Assignment
from allocsvc.api import convert
from allocsvc.context import Extractor
from allocsvc.core import Engine, key_hash
from allocsvc.store.postgres import to_signed64
from allocsvc.store.writebehind import PostgresJournal

# The columns an assignment is held with, after its id (`as_row`).
HELD_COLUMNS = (
    "experiment_id, user_id, variant, segment_key, segment_hash, cascade_level, propensity,"
    " (extract(epoch FROM created_at) * 1000)::bigint"
)


async def assignment_rows(dsn: str, columns: str) -> dict[str, tuple[object, ...]]:
    """Every row of `assignments` by id: the id, then `columns` (a SELECT list) in order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT id, {columns} FROM assignments")
    finally:
        await conn.close()
    return {r["id"]: tuple(r.values()) for r in rows}


def as_row(a: Assignment) -> tuple[object, ...]:
    """The id and HELD_COLUMNS of `a` as PostgreSQL has them."""
    return (
        a.id,
        a.handle,
        a.user_id,
        a.variant,
        a.segment_key,
        to_signed64(key_hash(a.segment_key)),
        a.cascade_level,
        a.propensity,
        a.created_ms,
    )


COUNTRIES = ("us", "de", "fr")


async def batch_service(
    journal: PostgresJournal | MemoryJournal,
    experiments: tuple[tuple[str, bool], ...] = (("one", False), ("two", False)),
) -> AllocationService:
    """A service over `journal` with running `experiments` ((key, sticky) pairs; three
    variants, segmented by country)."""
    service = AllocationService(Engine(), journal, Extractor())
    for key, sticky in experiments:
        experiment = pb.Experiment(
            id=key,
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[pb.Variant(id="A"), pb.Variant(id="B"), pb.Variant(id="C")],
            segmentation=pb.SegmentationConfig(
                mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=["country"]
            ),
            sticky=sticky,
        )
        await service.create_experiment(convert.experiment_from_pb(experiment))
    return service


def batch_request(users: range) -> bytes:
    """An AllocateBatch request of `user-<i>` for each i of `users`, the experiments and
    countries taking turns."""
    return pb.AllocateBatchRequest(
        requests=[
            pb.AllocateRequest(
                experiment_id=("one", "two")[i % 2],
                user_id=f"user-{i}",
                context={"country_code": COUNTRIES[i % 3]},
            )
            for i in users
        ]
    ).SerializeToString()
