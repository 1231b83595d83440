"""Closing the shared Redis state ends its sync loop even when a cancellation is lost in a
Redis call, and still pushes what was buffered."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeout

from allocsvc.store.pump import CountRow, DeltaPump
from allocsvc.store.redis import RedisShared

pytestmark = pytest.mark.integration

NAMESPACE = "close-test"


class StallsOnce(RedisShared):
    """The first push stalls like a slow round trip; cancelled there, it raises one of
    redis-py's errors instead of CancelledError, as a replica's sync loop once lost its
    cancellation inside a redis-py call. The loop catches that as a Redis error and goes on."""

    def __init__(self, url: str) -> None:
        super().__init__(url, namespace=NAMESPACE, push_interval=0.01, refresh_interval=3600)
        self.stalled = asyncio.Event()
        self.swallowed = 0

    async def push(self) -> None:
        if not self.stalled.is_set():
            self.stalled.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.swallowed += 1
                raise RedisTimeout("Timeout reading from socket") from None
        await super().push()


async def test_close_ends_a_sync_loop_that_lost_its_cancellation(fresh_redis: str) -> None:
    deltas: list[CountRow] = []
    shared = StallsOnce(fresh_redis)
    shared.bind(
        DeltaPump(lambda: [deltas.pop()] if deltas else []),
        load_counts=lambda rows: None,
        snapshot=lambda handle: [],
        experiments=list,
        on_health=lambda healthy: None,
    )
    shared.start()
    await asyncio.wait_for(shared.stalled.wait(), timeout=30)
    deltas.append((7, 11, 0, 3, 1, 0.0))
    # Waited on, not cancelled from outside: a close that hangs stays pending (30 s is only
    # the bound of a hang; a close takes about a second here).
    closing = asyncio.create_task(shared.close())
    done, _ = await asyncio.wait({closing}, timeout=30)
    try:
        assert closing in done, "close() did not end the sync loop"
        closing.result()
        assert shared.swallowed == 1
        client = aioredis.Redis.from_url(fresh_redis)
        try:
            counts = await client.hgetall(f"{NAMESPACE}:{{x7}}:counts")
        finally:
            await client.aclose()
        assert counts == {b"11:0:a": b"3", b"11:0:c": b"1"}
    finally:
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
