"""A region's aggregate counts for the cross-region sync (no user ids ever leave a region)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from allocsvc.regions.model import Region
from allocsvc.store.postgres import PostgresStore

# (experiment key, segment hash as stored (signed), variant, allocations, conversions, value sum)
TotalRow = tuple[str, int, int, int, int, float]

_OWN = """
SELECT e.key, s.segment_hash, s.variant, s.allocations, s.conversions, s.value_sum
FROM segment_variant_state s JOIN experiments e ON e.id = s.experiment_id
ORDER BY 1, 2, 3
"""

_GLOBAL = """
SELECT experiment_key, segment_hash, variant, allocations, conversions, value_sum
FROM v_global_segment_state ORDER BY 1, 2, 3
"""

_REMOTE = """
SELECT experiment_key, segment_hash, variant, sum(allocations)::bigint, sum(conversions)::bigint,
       sum(value_sum)
FROM region_remote_counts GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""

# Totals only grow at their source: keep the largest seen, so a replay changes nothing.
_SAVE_REMOTE = """
INSERT INTO region_remote_counts AS r (source_region, experiment_key, segment_hash, variant,
                                       allocations, conversions, value_sum)
SELECT $1, t.key, t.segment_hash, t.variant, t.allocations, t.conversions, t.value_sum
FROM unnest($2::text[], $3::bigint[], $4::smallint[], $5::bigint[], $6::bigint[], $7::float8[])
     AS t(key, segment_hash, variant, allocations, conversions, value_sum)
ON CONFLICT (source_region, experiment_key, segment_hash, variant) DO UPDATE
SET allocations = GREATEST(r.allocations, EXCLUDED.allocations),
    conversions = GREATEST(r.conversions, EXCLUDED.conversions),
    value_sum   = GREATEST(r.value_sum, EXCLUDED.value_sum),
    updated_at  = now()
"""


class PostgresRegionCounts:
    """Own totals, other regions' latest totals, and their sum, in one region's PostgreSQL."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def own_totals(self) -> list[TotalRow]:
        return [_row(r) for r in await self._store.pool.fetch(_OWN)]

    async def global_totals(self) -> list[TotalRow]:
        return [_row(r) for r in await self._store.pool.fetch(_GLOBAL)]

    async def remote_totals(self) -> list[TotalRow]:
        """Every other region's latest totals, summed per counter."""
        return [_row(r) for r in await self._store.pool.fetch(_REMOTE)]

    async def save_remote(self, source_region: str, rows: Sequence[TotalRow]) -> None:
        if not rows:
            return
        await self._store.pool.execute(
            _SAVE_REMOTE,
            source_region,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
            [r[5] for r in rows],
        )


def _row(r: asyncpg.Record) -> TotalRow:
    return (str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), float(r[5]))


async def save_region(store: PostgresStore, region: Region) -> None:
    """Keep a region's configuration in the `regions` table (upsert by code)."""
    await store.pool.execute(
        "INSERT INTO regions (code, name, countries, postgres_dsn, redis_url, gdpr,"
        " failover_region) VALUES ($1, $2, $3, $4, $5, $6, NULL)"
        " ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name,"
        " countries = EXCLUDED.countries, postgres_dsn = EXCLUDED.postgres_dsn,"
        " redis_url = EXCLUDED.redis_url, gdpr = EXCLUDED.gdpr, updated_at = now()",
        region.code,
        region.name,
        sorted(region.countries),
        region.postgres_dsn,
        region.redis_url,
        region.gdpr,
    )
    if region.failover_region is not None:
        # The failover region must be a row too (foreign key).
        await store.pool.execute(
            "INSERT INTO regions (code) VALUES ($1) ON CONFLICT (code) DO NOTHING",
            region.failover_region,
        )
    await store.pool.execute(
        "UPDATE regions SET failover_region = $2 WHERE code = $1",
        region.code,
        region.failover_region,
    )


async def load_regions(store: PostgresStore) -> list[Region]:
    """Regions kept by `save_region`, by code."""
    rows = await store.pool.fetch(
        "SELECT code, name, countries, postgres_dsn, redis_url, gdpr, failover_region"
        " FROM regions ORDER BY code"
    )
    return [
        Region(
            code=str(r["code"]),
            name=str(r["name"]),
            countries=frozenset(str(c).upper() for c in r["countries"]),
            postgres_dsn=r["postgres_dsn"],
            redis_url=r["redis_url"],
            gdpr=bool(r["gdpr"]),
            failover_region=r["failover_region"],
        )
        for r in rows
    ]
