"""`assignment_block` builds what the write-behind stores of a block in one pass: a compressed
compact stream, whose COPY stream (`decompress_block`) is the one `copy_assignments` builds, and
a filter that every assignment put in passes and few others do (its bits are pinned by the Rust
tests: stored filters must stay readable). Blocks stored before, compressed COPY streams, are
read alike."""

from __future__ import annotations

import pytest
from batch_support import Keeping, servicer

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.core import (
    MadeAssignments,
    assignment_block,
    block_rows_of_ids,
    block_rows_of_users,
    copy_assignments,
    decompress_block,
    filter_may_hold_id,
    filter_may_hold_user,
)

pytestmark = pytest.mark.unit


async def _made(batches: int, users: int) -> list[MadeAssignments]:
    journal = Keeping()
    _, api = await servicer(journal)
    for b in range(batches):
        request = pb.AllocateBatchRequest(
            requests=[
                pb.AllocateRequest(experiment_id="e", user_id=f"u{b}-{i}") for i in range(users)
            ]
        )
        await api.AllocateBatchBytes(request.SerializeToString(), None)  # type: ignore[arg-type]
    return journal.made


def _passing(filter_: bytes, users: list[str], ids: list[str]) -> int:
    """How many of (experiment 1, each user) and of the ids pass `filter_`."""
    return sum(filter_may_hold_user(filter_, 1, u) for u in users) + sum(
        filter_may_hold_id(filter_, i) for i in ids
    )


async def test_one_pass_gives_the_stream_and_a_filter_of_its_assignments() -> None:
    made = await _made(3, 200)
    assert [len(m) for m in made] == [200, 200, 200]
    singles = [
        ("s-1", "e", 1, "single-1", 0, "", 0, 0.5, 1_700_000_000_000),
        ("s-2", "e", 1, "single-2", 2, "", 0, 0.25, 1_700_000_000_001),
    ]
    payload, filter_ = assignment_block(made, singles)
    # Stored compact, read back as the COPY stream of the same rows in the same order.
    stream = decompress_block(payload)
    assert stream == copy_assignments(made, singles)
    assert len(payload) < len(copy_assignments(made, singles, compressed=True))
    held = [*singles, *(a for m in made for a in m.assignments())]
    assert len(held) == 602
    for a in held:
        assert filter_may_hold_id(filter_, a[0])
        assert filter_may_hold_user(filter_, a[2], a[3])
    # 16 bits per key (a user each, and the singles' ids), in lines of 64 bytes; the batches'
    # ids, which run on from one batch to the next, as one range after them (24 bytes, then
    # the count of ranges and a tag, 12).
    assert len(filter_) == -(-(602 + 2) * 16 // 512) * 64 + 24 + 12
    ids = sorted(int(a[0].rsplit("-", 1)[1], 16) for m in made for a in m.assignments())
    assert ids == list(range(ids[0], ids[0] + 600))
    prefix = made[0].assignments()[0][0].rsplit("-", 1)[0]
    others = [f"other-{i}" for i in range(2000)]
    beyond = [f"{prefix}-{n:x}" for n in range(ids[-1] + 1, ids[-1] + 201)]
    assert _passing(filter_, others, others + beyond) < 4_200 // 100
    # Without singles, as a flush of batches only writes it: their keys are not in it.
    payload, filter_ = assignment_block(made)
    assert decompress_block(payload) == copy_assignments(made)
    assert _passing(filter_, ["single-1", "single-2"], ["s-1", "s-2"]) < 4
    assert all(filter_may_hold_id(filter_, a[0]) for m in made for a in m.assignments())


async def test_compact_and_earlier_blocks_are_read_alike() -> None:
    made = await _made(2, 300)
    singles = [("s-1", "e", 1, "u1-7", 1, "", 0, 0.5, 1_700_000_000_000)]
    compact, _ = assignment_block(made, singles)
    earlier = copy_assignments(made, singles, compressed=True)
    assert compact != earlier
    users = ["u0-3", "u1-7", "nobody"]
    found = block_rows_of_users(compact, 1, users)
    assert found == block_rows_of_users(earlier, 1, users)
    assert sorted(r[2] for r in found) == ["u0-3", "u1-7", "u1-7"]
    ids = [found[-1][0], "s-1", "no-such-id"]  # a batch's row (singles come first), the single
    assert block_rows_of_ids(compact, ids) == block_rows_of_ids(earlier, ids)
    assert len(block_rows_of_ids(compact, ids)) == 2


async def test_a_damaged_compact_block_is_refused() -> None:
    payload, _ = assignment_block(await _made(1, 50))
    stream = decompress_block(payload)
    assert stream.startswith(b"PGCOPY")
    # Cut short, its length in front no longer matches; a flipped byte in the stream itself.
    for damaged in (payload[:-10], payload[:4] + b"\0" + payload[5:]):
        with pytest.raises(ValueError, match="not an assignment block"):
            decompress_block(damaged)
