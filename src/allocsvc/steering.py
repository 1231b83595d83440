"""New connections steered away from busy workers (`--workers` > 1, Linux).

The kernel gives each new connection on a SO_REUSEPORT port to one of the listening sockets by
a hash of its addresses, blind to how busy each worker is. With few client connections (a gRPC
client keeps one per channel) the workers' shares split unevenly: 8 connections put 74% of the
calls on one of two workers in a bench run, which fell behind while the other idled.
`max_connection_age` has every connection reconnect now and then, but the next one is drawn the
same blind way.

So the first worker attaches a classic BPF program to the port's group of listening sockets
(SO_ATTACH_REUSEPORT_CBPF: any process owning a socket of the group may, no privilege needed)
that draws the worker of a new connection at random with weights, then a socket of that worker,
and attaches it again each `STEER_INTERVAL_S` with weights from the workers' CPU over the last
interval: the busier a worker, the fewer new connections it gets, and reconnections move the
split toward even. The program names sockets by their index in the group, which is the order
they started listening in: the workers bind one after the other (`WorkerSlot.my_turn`), so that
worker i holds indices [i * per_worker, (i + 1) * per_worker). An index past the group's end
(a worker gone) makes the kernel fall back to its hash: no connection is refused by steering.

Opt-in (`steer_connections`): CPU used is not demand. On a machine with no core to spare, a
worker the scheduler starves uses less CPU while its calls queue, looks the less busy and is
sent more: at 6,900 calls/s over 8 connections on two cores, steered runs split the calls more
evenly (51-56% against 50-63%) yet had gRPC refuse calls in two of three (bench/RESULTS.md
item 77). Nor do the other measures in reach tell the worker that falls behind (item 78): the
event loop's lag stays under 4 ms while calls wait for hundreds (they wait in gRPC core, before
the loop takes them), and both workers' threads wait alike in the run queue.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Short, so that weights follow the load as it is now: connections opened just after a busy
# spell ended were steered by it (8 at once all to one worker, in a bench run with 1 s).
STEER_INTERVAL_S = 0.25
# Weights are in thousandths of the new connections.
SCALE = 1000
# Until the busiest worker takes this many cores, new connections are drawn evenly: below it
# a worker has room, and the last interval's CPU says little about the connections to come (in a
# bench run, 8 connections opened together after a quiet second, steered by that second's few
# milliseconds of CPU, put 87% of the calls on one worker).
BUSY_CORES = 0.5
# A worker's CPU is taken as at least this much (an idle one is not weighted infinitely).
IDLE_CORES = 0.05
# Every worker keeps at least this share of an even draw (a tenth: 5% of two workers'), so one
# whose load was misread still gets new connections.
MIN_SHARE_OF_EVEN = 0.1
NET_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
# How long a worker waits for the one before it to bind, before binding anyway (unsteered).
TURN_TIMEOUT_S = 300.0

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h (x86, arm, riscv)
# Classic BPF (linux/filter.h).
_LD_W_ABS = 0x00 | 0x00 | 0x20
_ALU_MOD_K = 0x04 | 0x90
_ALU_ADD_K = 0x04 | 0x00
_JGE_K = 0x05 | 0x30
_RET_A = 0x06 | 0x10
_RANDOM = -0x1000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: a fresh random 32-bit number


def _insn(code: int, k: int = 0, jt: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, 0, k & 0xFFFFFFFF)


def program(weights: Sequence[int], per_worker: int) -> bytes:
    """Classic BPF for SO_ATTACH_REUSEPORT_CBPF: worker i drawn with weight `weights[i]`
    (thousandths, summing to `SCALE`), then one of its `per_worker` sockets at random; the
    socket's index in the group is returned."""
    if not weights or sum(weights) != SCALE or min(weights) < 0:
        raise ValueError(f"weights: non-negative thousandths summing to {SCALE}, got {weights}")
    if per_worker < 1:
        raise ValueError("per_worker: at least 1")
    pick = [_insn(_LD_W_ABS, _RANDOM), _insn(_ALU_MOD_K, per_worker)]
    code = [_insn(_LD_W_ABS, _RANDOM), _insn(_ALU_MOD_K, SCALE)]
    bound = 0
    for i, weight in enumerate(weights):
        bound += weight
        if i < len(weights) - 1:
            # A draw at or past this worker's bound skips its four instructions to the next.
            code.append(_insn(_JGE_K, bound, jt=len(pick) + 2))
        code += [*pick, _insn(_ALU_ADD_K, i * per_worker), _insn(_RET_A)]
    return b"".join(code)


def attach(sock: socket.socket, code: bytes) -> None:
    """Attach `program`'s code to the SO_REUSEPORT group `sock` listens in (replacing any)."""
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def weights_for(cores: Sequence[float]) -> list[int]:
    """Each worker's thousandths of new connections from its CPU (cores) over the last
    interval: even until one takes `BUSY_CORES`, else in proportion to 1 / load**2 (a worker
    twice as busy gets a quarter as many), each at least `MIN_SHARE_OF_EVEN` of an even share."""
    n = len(cores)
    if n == 0:
        raise ValueError("cores: at least one worker")
    if max(cores) < BUSY_CORES:
        shares = [1.0 / n] * n
    else:
        inverse = [1.0 / max(c, IDLE_CORES) ** 2 for c in cores]
        floor = MIN_SHARE_OF_EVEN / n
        shares = [floor + (1.0 - n * floor) * v / sum(inverse) for v in inverse]
    weights = [int(s * SCALE) for s in shares]
    # What rounding down left goes to the least busy worker.
    weights[min(range(n), key=lambda i: cores[i])] += SCALE - sum(weights)
    return weights


def _listening_on(fd: int, port: int) -> socket.socket | None:
    """A duplicate of `fd` if it is a listening TCP socket on `port`, else None."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None  # not a socket, or closed meanwhile
    try:
        if (
            sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            and sock.getsockname()[1] == port
        ):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def listening_fds(port: int) -> list[int]:
    """This process's listening TCP sockets on `port`, one per address it is bound to (any
    socket of a SO_REUSEPORT group serves to attach a program to the group)."""
    found: dict[Any, int] = {}
    for name in os.listdir("/proc/self/fd"):
        sock = _listening_on(int(name), port)
        if sock is not None:
            found.setdefault(sock.getsockname()[0], int(name))
            sock.close()
    return list(found.values())


def listeners_on(port: int, tables: Sequence[Path] = NET_TABLES) -> int:
    """Listening TCP sockets on `port` in this network namespace, any process's (the kernel's
    tables: /proc/net/tcp and tcp6)."""
    count = 0
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # "sl local_address rem_address st ...": the port in hex after the colon, 0A LISTEN
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                count += 1
    return count


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Steering:
    """What `--workers` processes share to steer connections: each worker's CPU seconds so
    far, and whose turn it is to bind. Made by the parent, handed to each spawned worker."""

    cpu: Any  # multiprocessing Array of doubles, one per worker
    bound: list[Event]

    @classmethod
    def for_workers(cls, ctx: SpawnContext, workers: int) -> Steering:
        return cls(ctx.Array("d", workers, lock=False), [ctx.Event() for _ in range(workers)])

    @staticmethod
    def supported() -> bool:
        return sys.platform == "linux"


@dataclass
class WorkerSlot:
    """One worker's part in steering (made only where `Steering.supported()`): bind in turn,
    publish its CPU, and (worker 0) attach the program with fresh weights each interval."""

    steering: Steering
    index: int
    per_worker: int
    port: int = field(default=0, init=False)
    _in_order: bool = field(default=True, init=False)
    _checked: bool = field(default=False, init=False)
    _fds: list[int] = field(default_factory=list, init=False)
    _last: list[float] = field(default_factory=list, init=False)
    _last_at: float = field(default=0.0, init=False)
    _weights: list[int] = field(default_factory=list, init=False)

    def my_turn(self) -> None:
        """Block until the worker before this one has bound its sockets (blocking: call it off
        the event loop). Past `TURN_TIMEOUT_S` it binds anyway, and the first worker, binding
        after it, finds the order broken (`bound`) and does not steer."""
        if self.index > 0 and not self.steering.bound[self.index - 1].wait(TURN_TIMEOUT_S):
            log.warning("the worker before did not bind in time: binding out of turn")

    def bound(self, port: int) -> None:
        """This worker's servers listen on `port`: the next worker's turn."""
        self.port = port
        if any(e.is_set() for e in self.steering.bound[self.index + 1 :]):
            # A later worker did not wait for this one: the group's order is not the workers'.
            log.warning("workers bound out of turn: connections not steered")
            self._in_order = False
        if self.index == 0 and port:
            self._fds = listening_fds(port)
        self.steering.bound[self.index].set()

    async def tick(self) -> None:
        """Publish this worker's CPU; the first worker then steers by everyone's."""
        self.steering.cpu[self.index] = _cpu_seconds()
        if self.index != 0 or not self._in_order:
            return
        if not self._checked:
            if not all(e.is_set() for e in self.steering.bound):
                return
            self._checked = True
            expected = len(self.steering.bound) * self.per_worker * len(self._fds)
            found = listeners_on(self.port)
            if found != expected:
                # Another process listens on the port too (gRPC sets SO_REUSEPORT): the group's
                # indices are not only the workers'.
                log.warning(
                    "other sockets listen on the port: connections not steered",
                    extra={"port": self.port, "listening": found, "expected": expected},
                )
                self._in_order = False
                return
        now = time.monotonic()
        totals = list(self.steering.cpu)
        if self._last and min(self._last) > 0:  # every worker has published twice
            seconds = now - self._last_at
            cores = [max(0.0, t - p) / seconds for t, p in zip(totals, self._last, strict=True)]
            self._steer(weights_for(cores), cores)
        self._last, self._last_at = totals, now

    def _steer(self, weights: list[int], cores: list[float]) -> None:
        if weights == self._weights:
            return
        code = program(weights, self.per_worker)
        for fd in self._fds:
            sock = _listening_on(fd, self.port)
            if sock is None:
                return  # stopping: the servers closed their sockets
            try:
                attach(sock, code)
            except OSError as e:
                log.warning("connections not steered", extra={"error": str(e)})
                self._in_order = False
                return
            finally:
                sock.close()
        self._weights = weights
        log.debug(
            "connections steered",
            extra={"weights": weights, "cores": [round(c, 2) for c in cores]},
        )
