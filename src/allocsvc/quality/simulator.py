"""Run policies on simulated user streams through the Rust core, and compare them.

One run is one policy on one stream (scenario + seed). Users arrive in batches of `batch`: the
engine decides a batch in one `decide_batch` call (the state every decision of a batch sees is the
state before the batch, like a server whose conversions arrive a little later), then the batch's
conversions are recorded. Regret is the pseudo-regret: the sum over users of the best variant's
true rate minus the chosen variant's true rate (its expectation is the expected conversions lost to
the oracle; it has far less noise than realised conversions, which are reported too).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from allocsvc.allocation.service import configure_engine
from allocsvc.config import SegmentTreeSettings
from allocsvc.core import Engine, path_keys, seed_rng
from allocsvc.hierarchy import HierarchySettings, build_tree, stats_from_counts
from allocsvc.quality.policies import (
    ClusterModel,
    Context,
    PolicySpec,
    fit_clusters,
    standard_policies,
)
from allocsvc.quality.scenarios import FloatArray, IntArray, Scenario, Users, draw_users, scenario

BoolArray = npt.NDArray[np.bool_]
CHECKPOINTS = 100
NEW_SEGMENT_USERS = 200
HISTORY_USERS = 1500
DEFAULT_BATCH = 100
# Users between two tree rebuilds (the server rebuilds every `tree_rebuild_interval` seconds).
DEFAULT_REBUILD_EVERY = 20_000
# The server's rebuilds by growth: at this many allocations, then each time they double.
DEFAULT_FIRST_REBUILD = SegmentTreeSettings().first_rebuild_at
BASELINE = "global_ts"


@dataclass(frozen=True, eq=False)
class Trace:
    """Everything one policy did on one stream, user by user."""

    policy: str
    variant: IntArray
    level: IntArray
    propensity: FloatArray
    segment_key: list[str]
    converted: BoolArray
    expected: FloatArray  # true rate of the chosen variant
    regret: FloatArray  # best true rate minus the chosen one's


def _values(
    spec: PolicySpec, scenario: Scenario, users: Users, model: ClusterModel | None
) -> list[list[str]]:
    """The segment values the engine is given for each user, by the policy's context."""
    if spec.context is Context.SEGMENTS:
        per_leaf = [list(leaf) for leaf in scenario.leaves]
        return [per_leaf[i] for i in users.leaf]
    if spec.context is Context.FLAT:
        flat = [[scenario.leaf_key(i)] for i in range(len(scenario.leaves))]
        return [flat[i] for i in users.leaf]
    if spec.context is Context.CLUSTER:
        assert model is not None
        labels = [[f"c{j}"] for j in range(len(model.centroids))]
        return [labels[j] for j in model.assign(users.features)]
    return [[] for _ in range(len(users))]


def run_policy(
    spec: PolicySpec,
    scenario: Scenario,
    users: Users,
    *,
    batch: int = DEFAULT_BATCH,
    rebuild_every: int = DEFAULT_REBUILD_EVERY,
    first_rebuild: int = DEFAULT_FIRST_REBUILD,
    model: ClusterModel | None = None,
) -> Trace:
    """One policy on one stream; the engine's sampler is seeded from the stream's seed.

    A policy with a tree gets it rebuilt as the server does: every `rebuild_every` users (0:
    never; the periodic `tree-rebuild` task), and by growth once `first_rebuild` users have
    come and each time their number has doubled since the last tree (0: never; the
    `tree-rebuild-growth` task). Until the first rebuild only the global node is used, as in
    a server that has not built the experiment's tree yet.
    """
    n = len(users)
    best = users.best_rate
    if spec.experiment is None:
        variant = users.rates.argmax(axis=1).astype(np.int64)
        chosen = best
        return Trace(
            policy=spec.name,
            variant=variant,
            level=np.zeros(n, dtype=np.int64),
            propensity=np.ones(n),
            segment_key=[""] * n,
            converted=users.draw < chosen,
            expected=chosen,
            regret=np.zeros(n),
        )
    if spec.context is Context.CLUSTER and model is None:
        history = draw_users(scenario, HISTORY_USERS, users.seed + 1_000_003)
        model = fit_clusters(history.features, users.seed)
    engine = Engine()
    configure_engine(engine, spec.experiment)
    handle = spec.experiment.handle
    if spec.tree:
        # As the server does (`AllocationService.global_until_first_tree`): global only
        # until the first tree.
        engine.set_tree(handle, [])
    seed_rng(users.seed)
    values = _values(spec, scenario, users, model)
    ids = [f"{users.seed}-{i}" for i in range(n)]
    variant = np.empty(n, dtype=np.int64)
    level = np.empty(n, dtype=np.int64)
    propensity = np.empty(n)
    keys: list[str] = []
    distinct = {tuple(v) for v in values}
    tree_keys = sorted({k for v in distinct for k in path_keys(spec.experiment.dimensions, v)})
    next_rebuild = rebuild_every if spec.tree and rebuild_every > 0 else n + 1
    grow = spec.tree and first_rebuild > 0
    built_at = 0
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        periodic = start >= next_rebuild
        if periodic or (grow and start >= max(2 * built_at, first_rebuild)):
            _rebuild_tree(engine, spec, tree_keys)
            built_at = start
        if periodic:
            next_rebuild += rebuild_every
        decisions = engine.decide_batch(handle, ids[start:stop], values[start:stop], True)
        chosen = np.fromiter((d[0] for d in decisions), dtype=np.int64, count=stop - start)
        variant[start:stop] = chosen
        level[start:stop] = [d[1] for d in decisions]
        propensity[start:stop] = [d[2] for d in decisions]
        keys.extend(d[3] for d in decisions)
        rows = np.arange(start, stop)
        for j in np.flatnonzero(users.draw[rows] < users.rates[rows, chosen]):
            engine.record_conversion(handle, decisions[j][3], int(chosen[j]))
    expected = users.rates[np.arange(n), variant]
    return Trace(
        policy=spec.name,
        variant=variant,
        level=level,
        propensity=propensity,
        segment_key=keys,
        converted=users.draw < expected,
        expected=expected,
        regret=best - expected,
    )


def _rebuild_tree(engine: Engine, spec: PolicySpec, keys: Sequence[str]) -> None:
    """What `Insights.rebuild_tree` does: build and prune from the counts, swap it in."""
    assert spec.experiment is not None
    experiment = spec.experiment
    stats = stats_from_counts(
        engine.snapshot(experiment.handle), keys, variants=len(experiment.variants)
    )
    tree = build_tree(stats, HierarchySettings.for_experiment(experiment))
    engine.set_tree(experiment.handle, tree.kept_hashes())


@dataclass(frozen=True)
class RunSummary:
    """What the comparison keeps of one run (small enough to cross process boundaries)."""

    scenario: str
    policy: str
    seed: int
    users: int
    regret: float
    expected_rate: float
    conversion_rate: float
    regret_curve: list[float]
    levels: dict[int, int]
    # Mean true rate and realised conversion rate of the first users of new segments.
    new_segment_expected: float | None = None
    new_segment_conversion: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def summarize(scenario: Scenario, users: Users, trace: Trace) -> RunSummary:
    n = len(users)
    marks = np.linspace(n / CHECKPOINTS, n, CHECKPOINTS).astype(np.int64) - 1
    cumulative = np.cumsum(trace.regret)
    new_expected = new_conversion = None
    if scenario.new_leaves:
        first = np.flatnonzero(np.isin(users.leaf, scenario.new_leaves))[:NEW_SEGMENT_USERS]
        if len(first):
            new_expected = float(trace.expected[first].mean())
            new_conversion = float(trace.converted[first].mean())
    levels, counts = np.unique(trace.level, return_counts=True)
    return RunSummary(
        scenario=scenario.name,
        policy=trace.policy,
        seed=users.seed,
        users=n,
        regret=float(cumulative[-1]),
        expected_rate=float(trace.expected.mean()),
        conversion_rate=float(trace.converted.mean()),
        regret_curve=[float(x) for x in cumulative[marks]],
        levels={int(lv): int(c) for lv, c in zip(levels, counts, strict=True)},
        new_segment_expected=new_expected,
        new_segment_conversion=new_conversion,
    )


def run_stream(
    scenario_name: str,
    seed: int,
    users: int,
    policies: Sequence[str],
    batch: int = DEFAULT_BATCH,
    rebuild_every: int = DEFAULT_REBUILD_EVERY,
    first_rebuild: int = DEFAULT_FIRST_REBUILD,
) -> list[RunSummary]:
    """Every named policy on the same stream of one scenario and seed."""
    truth = scenario(scenario_name)
    stream = draw_users(truth, users, seed)
    specs = standard_policies(truth.dimensions, truth.variants)
    unknown = [p for p in policies if p not in specs]
    if unknown:
        raise ValueError(f"unknown policies {unknown} (known: {', '.join(specs)})")
    return [
        summarize(
            truth,
            stream,
            run_policy(
                specs[p],
                truth,
                stream,
                batch=batch,
                rebuild_every=rebuild_every,
                first_rebuild=first_rebuild,
            ),
        )
        for p in policies
    ]


def simulate(
    scenarios: Sequence[str],
    policies: Sequence[str],
    seeds: Iterable[int],
    users: int,
    *,
    batch: int = DEFAULT_BATCH,
    rebuild_every: int = DEFAULT_REBUILD_EVERY,
    first_rebuild: int = DEFAULT_FIRST_REBUILD,
    workers: int = 1,
    on_done: Callable[[int], None] | None = None,
) -> list[RunSummary]:
    """All (scenario, seed) streams, each run by every policy; `on_done(k)` after each stream.

    With `workers` > 1 the streams run in that many processes. Results are the same whatever
    the number of workers: each run depends only on its scenario, seed and policy.
    """
    jobs = [(s, seed) for s in scenarios for seed in seeds]
    results: list[RunSummary] = []
    if workers <= 1:
        for s, seed in jobs:
            results.extend(
                run_stream(s, seed, users, policies, batch, rebuild_every, first_rebuild)
            )
            if on_done is not None:
                on_done(1)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [
                pool.submit(
                    run_stream,
                    s,
                    seed,
                    users,
                    list(policies),
                    batch,
                    rebuild_every,
                    first_rebuild,
                )
                for s, seed in jobs
            ]
            for future in as_completed(futures):
                results.extend(future.result())
                if on_done is not None:
                    on_done(1)
    order = {(s, seed): i for i, (s, seed) in enumerate(jobs)}
    rank = {p: i for i, p in enumerate(policies)}
    results.sort(key=lambda r: (order[(r.scenario, r.seed)], rank[r.policy]))
    return results


# Comparison ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interval:
    """An estimate with a 95% interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _bootstrap(
    columns: Sequence[FloatArray],
    statistic: Callable[..., float],
    *,
    resamples: int = 4000,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap 95% interval of `statistic(*columns)`, resampling rows jointly.

    Rows are seeds; resampling them together keeps the pairing of policies run on the same
    stream (Efron & Tibshirani 1993, ch. 13).
    """
    rng = np.random.default_rng(seed)
    n = len(columns[0])
    value = statistic(*columns)
    draws = np.empty(resamples)
    for b in range(resamples):
        rows = rng.integers(0, n, n)
        draws[b] = statistic(*(c[rows] for c in columns))
    low, high = np.quantile(draws, [0.025, 0.975])
    return Interval(float(value), float(low), float(high))


bootstrap = _bootstrap


def _mean(x: FloatArray) -> float:
    return float(x.mean())


def _ratio_of_means(x: FloatArray, y: FloatArray) -> float:
    return float(x.mean() / y.mean()) if y.mean() > 0 else float("nan")


def _relative_lift(x: FloatArray, y: FloatArray) -> float:
    return float(x.mean() / y.mean() - 1.0) if y.mean() > 0 else float("nan")


def _difference(x: FloatArray, y: FloatArray) -> float:
    return float((x - y).mean())


@dataclass(frozen=True, slots=True)
class PolicyComparison:
    """One policy in one scenario over all seeds, against the baseline on the same streams."""

    scenario: str
    policy: str
    seeds: int
    regret: Interval
    regret_ratio: Interval | None  # total regret / the baseline's
    conversion_rate: Interval
    expected_rate: Interval
    lift: Interval | None  # conversion rate / the baseline's - 1
    expected_lift: Interval | None  # the same on true rates of the chosen variants
    new_segment: Interval | None  # mean true rate of new segments' first users
    new_segment_difference: Interval | None  # ... minus the baseline's
    levels: dict[int, float]  # share of allocations per cascade level


def _column(runs: Sequence[RunSummary], pick: Callable[[RunSummary], float | None]) -> FloatArray:
    return np.array([float(pick(r) or 0.0) for r in runs])


def compare(
    summaries: Sequence[RunSummary], baseline: str = BASELINE, *, resamples: int = 4000
) -> list[PolicyComparison]:
    """Aggregate runs over seeds: means and paired-bootstrap 95% intervals per policy."""
    out: list[PolicyComparison] = []

    def bootstrap(columns: Sequence[FloatArray], statistic: Callable[..., float]) -> Interval:
        return _bootstrap(columns, statistic, resamples=resamples)

    scenarios = list(dict.fromkeys(r.scenario for r in summaries))
    for s in scenarios:
        runs = [r for r in summaries if r.scenario == s]
        policies = list(dict.fromkeys(r.policy for r in runs))
        by = {p: sorted((r for r in runs if r.policy == p), key=lambda r: r.seed) for p in policies}
        base = by.get(baseline)
        for p in policies:
            mine = by[p]
            regret = _column(mine, lambda r: r.regret)
            conv = _column(mine, lambda r: r.conversion_rate)
            expected = _column(mine, lambda r: r.expected_rate)
            paired = base is not None and [r.seed for r in base] == [r.seed for r in mine]
            ratio = lift = expected_lift = new_diff = None
            if paired and base is not None and p != baseline:
                b_regret = _column(base, lambda r: r.regret)
                ratio = bootstrap([regret, b_regret], _ratio_of_means)
                lift = bootstrap([conv, _column(base, lambda r: r.conversion_rate)], _relative_lift)
                expected_lift = bootstrap(
                    [expected, _column(base, lambda r: r.expected_rate)], _relative_lift
                )
            new_segment = None
            if mine[0].new_segment_expected is not None:
                new = _column(mine, lambda r: r.new_segment_expected)
                new_segment = bootstrap([new], _mean)
                if paired and base is not None and p != baseline:
                    new_diff = bootstrap(
                        [new, _column(base, lambda r: r.new_segment_expected)], _difference
                    )
            total = sum(sum(r.levels.values()) for r in mine)
            levels: dict[int, float] = {}
            for r in mine:
                for lv, c in r.levels.items():
                    levels[lv] = levels.get(lv, 0.0) + c / total
            out.append(
                PolicyComparison(
                    scenario=s,
                    policy=p,
                    seeds=len(mine),
                    regret=bootstrap([regret], _mean),
                    regret_ratio=ratio,
                    conversion_rate=bootstrap([conv], _mean),
                    expected_rate=bootstrap([expected], _mean),
                    lift=lift,
                    expected_lift=expected_lift,
                    new_segment=new_segment,
                    new_segment_difference=new_diff,
                    levels=dict(sorted(levels.items())),
                )
            )
    return out


def markdown_table(rows: Sequence[PolicyComparison], baseline: str = BASELINE) -> str:
    """One markdown table of a comparison (intervals are 95%, bootstrap over seeds)."""
    head = (
        "| scenario | policy | regret | regret / "
        + baseline
        + " | conversion rate | lift vs "
        + baseline
        + " | lift on true rates | levels used |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        levels = " ".join(f"L{lv}:{share:.0%}" for lv, share in r.levels.items())
        lines.append(
            f"| {r.scenario} | {r.policy} | {r.regret.value:,.0f} "
            f"[{r.regret.low:,.0f}, {r.regret.high:,.0f}] | "
            f"{_fmt(r.regret_ratio, '{:.3f}')} | "
            f"{r.conversion_rate.value:.4%} [{r.conversion_rate.low:.4%}, "
            f"{r.conversion_rate.high:.4%}] | {_fmt(r.lift, '{:+.2%}')} | "
            f"{_fmt(r.expected_lift, '{:+.2%}')} | {levels} |"
        )
    return head + "\n".join(lines) + "\n"


def _fmt(interval: Interval | None, pattern: str) -> str:
    if interval is None:
        return "-"
    return (
        f"{pattern.format(interval.value)} "
        f"[{pattern.format(interval.low)}, {pattern.format(interval.high)}]"
    )
