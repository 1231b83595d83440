"""Fan-out of counter deltas: the engine hands each change out once, every sink gets it."""

from __future__ import annotations

from collections.abc import Callable

# (experiment, segment hash, variant, allocations, conversions, value sum)
CountRow = tuple[int, int, int, int, int, float]
Key = tuple[int, int, int]


class DeltaPump:
    """Takes deltas from one source and keeps a merged buffer per sink.

    Each sink drains its own buffer; a sink that cannot write (a store is down) puts rows back
    with `restore`, and they merge with what arrives meanwhile, so the buffer stays bounded by
    the number of distinct counters.
    """

    def __init__(self, take: Callable[[], list[CountRow]]) -> None:
        self._take = take
        self._buffers: dict[str, dict[Key, list[float]]] = {}

    def add_sink(self, name: str) -> None:
        self._buffers[name] = {}

    def pump(self) -> None:
        rows = self._take()
        for buffer in self._buffers.values():
            _merge(buffer, rows)

    def drain(self, name: str) -> list[CountRow]:
        self.pump()
        buffer = self._buffers[name]
        self._buffers[name] = {}
        return [(e, s, v, int(x[0]), int(x[1]), x[2]) for (e, s, v), x in buffer.items()]

    def restore(self, name: str, rows: list[CountRow]) -> None:
        _merge(self._buffers[name], rows)

    def discard(self, name: str, experiment: int) -> None:
        """Forget a sink's buffered rows of one experiment (they were written another way)."""
        buffer = self._buffers[name]
        for key in [k for k in buffer if k[0] == experiment]:
            del buffer[key]

    def pending(self, name: str) -> int:
        return len(self._buffers[name])


def _merge(buffer: dict[Key, list[float]], rows: list[CountRow]) -> None:
    for e, s, v, a, k, x in rows:
        acc = buffer.get((e, s, v))
        if acc is None:
            buffer[(e, s, v)] = [a, k, x]
        else:
            acc[0] += a
            acc[1] += k
            acc[2] += x
