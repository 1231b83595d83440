"""A batch's new assignments are held by the store's own thread, off the event loop
(allocsvc_core::holder; its Rust tests check that a lookup holds what that thread has not yet
held, which no test from Python can time)."""

from __future__ import annotations

import asyncio
import time

import pytest
from batch_support import servicer

from allocsvc._proto import allocsvc_pb2 as pb

pytestmark = pytest.mark.unit

USERS = 1_000


def _batch() -> bytes:
    return pb.AllocateBatchRequest(
        requests=[pb.AllocateRequest(experiment_id="e", user_id=f"u{i}") for i in range(USERS)]
    ).SerializeToString()


def _ids(response: bytes) -> list[str]:
    results = pb.AllocateBatchResponse.FromString(response).results
    return [r.allocation.assignment_id for r in results]


async def test_the_store_s_thread_holds_a_batch_nobody_looks_for() -> None:
    service, api = await servicer()
    ids = _ids(await api.AllocateBatchBytes(_batch(), None))  # type: ignore[arg-type]
    held = service._held
    deadline = time.monotonic() + 30  # a hang bound only; it takes milliseconds
    # `pending` is the one reader that holds nothing itself.
    while held.pending:
        assert time.monotonic() < deadline, f"{held.pending} never held"
        await asyncio.sleep(0.001)
    assert len(held) == USERS
    assert all(held.has_id(i) for i in ids)
