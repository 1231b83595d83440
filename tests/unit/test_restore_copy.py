"""A restart reads each experiment's stored assignments as a binary COPY stream straight into
the held store (`HeldAssignments.add_copied` through `CopyPieces`): the stream is encoded here
in Python, cut into pieces of every size, and what is held is compared field by field."""

from __future__ import annotations

import asyncio
import struct

import pytest

from allocsvc.core import RESTORE_COPY_COLUMNS, HeldAssignments
from allocsvc.store.writebehind import CopyPieces

HANDLE = 7
POSTGRES_EPOCH_MS = 946_684_800_000
# (id, user, variant, segment key, level, propensity or None, created_at in PostgreSQL µs)
ROWS = [
    ("a-1", "alice", 0, "source:ads", 1, 0.5, 1_000_000),
    ("a-2", "bob", 2, "source:ads|device:ios", 2, None, 2_500_000),
    ("a-3", "alice", 1, "", 0, 0.125, 3_000_999),
    ("a-4", "zoë", 4, "source:ads", 1, 1.0, -2_000),
]


def stream(rows: list[tuple[str, str, int, str, int, float | None, int]]) -> bytes:
    out = bytearray(b"PGCOPY\n\xff\r\n\0" + struct.pack(">ii", 0, 0))

    def text(value: str) -> None:
        data = value.encode()
        out.extend(struct.pack(">i", len(data)) + data)

    for ident, user, variant, key, level, propensity, created in rows:
        out.extend(struct.pack(">h", len(RESTORE_COPY_COLUMNS)))
        text(ident)
        text(user)
        out.extend(struct.pack(">ih", 2, variant))
        text(key)
        out.extend(struct.pack(">ih", 2, level))
        if propensity is None:
            out.extend(struct.pack(">i", -1))
        else:
            out.extend(struct.pack(">id", 8, propensity))
        out.extend(struct.pack(">iq", 8, created))
    out.extend(struct.pack(">h", -1))
    return bytes(out)


def feed(data: bytes, size: int, held: HeldAssignments) -> tuple[CopyPieces, list[str]]:
    """`data` fed to a CopyPieces over `held` in bytearray pieces of `size` (as asyncpg gives
    them); the segment keys the pieces reported."""
    keys: list[str] = []

    def read(piece: bytes, at_start: bool) -> tuple[int, int, bool]:
        consumed, rows, new_keys, ended = held.add_copied(HANDLE, piece, at_start)
        keys.extend(new_keys)
        return consumed, rows, ended

    pieces = CopyPieces(read)

    async def run() -> None:
        for at in range(0, len(data), size):
            await pieces.feed(bytearray(data[at : at + size]))

    asyncio.run(run())
    return pieces, keys


@pytest.mark.parametrize("size", [1, 2, 5, 19, 20, 33, 64, 10_000])
def test_pieces_of_any_size_hold_every_row_as_stored(size: int) -> None:
    held = HeldAssignments("new", 0)
    held.name(HANDLE, "checkout")
    pieces, keys = feed(stream(ROWS), size, held)
    assert pieces.finish() == len(ROWS)
    assert len(held) == len(ROWS)
    # Each piece reports its distinct keys; over all pieces, every key is among them.
    assert set(keys) == {"source:ads", "source:ads|device:ios", ""}
    for ident, user, variant, key, level, propensity, created in ROWS:
        assert held.by_id(ident) == (
            ident,
            "checkout",
            HANDLE,
            user,
            variant,
            key,
            level,
            0.0 if propensity is None else propensity,
            created // 1000 + POSTGRES_EPOCH_MS,
        )
    # Oldest first: the later row of a user is the latest.
    latest = held.latest(HANDLE, "alice")
    assert latest is not None and latest[0] == "a-3"


def test_a_stream_that_stops_early_is_an_error() -> None:
    data = stream(ROWS)
    pieces, _ = feed(data[:-5], 7, HeldAssignments("new", 0))
    with pytest.raises(ValueError, match="stopped early"):
        pieces.finish()
    # Without its trailer, every row was read but the end never came.
    pieces, _ = feed(data[:-2], 7, HeldAssignments("new", 0))
    with pytest.raises(ValueError, match="stopped early"):
        pieces.finish()


def test_a_bad_stream_is_raised_by_finish_not_by_feed() -> None:
    # An exception in asyncpg's output makes it cancel the COPY, which may never end: feed
    # keeps the error, reads nothing more, and finish raises it.
    calls: list[int] = []
    held = HeldAssignments("new", 0)

    def read(piece: bytes, at_start: bool) -> tuple[int, int, bool]:
        calls.append(len(piece))
        consumed, rows, _, ended = held.add_copied(HANDLE, piece, at_start)
        return consumed, rows, ended

    pieces = CopyPieces(read)
    bad = bytearray(stream(ROWS))
    bad[0:6] = b"NOTCOP"

    async def run() -> None:
        await pieces.feed(bad)
        await pieces.feed(bytearray(b"more"))

    asyncio.run(run())
    assert calls == [len(bad)]
    with pytest.raises(ValueError, match="not a binary COPY stream"):
        pieces.finish()
    assert len(held) == 0
