"""A batch's users looked up in the held store in one call each: the latest assignment of
those held (by position), and which users not held may have one in the durable store."""

from __future__ import annotations

import pytest

from allocsvc.core import HeldAssignments

pytestmark = pytest.mark.unit


def _held(i: int, handle: int = 1) -> tuple[str, str, int, str, int, str, int, float, int]:
    return (f"p-{i:x}", "exp", handle, f"user-{i}", i % 3, "", 0, 0.5, 1_000 + i)


def test_latest_many_gives_the_held_users_by_position() -> None:
    held = HeldAssignments("p", 0)
    for i in range(5):
        held.add(_held(i))
    held.add(_held(9, handle=2))
    handles = [1, 1, 2, 1, 2]
    users = ["user-3", "nobody", "user-3", "user-0", "user-9"]
    assert held.latest_many(handles, users) == {0: _held(3), 3: _held(0), 4: _held(9, handle=2)}
    assert held.latest_many([], []) == {}
    with pytest.raises(ValueError, match="not of one length"):
        held.latest_many([1], [])


def test_only_evicted_users_may_be_stored() -> None:
    held = HeldAssignments("p", 4)
    for i in range(10):
        held.add(_held(i))
    assert held.evictions == 6 and len(held) == 4
    users = [f"user-{i}" for i in range(10)] + ["never-seen"]
    # Evicted: 0..5; held: 6..9; never seen: not (unless the filter passes it falsely, about
    # one time in a few hundred: this id does not).
    assert held.may_be_stored([1] * len(users), users) == list(range(6))
    assert held.may_be_stored([2] * len(users), users) == []  # nothing evicted there
    held.unlisted(2)
    assert held.unlisted_experiments == [2]
    assert held.may_be_stored([2, 2], ["anyone", "user-0"]) == [0, 1]
    held.listed(2)
    assert held.unlisted_experiments == []
    assert held.may_be_stored([2, 2], ["anyone", "user-0"]) == []
    with pytest.raises(ValueError, match="not of one length"):
        held.may_be_stored([1, 2], ["user-0"])
