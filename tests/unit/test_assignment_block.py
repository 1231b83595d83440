"""`assignment_block` builds what the write-behind stores of a block in one pass: the same
compressed COPY stream and filter as `copy_assignments` and `block_filter` build apart."""

from __future__ import annotations

import pytest
from batch_support import servicer

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.journal import MemoryJournal
from allocsvc.core import (
    MadeAssignments,
    assignment_block,
    block_filter,
    copy_assignments,
    decompress_block,
    filter_may_hold_id,
    filter_may_hold_user,
)

pytestmark = pytest.mark.unit


class _Keeping(MemoryJournal):
    """Keeps each batch's new assignments."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[MadeAssignments] = []

    def assignments_made(self, made: MadeAssignments) -> None:
        super().assignments_made(made)
        self.made.append(made)


async def _made(batches: int, users: int) -> list[MadeAssignments]:
    journal = _Keeping()
    _, api = await servicer(journal)
    for b in range(batches):
        request = pb.AllocateBatchRequest(
            requests=[
                pb.AllocateRequest(experiment_id="e", user_id=f"u{b}-{i}") for i in range(users)
            ]
        )
        await api.AllocateBatchBytes(request.SerializeToString(), None)  # type: ignore[arg-type]
    return journal.made


async def test_one_pass_gives_the_stream_and_filter_of_both_apart() -> None:
    made = await _made(3, 200)
    assert [len(m) for m in made] == [200, 200, 200]
    singles = [
        ("s-1", "e", 1, "single-1", 0, "", 0, 0.5, 1_700_000_000_000),
        ("s-2", "e", 1, "single-2", 2, "", 0, 0.25, 1_700_000_000_001),
    ]
    payload, filter_ = assignment_block(made, singles)
    assert payload == copy_assignments(made, singles, compressed=True)
    assert filter_ == block_filter(made, singles)
    stream = decompress_block(payload)
    assert stream == copy_assignments(made, singles)
    for a in [*singles, *made[0].assignments(), *made[2].assignments()]:
        assert filter_may_hold_id(filter_, a[0])
        assert filter_may_hold_user(filter_, a[2], a[3])
    # Without singles, as a flush of batches only writes it.
    payload, filter_ = assignment_block(made)
    assert (payload, filter_) == (copy_assignments(made, compressed=True), block_filter(made))
