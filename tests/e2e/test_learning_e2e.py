"""The server learns which variant converts best, per segment, from simulated traffic.

Simulated users (unique ids) are allocated and convert with known probabilities: variant B
converts at 12% for Instagram visitors on phones and 4% for everyone else; A at 6% everywhere.
With `segment_by = ["source", "device"]` the server must end up showing B in the Instagram/phone
segment and A elsewhere; with segmentation disabled, the globally best variant to everyone.
Traffic goes in AllocateBatch / RecordConversionBatch calls of 200 users to keep the test short.

The segmented experiment keeps a propensity floor of 5%. Without one, plain Thompson sampling on
the global node (which serves everyone until a tree keeps a segment) soon sends B, the better
variant overall, to nearly everyone; A's counts in the other segments then stay too thin for the
tree's test to ever tell them apart, and they stay pruned to the global node. Without a floor,
simulation seeds 1-10 at 20,000 users left A under 80% of the other segments' last 2,000 users
in 6 of 10 runs (0.05-67%, served from the global node in every one looked at), and seeds 1-12
at 40,000 users in 7 of 12: more users do not get out of it. With the floor and 40,000 users,
31 of 31 seeds (1-30 and this test's) gave A at least 86% of them and B at least 94% of the
target's.

The segment tree is rebuilt by growth in the background (at `first_rebuild_at` allocations, then
each time they have doubled), from the counts as they stand at the batch that reaches the mark.
The test waits for each such tree to be logged as swapped in before it sends the next batch, so
that the run, seeded on both sides, is the same every time rather than depending on which batch
a rebuild happens to land before.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pytest
from e2e_support import wait_for

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.config import SegmentTreeSettings

if TYPE_CHECKING:
    from conftest import ServerProcess, StartServer

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
USERS = 40_000
CHUNK = 200
TAIL = 2_000
TARGET_SHARE = 0.80
# Every variant keeps at least this share of each segment's traffic (see the module docstring).
FLOOR = 0.05

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
ANDROID = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36"
)
WINDOWS_CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
)
MAC_SAFARI = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Safari/605.1.15"
)


@dataclass(frozen=True)
class Group:
    """One kind of visitor: its share of traffic, context, segment and conversion rates."""

    share: float
    context: dict[str, str]
    segment_key: str
    rates: dict[str, float]

    @property
    def target(self) -> bool:
        return self.segment_key == "source:instagram|device:mobile"


REST_RATES = {"A": 0.06, "B": 0.04}
GROUPS = (
    Group(
        0.50,
        {"utm_source": "instagram", "user_agent": IPHONE, "country_code": "US"},
        "source:instagram|device:mobile",
        {"A": 0.06, "B": 0.12},
    ),
    Group(
        0.20,
        {"utm_source": "google", "user_agent": WINDOWS_CHROME, "country_code": "DE"},
        "source:google|device:desktop",
        REST_RATES,
    ),
    # No utm_source and no referrer: source "direct".
    Group(
        0.15,
        {"user_agent": ANDROID, "country_code": "BR"},
        "source:direct|device:mobile",
        REST_RATES,
    ),
    # Instagram on a desktop is not the target segment: the device level matters.
    Group(
        0.15,
        {"utm_source": "Instagram", "user_agent": MAC_SAFARI},
        "source:instagram|device:desktop",
        REST_RATES,
    ),
)


def _global_rates() -> dict[str, float]:
    return {v: sum(g.share * g.rates[v] for g in GROUPS) for v in ("A", "B")}


@dataclass
class Outcome:
    """The last TAIL allocations (overall, of the target segment, of the rest), the last reply
    per group, and the number of conversions."""

    tail: deque[str]
    target_tail: deque[str]
    rest_tail: deque[str]
    last_reply: dict[int, pb.AllocateResponse]
    conversions: int


def _tree_built(server: ServerProcess, experiment_id: str, allocations: int) -> bool:
    """Whether the server logged a segment tree of the experiment built from `allocations`."""
    return any(
        entry.get("experiment") == experiment_id and entry.get("allocations") == allocations
        for entry in server.logged("segment tree rebuilt")
    )


def _simulate(server: ServerProcess, experiment_id: str, seed: int, *, grows: bool) -> Outcome:
    """Run USERS simulated users through the server. With `grows` (a segmented experiment),
    after each batch that brings the allocations to the next growth mark, wait until the tree
    built from them serves."""
    rng = np.random.default_rng(seed)
    shares = [g.share for g in GROUPS]
    outcome = Outcome(deque(maxlen=TAIL), deque(maxlen=TAIL), deque(maxlen=TAIL), {}, 0)
    next_growth = SegmentTreeSettings().first_rebuild_at
    for start in range(0, USERS, CHUNK):
        groups = rng.choice(len(GROUPS), size=CHUNK, p=shares)
        requests = [
            pb.AllocateRequest(
                experiment_id=experiment_id,
                user_id=f"{experiment_id}-user-{start + i}",
                context=GROUPS[g].context,
            )
            for i, g in enumerate(groups)
        ]
        reply = server.allocator.AllocateBatch(
            pb.AllocateBatchRequest(requests=requests), timeout=RPC_TIMEOUT_S
        )
        assert len(reply.results) == CHUNK
        allocated = start + CHUNK
        if grows and allocated >= next_growth:
            wait_for(
                f"the tree of {experiment_id} from {allocated} allocations",
                partial(_tree_built, server, experiment_id, allocated),
                timeout=RPC_TIMEOUT_S,
            )
            next_growth = 2 * allocated
        draws = rng.random(CHUNK)
        converted = []
        for g, result, draw in zip(groups, reply.results, draws, strict=True):
            assert result.WhichOneof("outcome") == "allocation", result
            allocation = result.allocation
            assert not allocation.sticky  # every user is new
            group = GROUPS[g]
            outcome.tail.append(allocation.variant_id)
            (outcome.target_tail if group.target else outcome.rest_tail).append(
                allocation.variant_id
            )
            outcome.last_reply[int(g)] = allocation
            if draw < group.rates[allocation.variant_id]:
                converted.append(pb.RecordConversionRequest(assignment_id=allocation.assignment_id))
        if converted:
            answer = server.allocator.RecordConversionBatch(
                pb.RecordConversionBatchRequest(requests=converted), timeout=RPC_TIMEOUT_S
            )
            assert all(r.conversion.counted for r in answer.results), answer
            outcome.conversions += len(converted)
    return outcome


def _share(tail: deque[str], variant: str) -> float:
    assert len(tail) == TAIL
    return Counter(tail)[variant] / len(tail)


def test_segmented_experiment_learns_the_best_variant_per_segment(
    start_server: StartServer,
) -> None:
    server = start_server(seed=7)
    server.create_experiment(
        server.experiment(
            "learn-segmented",
            segmentation=pb.SegmentationConfig(
                mode=pb.SEGMENTATION_MODE_MANUAL,
                segment_by=["source", "device"],
                min_samples_per_segment=100,
            ),
            exploration=pb.ExplorationConfig(propensity_floor=FLOOR),
        )
    )
    outcome = _simulate(server, "learn-segmented", seed=20240607, grows=True)

    target_b = _share(outcome.target_tail, "B")
    rest_a = _share(outcome.rest_tail, "A")
    assert target_b >= TARGET_SHARE, f"instagram/mobile: B got {target_b:.1%} of the last {TAIL}"
    assert rest_a >= TARGET_SHARE, f"other segments: A got {rest_a:.1%} of the last {TAIL}"
    for g, group in enumerate(GROUPS):
        last = outcome.last_reply[g]
        assert last.segment_key == group.segment_key
        # The segment tree (built as allocations grow) serves every group from a segment of
        # its own: within Instagram the device decides, so those two are served at level 2;
        # google and direct convert alike on both levels, so their source may serve them.
        instagram = group.segment_key.startswith("source:instagram|")
        assert last.cascade_level == 2 if instagram else last.cascade_level >= 1, group
        assert 0.0 < last.propensity <= 1.0
    # A sanity check of the simulation itself: roughly the expected number of conversions.
    assert 0.04 * USERS < outcome.conversions < 0.12 * USERS


def test_unsegmented_experiment_converges_to_the_global_best(start_server: StartServer) -> None:
    rates = _global_rates()
    best = max(rates, key=rates.__getitem__)
    assert best == "B" and rates["B"] - rates["A"] > 0.015  # 8% vs 6% with this traffic mix

    server = start_server(seed=7)
    server.create_experiment(server.experiment("learn-global"))
    outcome = _simulate(server, "learn-global", seed=20240607, grows=False)

    share = _share(outcome.tail, best)
    assert share >= TARGET_SHARE, f"{best} got {share:.1%} of the last {TAIL}"
    # Without segments the server cannot tell the visitors apart: A, the better variant for
    # half of them, is not what they get.
    rest_b = _share(outcome.rest_tail, best)
    assert rest_b >= TARGET_SHARE, f"other visitors: {best} got {rest_b:.1%}"
    for g in range(len(GROUPS)):
        last = outcome.last_reply[g]
        assert (last.segment_key, last.cascade_level) == ("", 0)
