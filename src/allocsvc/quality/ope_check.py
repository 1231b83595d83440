"""Off-policy estimates against on-policy truth, in simulation.

A logging policy runs on one stream through the Rust core; its log (context = the user's leaf
segment, the variant, the propensity the engine returned, the conversion) feeds the estimators.
Each candidate policy is then run on-policy on a fresh stream of the same size, which gives the
95% interval its off-policy estimates should fall in. The true value is also known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocsvc.quality import ope
from allocsvc.quality.policies import standard_policies
from allocsvc.quality.scenarios import FloatArray, IntArray, Scenario, draw_users, scenario
from allocsvc.quality.simulator import DEFAULT_BATCH, run_policy

TARGETS = ("segment_best", "uniform", "variant:v0")
FRESH_STREAM = 500_009


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
