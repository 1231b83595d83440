"""Steering new connections over `--workers` (allocsvc.steering): the BPF program on a real
SO_REUSEPORT group of this kernel, the weights from the workers' CPU, the sockets found, and
the workers' turns to bind."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from allocsvc.api.registration import ServerGroup
from allocsvc.steering import (
    BUSY_CORES,
    MIN_SHARE_OF_EVEN,
    SCALE,
    Steering,
    WorkerSlot,
    attach,
    listeners_on,
    listening_fds,
    program,
    weights_for,
)

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(sys.platform != "linux", reason="SO_ATTACH_REUSEPORT_CBPF is Linux's"),
]


def _group(count: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    port = 0
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
            s.listen(256)
            s.setblocking(False)
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def group() -> Iterator[list[socket.socket]]:
    """Six listening sockets on one port, in the order they listened: three workers of two."""
    yield from _group(6)


def _accepted(group: list[socket.socket], connections: int) -> Counter[int]:
    """Connect `connections` times; how many each socket of the group accepted, by index."""
    port = group[0].getsockname()[1]
    clients = [
        socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)
    ]
    seen: Counter[int] = Counter()
    for i, s in enumerate(group):
        while True:
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                break
            seen[i] += 1
            conn.close()
    for c in clients:
        c.close()
    assert sum(seen.values()) == connections
    return seen


def test_a_worker_weighted_zero_gets_no_connection(group: list[socket.socket]) -> None:
    for weights, empty in (([0, 1000, 0], {0, 1, 4, 5}), ([500, 0, 500], {2, 3})):
        attach(group[0], program(weights, per_worker=2))
        seen = _accepted(group, 60)
        assert not set(seen) & empty, (weights, seen)


def test_every_socket_of_a_worker_gets_connections(group: list[socket.socket]) -> None:
    """Within a worker the socket is drawn evenly: 120 connections over two sockets all on one
    has odds 2 in 2^120."""
    attach(group[3], program([0, 0, 1000], per_worker=2))  # any socket of the group serves
    seen = _accepted(group, 120)
    assert set(seen) == {4, 5}, seen


def test_weights_set_each_workers_share(group: list[socket.socket]) -> None:
    """900 / 100 over 300 connections: the first worker's count is Binomial(300, 0.9), mean
    270, sd 5.2; under 240 about 7 in 10^8, and an even draw (mean 150) is excluded."""
    attach(group[0], program([900, 50, 50], per_worker=2))
    seen = _accepted(group, 300)
    assert 240 <= seen[0] + seen[1] <= 300, seen


def test_an_index_past_the_group_falls_back_to_the_kernels_hash() -> None:
    """A program made for more workers than listen (one gone) still lands every connection."""
    for socks in _group(2):
        attach(socks[0], program([0, 1000], per_worker=2))  # indices 2 and 3: none
        assert sum(_accepted(socks, 20).values()) == 20


def test_program_refuses_weights_not_summing_to_the_scale() -> None:
    for weights in ([], [500, 400], [1100, -100]):
        with pytest.raises(ValueError, match="weights"):
            program(weights, per_worker=4)
    with pytest.raises(ValueError, match="per_worker"):
        program([1000], per_worker=0)


def test_weights_even_when_idle_and_against_the_busy() -> None:
    assert weights_for([0.0, 0.01]) == [500, 500]
    assert weights_for([BUSY_CORES - 0.01, 0.0]) == [500, 500]  # room left: not steered
    assert weights_for([0.5, 0.5, 0.5]) == [334, 333, 333]
    # Twice as busy: a quarter of the other's share before the floor.
    busy, idle = weights_for([0.8, 0.4])
    assert busy + idle == SCALE
    assert busy == pytest.approx(SCALE * (0.05 + 0.9 * 0.2), abs=2)  # rounded down
    # A busy worker and one with nothing to do: the busy one keeps its floor and a little.
    assert weights_for([1.0, 0.0]) == [52, 948]
    assert MIN_SHARE_OF_EVEN / 2 * SCALE == 50


async def test_listening_fds_finds_a_server_groups_socket() -> None:
    """Four grpc.aio servers on one port: four listening sockets, one address, so one found;
    attaching through it steers all four servers' connections."""
    group = ServerGroup.sharing(4, options=[], max_waiting_calls=100)
    port = group.add_insecure_port("127.0.0.1:0")
    await group.start()
    try:
        fds = await asyncio.to_thread(listening_fds, port)
        assert len(fds) == 1
        probe = socket.socket(fileno=os.dup(fds[0]))
        try:
            assert probe.getsockname()[1] == port
            assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        finally:
            probe.close()
        assert listening_fds(port + 1 if port < 65535 else port - 1) == []
    finally:
        await group.stop(0)


def _two_slots() -> tuple[Steering, WorkerSlot, WorkerSlot]:
    """Two workers of one socket each, sharing one steering."""
    steering = Steering.for_workers(multiprocessing.get_context("spawn"), 2)
    return steering, WorkerSlot(steering, 0, 1), WorkerSlot(steering, 1, 1)


async def _second_busy(steering: Steering, first: WorkerSlot) -> None:
    """Both workers' CPU published, then the second's raised by 2 s of CPU (a busy worker's,
    set by hand) before the first worker's next tick, which steers by it."""
    steering.cpu[1] = 1.0
    await first.tick()  # both published: the next tick steers
    steering.cpu[1] = 3.0
    await asyncio.sleep(0.5)
    await first.tick()


async def test_worker_slots_take_turns_and_the_first_steers() -> None:
    """The second worker waits for the first to bind; the first attaches weights from the
    published CPU (here the second worker's figure raised by hand, as a busy worker's)."""
    steering, first, second = _two_slots()
    waiting = asyncio.create_task(asyncio.to_thread(second.my_turn))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    for socks in _group(2):
        port = socks[0].getsockname()[1]
        first.bound(port)
        await waiting
        second.bound(port)
        await _second_busy(steering, first)
        seen = _accepted(socks, 40)
        assert seen[0] >= 30, seen  # 94% to the idle first worker: under 30 about 2 in 10^5


def test_listeners_on_counts_every_processs_listening_sockets(tmp_path: Path) -> None:
    for socks in _group(3):
        port = socks[0].getsockname()[1]
        assert listeners_on(port) == 3
    table = tmp_path / "tcp6"
    table.write_text(
        "  sl  local_address                         remote_address                        st\n"
        "   0: 00000000000000000000000000000000:C350 00000000000000000000000000000000:0000 0A\n"
        "   1: 0000000000000000FFFF00000100007F:C350 0000000000000000FFFF00000100007F:9C40 01\n"
        "   2: 0000000000000000FFFF00000100007F:C351 00000000000000000000000000000000:0000 0A\n"
    )
    assert listeners_on(0xC350, [table, tmp_path / "missing"]) == 1


async def test_no_steering_when_another_socket_listens_on_the_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers of one socket each and a third socket in the group (another process on the
    port): the indices are not the workers', so the first worker leaves the group's program
    alone. Here that program sends everything to index 1; steered by the CPU below, 95% would
    go to index 0 instead."""
    steering, first, second = _two_slots()
    for socks in _group(3):
        port = socks[0].getsockname()[1]
        attach(socks[0], program([0, 1000], per_worker=1))
        first.bound(port)
        second.bound(port)
        await _second_busy(steering, first)
        await first.tick()
        assert "other sockets listen on the port" in caplog.text
        assert _accepted(socks, 40) == {1: 40}
