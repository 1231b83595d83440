"""The session Redis fixture serves real Redis commands to redis.asyncio clients."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

pytestmark = pytest.mark.integration


async def test_set_and_get(fresh_redis: str) -> None:
    client = aioredis.Redis.from_url(fresh_redis)
    try:
        assert await client.ping()
        await client.set("allocsvc:test", "value", ex=60)
        assert await client.get("allocsvc:test") == b"value"
        assert await client.incrby("allocsvc:counter", 5) == 5
    finally:
        await client.aclose()


async def test_each_test_starts_empty(fresh_redis: str) -> None:
    client = aioredis.Redis.from_url(fresh_redis)
    try:
        assert await client.dbsize() == 0
    finally:
        await client.aclose()
