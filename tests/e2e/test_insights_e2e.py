"""Analytics and segmentation insights against the real server process: sample-ratio mismatch on
real recorded counts (PostgreSQL), eligibility and auto-activation with the recommendations they
write, the segment analyzer and the sample-size calculator, each checked against scipy or
statsmodels on the same inputs.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import asyncpg
import grpc
import pytest
from e2e_support import Launcher, Server
from scipy.stats import chisquare
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize, proportions_ztest

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.core import key_hash
from allocsvc.store import to_signed64

pytestmark = pytest.mark.e2e

RPC_TIMEOUT_S = 30.0
# Eligibility checks run every second in these servers; a few runs must fit in this wait.
ELIGIBILITY_WAIT_S = 20.0
BATCH = 500
FAST_ELIGIBILITY = {"ALLOCSVC_ELIGIBILITY_INTERVAL": "1", "ALLOCSVC_ELIGIBILITY_WINDOW_DAYS": "1"}


# The server process ---------------------------------------------------------------------------


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Every server this test starts must exit with code 0 after SIGTERM."""
    started = Launcher(tmp_path, graceful=True)
    yield started
    started.close()


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An in-memory server checking eligibility every second over a one-day window."""
    started = Launcher(tmp_path_factory.mktemp("insights"), graceful=True)
    yield started.start("--in-memory", "--seed", "11", env=FAST_ELIGIBILITY)
    started.close()


# Helpers ---------------------------------------------------------------------------------------


def experiment(
    experiment_id: str,
    variants: Sequence[str] = ("a", "b"),
    *,
    policy: int = pb.ALLOCATION_POLICY_UNSPECIFIED,
    weights: Sequence[float] | None = None,
    segmentation: pb.SegmentationConfig | None = None,
) -> pb.CreateExperimentRequest:
    return pb.CreateExperimentRequest(
        experiment=pb.Experiment(
            id=experiment_id,
            name=experiment_id,
            status=pb.EXPERIMENT_STATUS_RUNNING,
            variants=[
                pb.Variant(id=v, name=v, weight=None if weights is None else weights[i])
                for i, v in enumerate(variants)
            ],
            policy=policy,
            segmentation=segmentation,
        )
    )


def allocate_all(
    server: Server, experiment_id: str, users: Sequence[tuple[str, dict[str, str]]]
) -> list[pb.AllocateResponse]:
    """Allocates every (user id, context) through AllocateBatch; every item must succeed."""
    out: list[pb.AllocateResponse] = []
    for start in range(0, len(users), BATCH):
        reply = server.allocator.AllocateBatch(
            pb.AllocateBatchRequest(
                requests=[
                    pb.AllocateRequest(experiment_id=experiment_id, user_id=u, context=ctx)
                    for u, ctx in users[start : start + BATCH]
                ]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        for result in reply.results:
            assert result.WhichOneof("outcome") == "allocation", result
            out.append(result.allocation)
    return out


def record_conversions(server: Server, assignment_ids: Sequence[str]) -> None:
    for start in range(0, len(assignment_ids), BATCH):
        reply = server.allocator.RecordConversionBatch(
            pb.RecordConversionBatchRequest(
                requests=[
                    pb.RecordConversionRequest(assignment_id=a)
                    for a in assignment_ids[start : start + BATCH]
                ]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        for result in reply.results:
            assert result.WhichOneof("outcome") == "conversion", result
            assert result.conversion.counted


def fails(call: Callable[[], object], code: grpc.StatusCode) -> str:
    """The details of the error `call` must fail with."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    return str(error.details())


def wait_for(what: str, probe: Callable[[], bool], timeout: float = ELIGIBILITY_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def recommendations(
    server: Server, experiment_id: str, status: str = ""
) -> list[pb.Recommendation]:
    return list(
        server.admin.ListRecommendations(
            pb.ListRecommendationsRequest(experiment_id=experiment_id, status=status),
            timeout=RPC_TIMEOUT_S,
        ).recommendations
    )


def sources_users(prefix: str, count: int, source: str) -> list[tuple[str, dict[str, str]]]:
    return [(f"{prefix}-{source}-{i}", {"utm_source": source}) for i in range(count)]


# 1. Sample-ratio mismatch on recorded counts ---------------------------------------------------


async def _write_global_counts(dsn: str, counts: dict[str, tuple[int, int]]) -> None:
    """Sets the global segment's allocation counters of each experiment (by key)."""
    conn = await asyncpg.connect(dsn)
    try:
        for key, per_variant in counts.items():
            experiment_id = await conn.fetchval("SELECT id FROM experiments WHERE key = $1", key)
            assert experiment_id is not None, key
            for variant, allocations in enumerate(per_variant):
                await conn.execute(
                    "INSERT INTO segment_variant_state"
                    " (experiment_id, segment_hash, variant, allocations, conversions)"
                    " VALUES ($1, $2, $3, $4, 0)"
                    " ON CONFLICT (experiment_id, segment_hash, variant)"
                    " DO UPDATE SET allocations = EXCLUDED.allocations, conversions = 0",
                    experiment_id,
                    to_signed64(key_hash("")),
                    variant,
                    allocations,
                )
    finally:
        await conn.close()


def test_sample_ratio_mismatch_on_recorded_counts(launcher: Launcher, fresh_db: str) -> None:
    counts = {"srm-52-48": (10_400, 9_600), "srm-501-499": (10_020, 9_980)}
    server = launcher.start("--postgres-dsn", fresh_db, "--seed", "3")
    for key in counts:
        server.admin.CreateExperiment(
            experiment(key, policy=pb.ALLOCATION_POLICY_UNIFORM, weights=(50.0, 50.0)),
            timeout=RPC_TIMEOUT_S,
        )
        # One real user, so that the experiment has recorded traffic in the global segment.
        allocate_all(server, key, [("first-user", {})])
    launcher.stop(server)

    asyncio.run(_write_global_counts(fresh_db, counts))

    server = launcher.start("--postgres-dsn", fresh_db, "--seed", "3")
    for key, observed in counts.items():
        check = server.admin.ValidateExperiment(
            pb.ValidateExperimentRequest(experiment_id=key), timeout=RPC_TIMEOUT_S
        ).sample_ratio
        assert list(check.observed) == list(observed), check
        assert list(check.expected) == pytest.approx([10_000.0, 10_000.0])
        reference = chisquare(observed)
        assert check.statistic == pytest.approx(reference.statistic, rel=1e-9)
        assert check.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    flagged = server.admin.ValidateExperiment(
        pb.ValidateExperimentRequest(experiment_id="srm-52-48"), timeout=RPC_TIMEOUT_S
    ).sample_ratio
    assert flagged.mismatch and flagged.p_value < 0.001, flagged
    fine = server.admin.ValidateExperiment(
        pb.ValidateExperimentRequest(experiment_id="srm-501-499"), timeout=RPC_TIMEOUT_S
    ).sample_ratio
    assert not fine.mismatch and fine.p_value > 0.5, fine


# 2. Eligibility, auto-activation and recommendations -------------------------------------------


def test_auto_activation_and_recommendations(fast_server: Server) -> None:
    admin = fast_server.admin
    seg = pb.SegmentationConfig(
        mode=pb.SEGMENTATION_MODE_DISABLED,
        segment_by=["source"],
        auto_activation=True,
        auto_activation_threshold=200,
    )
    admin.CreateExperiment(experiment("auto-on", segmentation=seg), timeout=RPC_TIMEOUT_S)
    users = [(f"u{i}", {"utm_source": ("google", "instagram")[i % 2]}) for i in range(300)]
    allocate_all(fast_server, "auto-on", users)

    def activated() -> bool:
        config = admin.GetSegmentationConfig(
            pb.GetSegmentationConfigRequest(experiment_id="auto-on"), timeout=RPC_TIMEOUT_S
        )
        return config.mode == pb.SEGMENTATION_MODE_MANUAL

    wait_for("auto-on switched to MANUAL segmentation", activated)
    config = admin.GetSegmentationConfig(
        pb.GetSegmentationConfigRequest(experiment_id="auto-on"), timeout=RPC_TIMEOUT_S
    )
    assert list(config.segment_by) == ["source"]
    assert config.auto_activation_threshold == 200

    eligibility = admin.GetEligibility(
        pb.GetEligibilityRequest(experiment_id="auto-on"), timeout=RPC_TIMEOUT_S
    )
    assert eligibility.eligible, eligibility
    assert eligibility.threshold == 200
    assert eligibility.average_daily_visitors >= 200
    assert eligibility.average_daily_visitors == pytest.approx(300)

    pending = recommendations(fast_server, "auto-on", "pending")
    assert [r.kind for r in pending] == ["enable_segmentation"], pending
    assert list(pending[0].dimensions) == ["source"]
    assert pending[0].experiment_id == "auto-on" and pending[0].status == "pending"

    accepted = admin.AcceptRecommendation(
        pb.AcceptRecommendationRequest(recommendation_id=pending[0].id), timeout=RPC_TIMEOUT_S
    )
    assert accepted.status == "accepted" and accepted.id == pending[0].id
    again = pb.AcceptRecommendationRequest(recommendation_id=pending[0].id)
    fails(
        lambda: admin.AcceptRecommendation(again, timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert [r.status for r in recommendations(fast_server, "auto-on", "accepted")] == ["accepted"]

    # Without auto-activation: a recommendation, but segmentation stays off.
    seg_off = pb.SegmentationConfig(
        mode=pb.SEGMENTATION_MODE_DISABLED, auto_activation_threshold=200
    )
    admin.CreateExperiment(experiment("auto-off", segmentation=seg_off), timeout=RPC_TIMEOUT_S)
    allocate_all(fast_server, "auto-off", users)
    wait_for(
        "a pending recommendation for auto-off",
        lambda: bool(recommendations(fast_server, "auto-off", "pending")),
    )
    (proposal,) = recommendations(fast_server, "auto-off", "pending")
    assert proposal.kind == "enable_segmentation" and list(proposal.dimensions), proposal
    time.sleep(1.5)  # another eligibility run or two: still no activation
    config = admin.GetSegmentationConfig(
        pb.GetSegmentationConfigRequest(experiment_id="auto-off"), timeout=RPC_TIMEOUT_S
    )
    assert config.mode == pb.SEGMENTATION_MODE_DISABLED
    dismissed = admin.DismissRecommendation(
        pb.DismissRecommendationRequest(recommendation_id=proposal.id), timeout=RPC_TIMEOUT_S
    )
    assert dismissed.status == "dismissed" and dismissed.experiment_id == "auto-off"
    config = admin.GetSegmentationConfig(
        pb.GetSegmentationConfigRequest(experiment_id="auto-off"), timeout=RPC_TIMEOUT_S
    )
    assert config.mode == pb.SEGMENTATION_MODE_DISABLED
    # The same advice, once dismissed, does not come back with the next eligibility runs.
    time.sleep(2.5)
    assert recommendations(fast_server, "auto-off", "pending") == []

    unknown = pb.AcceptRecommendationRequest(recommendation_id="987654321")
    fails(
        lambda: admin.AcceptRecommendation(unknown, timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.NOT_FOUND,
    )
    unknown_dismiss = pb.DismissRecommendationRequest(recommendation_id="987654321")
    fails(
        lambda: admin.DismissRecommendation(unknown_dismiss, timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.NOT_FOUND,
    )
    for call in (
        lambda: admin.AcceptRecommendation(pb.AcceptRecommendationRequest(), timeout=RPC_TIMEOUT_S),
        lambda: admin.DismissRecommendation(
            pb.DismissRecommendationRequest(), timeout=RPC_TIMEOUT_S
        ),
    ):
        assert "recommendation_id" in fails(call, grpc.StatusCode.INVALID_ARGUMENT)


def test_no_recommendation_for_the_segmentation_in_use(fast_server: Server) -> None:
    segmentation = pb.SegmentationConfig(
        mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=["source"], auto_activation_threshold=200
    )
    fast_server.admin.CreateExperiment(
        experiment("manual-source", segmentation=segmentation), timeout=RPC_TIMEOUT_S
    )
    allocate_all(fast_server, "manual-source", sources_users("m", 150, "x"))
    allocate_all(fast_server, "manual-source", sources_users("m", 150, "y"))
    eligibility = fast_server.admin.GetEligibility(
        pb.GetEligibilityRequest(experiment_id="manual-source"), timeout=RPC_TIMEOUT_S
    )
    assert eligibility.eligible
    time.sleep(2.5)  # two or more eligibility runs
    assert recommendations(fast_server, "manual-source") == []


# 3. Segment analysis ---------------------------------------------------------------------------

# Conversion rates per (source, variant): source x converts much better on b.
RATES = {
    ("x", "a"): 0.05,
    ("x", "b"): 0.20,
    ("y", "a"): 0.06,
    ("y", "b"): 0.06,
    ("z", "a"): 0.06,
    ("z", "b"): 0.05,
}


def test_analyze_segments_matches_statsmodels(fast_server: Server) -> None:
    admin = fast_server.admin
    seg = pb.SegmentationConfig(
        mode=pb.SEGMENTATION_MODE_MANUAL, segment_by=["source"], min_samples_per_segment=50
    )
    admin.CreateExperiment(
        experiment("analyze", policy=pb.ALLOCATION_POLICY_UNIFORM, segmentation=seg),
        timeout=RPC_TIMEOUT_S,
    )
    users = [u for s in ("x", "y", "z") for u in sources_users("an", 1200, s)]
    answers = allocate_all(fast_server, "analyze", users)
    rng = random.Random(5)
    converted = [
        a.assignment_id
        for (_, ctx), a in zip(users, answers, strict=True)
        if rng.random() < RATES[(ctx["utm_source"], a.variant_id)]
    ]
    record_conversions(fast_server, converted)

    listed = admin.ListSegments(
        pb.ListSegmentsRequest(experiment_id="analyze", page_size=100), timeout=RPC_TIMEOUT_S
    )
    counts = {
        (s.segment_key, v.variant_id): (v.allocations, v.conversions)
        for s in listed.segments
        for v in s.variants
    }
    assert {k for k, _ in counts} == {"", "source:x", "source:y", "source:z"}
    assert sum(n for (k, _), (n, _) in counts.items() if k == "") == len(users)
    assert sum(c for (k, _), (_, c) in counts.items() if k == "") == len(converted)

    analysis = admin.AnalyzeSegments(
        pb.AnalyzeSegmentsRequest(experiment_id="analyze"), timeout=RPC_TIMEOUT_S
    )
    assert "source:x" in analysis.high_performers, analysis
    assert any("source:x" in r and "variant b" in r for r in analysis.recommendations), (
        analysis.recommendations
    )
    by_key = {(r.segment_key, r.variant_id): r for r in analysis.results}
    best = by_key[("source:x", "b")]
    assert best.significant and best.lift > 0.5, best
    assert len(by_key) == 6
    for (key, variant), result in by_key.items():
        n, c = counts[(key, variant)]
        total_n, total_c = counts[("", variant)]
        assert (result.allocations, result.conversions) == (n, c)
        _, reference = proportions_ztest([c, total_c - c], [n, total_n - n])
        assert result.p_value == pytest.approx(reference, rel=1e-6), (key, variant)
        assert result.conversion_rate == pytest.approx(c / n, rel=1e-12)
        assert result.global_rate == pytest.approx(total_c / total_n, rel=1e-12)


# 4. Sample size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("baseline", "mde", "absolute", "alpha", "power", "variants"),
    [
        (0.05, 0.10, False, 0.05, 0.8, 2),
        (0.20, 0.02, True, 0.01, 0.9, 2),
        (0.10, 0.15, False, 0.05, 0.8, 3),
    ],
)
def test_sample_size_matches_statsmodels(
    fast_server: Server,
    baseline: float,
    mde: float,
    absolute: bool,
    alpha: float,
    power: float,
    variants: int,
) -> None:
    reply = fast_server.admin.CalculateSampleSize(
        pb.CalculateSampleSizeRequest(
            baseline_rate=baseline,
            minimum_detectable_effect=mde,
            absolute_effect=absolute,
            alpha=alpha,
            power=power,
            variants=variants,
        ),
        timeout=RPC_TIMEOUT_S,
    )
    treatment = baseline + mde if absolute else baseline * (1 + mde)
    adjusted = alpha / (variants - 1)
    effect = proportion_effectsize(treatment, baseline)
    expected = NormalIndPower().solve_power(
        effect_size=effect, alpha=adjusted, power=power, ratio=1.0
    )
    assert abs(reply.per_variant - math.ceil(expected)) <= 1, (reply.per_variant, expected)
    assert reply.total == reply.per_variant * variants
    assert reply.adjusted_alpha == pytest.approx(adjusted, rel=1e-12)
    assert reply.effect_size == pytest.approx(effect, rel=1e-9)


def test_sample_size_days_at_observed_traffic(fast_server: Server) -> None:
    admin = fast_server.admin
    admin.CreateExperiment(experiment("traffic-300"), timeout=RPC_TIMEOUT_S)
    allocate_all(fast_server, "traffic-300", [(f"t{i}", {}) for i in range(300)])

    def query(horizon_days: int = 0) -> pb.CalculateSampleSizeResponse:
        return admin.CalculateSampleSize(
            pb.CalculateSampleSizeRequest(
                baseline_rate=0.1,
                minimum_detectable_effect=0.2,
                experiment_id="traffic-300",
                horizon_days=horizon_days,
            ),
            timeout=RPC_TIMEOUT_S,
        )

    size = query()
    # The window is one day, and today's 300 visitors are all the traffic there is.
    assert size.daily_traffic == pytest.approx(300.0)
    days = math.ceil(size.total / 300)
    assert size.days_needed == days and days > 1
    roomy = query(horizon_days=days)
    assert roomy.days_needed == days and roomy.achievable
    tight = query(horizon_days=days - 1)
    assert tight.days_needed == days and not tight.achievable


@pytest.mark.parametrize(
    ("baseline", "mde", "alpha", "field_name"),
    [
        (0.0, 0.1, 0.0, "baseline_rate"),
        (1.5, 0.1, 0.0, "baseline_rate"),
        (0.1, 0.0, 0.0, "minimum_detectable_effect"),
        (0.1, 0.1, 0.7, "alpha"),
    ],
)
def test_sample_size_rejects_bad_input(
    fast_server: Server, baseline: float, mde: float, alpha: float, field_name: str
) -> None:
    request = pb.CalculateSampleSizeRequest(
        baseline_rate=baseline, minimum_detectable_effect=mde, alpha=alpha
    )
    details = fails(
        lambda: fast_server.admin.CalculateSampleSize(request, timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field_name in details
