"""Counters in PostgreSQL against the conversions behind them, and the calls that make them:
shared by the durability and replica tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

from e2e_support import Server, query

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.core import key_hash, parent_keys

RPC_TIMEOUT_S = 10.0

IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148 Safari/604.1"
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"
CONTEXTS = [
    {"utm_source": source, "user_agent": agent, "country_code": "US"}
    for source in ("instagram", "google")
    for agent in (IPHONE, DESKTOP)
]


State = dict[tuple[str, int, int], tuple[int, int, float]]


def counters(dsn: str) -> State:
    """Every segment_variant_state row: (experiment key, segment hash, variant) -> counts."""
    rows = query(
        dsn,
        "SELECT e.key, s.segment_hash, s.variant, s.allocations, s.conversions, s.value_sum"
        " FROM segment_variant_state s JOIN experiments e ON e.id = s.experiment_id",
    )
    return {(r[0], r[1], r[2]): (r[3], r[4], round(r[5], 6)) for r in rows}


def signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


GLOBAL = signed(key_hash(""))


def global_counts(state: State, experiment: str) -> dict[int, tuple[int, int, float]]:
    """Per variant: the counters of the global segment."""
    return {v: c for (e, s, v), c in state.items() if e == experiment and s == GLOBAL}


def assert_conversion_counters_match_rows(dsn: str, experiment: str) -> int:
    """The conversion counters of every level of every path equal what the `conversions` rows
    imply; returns the number of rows."""
    rows = query(
        dsn,
        "SELECT c.segment_key, c.variant, count(*), sum(c.value) FROM conversions c"
        " JOIN experiments e ON e.id = c.experiment_id WHERE e.key = $1 GROUP BY 1, 2",
        experiment,
    )
    expected: Counter[tuple[int, int]] = Counter()
    for segment_key, variant, n, _ in rows:
        for level_key in parent_keys(segment_key):
            expected[(signed(key_hash(level_key)), variant)] += n
    state = counters(dsn)
    actual = {(s, v): c[1] for (e, s, v), c in state.items() if e == experiment and c[1]}
    assert actual == dict(expected)
    total = int(sum(r[2] for r in rows))
    assert sum(c[1] for c in global_counts(state, experiment).values()) == total
    return total


def experiment(key: str, variants: tuple[str, ...], *, segment_by: tuple[str, ...] = ()) -> Any:
    segmentation = (
        pb.SegmentationConfig(
            mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=segment_by, min_samples_per_segment=10
        )
        if segment_by
        else pb.SegmentationConfig(mode=pb.SEGMENTATION_MODE_DISABLED)
    )
    return pb.CreateExperimentRequest(
        experiment=pb.Experiment(
            id=key,
            name=key,
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[pb.Variant(id=v, name=v) for v in variants],
            segmentation=segmentation,
        )
    )


def allocate(server: Server, key: str, user: str, context: dict[str, str]) -> Any:
    return server.allocator.Allocate(
        pb.AllocateRequest(experiment_id=key, user_id=user, channel="web", context=context),
        timeout=RPC_TIMEOUT_S,
    )


def convert(server: Server, **fields: Any) -> Any:
    return server.allocator.RecordConversion(
        pb.RecordConversionRequest(**fields), timeout=RPC_TIMEOUT_S
    )
