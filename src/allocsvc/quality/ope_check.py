"""Off-policy estimates against on-policy truth, in simulation.

A logging policy runs on one stream through the Rust core; its log (context = the user's leaf
segment, the variant, the propensity the engine returned, the conversion) feeds the estimators.
Each candidate policy is then run on-policy on a fresh stream of the same size, and its true
value is known exactly from the scenario's rates.

Whether an estimate is right is judged against the true value (`bar_check`): over seeds the
estimator's mean error must be consistent with 0, and the true value must fall inside the
estimate's own 95% interval about 95% of the time. Whether a single estimate falls inside the
on-policy run's 95% interval is also counted, but that compares two noisy numbers: with equal
variances an unbiased estimate lands there only ~83% of the time (P(|Z| < 1.96 / sqrt 2)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from allocsvc.analytics.stats import regularized_beta
from allocsvc.quality import ope
from allocsvc.quality.policies import standard_policies
from allocsvc.quality.scenarios import FloatArray, IntArray, Scenario, draw_users, scenario
from allocsvc.quality.simulator import DEFAULT_BATCH, run_policy

TARGETS = ("segment_best", "uniform", "variant:v0")
FRESH_STREAM = 500_009
ESTIMATORS = ("ips", "snips", "dr")


@dataclass(frozen=True, slots=True)
class OpeResult:
    """One (logging policy, candidate policy, seed): estimates and on-policy reference."""

    scenario: str
    logging: str
    target: str
    seed: int
    users: int
    true_value: float
    on_policy: ope.Estimate
    estimates: tuple[ope.Estimate, ...]
    effective_sample_size: float
    min_propensity: float


def target_table(truth: Scenario, name: str) -> FloatArray:
    """A candidate policy per leaf segment, shape (leaves, variants)."""
    leaves, k = len(truth.leaves), truth.variants
    if name == "uniform":
        return np.full((leaves, k), 1.0 / k)
    if name.startswith("variant:"):
        out = np.zeros((leaves, k))
        out[:, int(name.removeprefix("variant:v"))] = 1.0
        return out
    if name == "segment_best":
        if truth.latent_types or truth.drift_to is not None:
            raise ValueError("segment_best needs rates that are fixed per leaf")
        out = np.zeros((leaves, k))
        out[np.arange(leaves), truth.rates.argmax(1)] = 1.0
        return out
    raise ValueError(f"unknown target {name!r} (one of {', '.join(TARGETS)})")


def check(
    scenario_name: str,
    logging: str,
    seed: int,
    users: int,
    targets: tuple[str, ...] = TARGETS,
    batch: int = DEFAULT_BATCH,
) -> list[OpeResult]:
    """Log `users` users under `logging`, estimate each target from the log, and run the target
    on-policy on a fresh stream of the same size."""
    truth = scenario(scenario_name)
    stream = draw_users(truth, users, seed)
    spec = standard_policies(truth.dimensions, truth.variants)[logging]
    trace = run_policy(spec, truth, stream, batch=batch)
    names = tuple(truth.leaf_key(i) for i in range(len(truth.leaves)))
    log = ope.BanditLog(
        contexts=stream.leaf,
        context_names=names,
        variants=trace.variant,
        propensities=trace.propensity,
        rewards=trace.converted.astype(np.float64),
        variant_names=tuple(f"v{i}" for i in range(truth.variants)),
    )
    fresh = draw_users(truth, users, seed + FRESH_STREAM)
    rng = np.random.default_rng([seed, 3])
    out = []
    for name in targets:
        table = target_table(truth, name)
        # On-policy: the target draws its variant per user and the user converts by the truth.
        chosen = _draw(table[fresh.leaf], rng)
        converted = (fresh.draw < fresh.rates[np.arange(len(fresh)), chosen]).astype(np.float64)
        on_policy = ope.Estimate(
            "on_policy",
            float(converted.mean()),
            *_interval(converted),
        )
        true_value = float(
            (truth.traffic[:, None] * table * truth.rates[: len(truth.leaves)]).sum()
        )
        out.append(
            OpeResult(
                scenario=scenario_name,
                logging=logging,
                target=name,
                seed=seed,
                users=users,
                true_value=true_value,
                on_policy=on_policy,
                estimates=tuple(ope.evaluate(log, table)),
                effective_sample_size=ope.effective_sample_size(log, table),
                min_propensity=float(trace.propensity.min()),
            )
        )
    return out


def _draw(probabilities: FloatArray, rng: np.random.Generator) -> IntArray:
    """One variant per row, drawn from that row's probabilities."""
    cumulative = probabilities.cumsum(1)
    u = rng.random(len(probabilities))[:, None]
    chosen = np.minimum((u >= cumulative).sum(1), probabilities.shape[1] - 1)
    return np.asarray(chosen, dtype=np.int64)


def _interval(x: FloatArray) -> tuple[float, float]:
    se = float(x.std(ddof=1)) / np.sqrt(len(x))
    m = float(x.mean())
    return m - ope.Z95 * se, m + ope.Z95 * se


def t_quantile(q: float, df: int) -> float:
    """Quantile q (> 0.5) of Student's t with df degrees of freedom, by bisection on its CDF
    F(t) = 1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 for t > 0 (Abramowitz & Stegun 26.7.1)."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, got {q!r}, {df!r}")
    lo, hi = 0.0, 1.0
    while 1 - regularized_beta(df / (df + hi * hi), df / 2, 0.5) / 2 < q:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if 1 - regularized_beta(df / (df + mid * mid), df / 2, 0.5) / 2 < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p): the one-sided p-value of k successes against rate p."""
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


def estimate(result: OpeResult, estimator: str) -> ope.Estimate:
    """The named estimator's estimate in one result."""
    return next(e for e in result.estimates if e.estimator == estimator)


def bias_interval(
    results: Sequence[OpeResult], estimator: str, level: float = 0.95
) -> ope.Estimate:
    """Mean error (estimate - true value) over seeds of one target, with a Student t interval.

    The seeds are independent runs, so the errors are independent draws; t, not normal, because
    there are only tens of them.
    """
    errors = np.array([estimate(r, estimator).value - r.true_value for r in results])
    n = len(errors)
    mean = float(errors.mean())
    if n < 2:
        return ope.Estimate(estimator, mean, -math.inf, math.inf)
    half = t_quantile(0.5 + level / 2, n - 1) * float(errors.std(ddof=1)) / math.sqrt(n)
    return ope.Estimate(estimator, mean, mean - half, mean + half)


@dataclass(frozen=True, slots=True)
class BarCheck:
    """Is one estimator right on one logging policy's logs (all targets and seeds)?

    `covered`: cases whose own 95% interval holds the true value; `coverage_p`: one-sided
    binomial p-value of that count against a rate of 0.95 (small: the intervals cover less
    than they claim); `biased`: targets whose mean error over seeds has an interval, at
    1 - 0.05 / (number of targets) (Bonferroni), that excludes 0; `within_on_policy`: cases whose
    estimate falls in the on-policy run's 95% interval (the old, two-noisy-numbers criterion).
    """

    estimator: str
    cases: int
    covered: int
    coverage_p: float
    biased: tuple[str, ...]
    within_on_policy: int

    @property
    def met(self) -> bool:
        return not self.biased and self.coverage_p > 0.05


def bar_check(results: Sequence[OpeResult], estimator: str) -> BarCheck:
    """The bar for one estimator over one logging policy's results (see `BarCheck`)."""
    targets = list(dict.fromkeys(r.target for r in results))
    level = 1 - 0.05 / len(targets)
    biased = []
    for target in targets:
        interval = bias_interval([r for r in results if r.target == target], estimator, level)
        if not interval.covers(0.0):
            biased.append(target)
    covered = sum(estimate(r, estimator).covers(r.true_value) for r in results)
    within = sum(r.on_policy.covers(estimate(r, estimator).value) for r in results)
    p = binomial_cdf(covered, len(results), 0.95)
    return BarCheck(estimator, len(results), covered, p, tuple(biased), within)
