"""The engine's propensities are the exact probabilities that Thompson sampling picks each
variant: checked against scipy integration of P(i is max) = ∫ f_i(x) Π_{j≠i} F_j(x + c_i - c_j) dx
on posteriors from everyday to extreme (parameters up to 1e6, probabilities down to 1e-9,
shapes below 1, exploration bonuses)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
from scipy import integrate, stats

from allocsvc.core import Engine, key_hash, seed_rng

pytestmark = pytest.mark.unit

EXPERIMENT = 7


def scipy_selection(
    alphas: Sequence[float], betas: Sequence[float], bonus: Sequence[float]
) -> list[float]:
    """P(X_i + c_i is the largest), X_k ~ Beta(alphas[k], betas[k]), by adaptive quadrature over
    variant i's support, split every standard deviation of every posterior near its mean."""
    dists = [stats.beta(a, b) for a, b in zip(alphas, betas, strict=True)]
    out = []
    for i in range(len(dists)):

        def integrand(x: float, i: int = i) -> float:
            value = float(dists[i].pdf(x))
            for j, dj in enumerate(dists):
                if j != i and value > 0.0:
                    value *= float(dj.cdf(x + bonus[i] - bonus[j]))
            return value

        edges = {0.0, 1.0}
        for j, dj in enumerate(dists):
            mean, sd = float(dj.mean()), float(dj.std())
            edges |= {mean + z * sd + bonus[j] - bonus[i] for z in np.arange(-12.0, 12.5, 1.0)}
        points = sorted(e for e in edges if 0.0 <= e <= 1.0)
        total = 0.0
        for lo, hi in itertools.pairwise(points):
            # full_output: quad reports rather than warns where a density is infinite at 0 or
            # 1 (shapes below 1); the results still sum to 1 within 1e-8, checked below.
            total += integrate.quad(
                integrand, lo, hi, epsabs=0.0, epsrel=1e-11, limit=200, full_output=1
            )[0]
        out.append(total)
    return out


# (prior alpha, prior beta, exploration, per-variant (allocations, conversions))
CASES = [
    pytest.param(1.0, 1.0, 0.01, [(1000, 40), (1000, 60), (1000, 50)], id="everyday-3"),
    pytest.param(
        1.0,
        1.0,
        0.01,
        [(5000, 200), (5000, 290), (5000, 250), (5000, 240), (5000, 270)],
        id="small-probabilities-5",
    ),
    pytest.param(1.0, 1.0, 0.0, [(5000, 200), (5000, 300)], id="tiny-1e-6"),
    pytest.param(
        1.0,
        1.0,
        0.0,
        [(2_000_000, 1_000_000), (2_001_000, 1_001_000), (1_999_000, 999_000)],
        id="parameters-1e6",
    ),
    pytest.param(1.0, 1.0, 0.0, [(0, 0), (999, 0), (999_999, 0)], id="scales-1-to-1e6"),
    pytest.param(0.5, 0.5, 0.05, [(0, 0), (3, 1), (10, 2)], id="shapes-below-1-bonus"),
    pytest.param(
        1.0, 1.0, 0.05, [(10, 1), (20, 3), (15, 2), (30, 6), (12, 1)], id="cold-start-5-bonus"
    ),
]


def engine_with(
    prior_alpha: float, prior_beta: float, exploration: float, counts: list[tuple[int, int]]
) -> Engine:
    engine = Engine()
    engine.configure(
        EXPERIMENT,
        variants=len(counts),
        dimensions=[],
        min_samples=[],
        prior_alpha=prior_alpha,
        prior_beta=prior_beta,
        exploration=exploration,
    )
    g = key_hash("")
    engine.load_counts(
        [(EXPERIMENT, g, v, n, c, float(c)) for v, (n, c) in enumerate(counts) if n > 0]
    )
    return engine


@pytest.mark.parametrize(("prior_alpha", "prior_beta", "exploration", "counts"), CASES)
def test_propensities_match_scipy_integration(
    prior_alpha: float, prior_beta: float, exploration: float, counts: list[tuple[int, int]]
) -> None:
    engine = engine_with(prior_alpha, prior_beta, exploration, counts)
    alphas = [prior_alpha + c for _, c in counts]
    betas = [prior_beta + n - c for n, c in counts]
    bonus = [exploration / math.sqrt(n + 1) for n, _ in counts]
    want = scipy_selection(alphas, betas, bonus)
    got = engine.propensities(EXPERIMENT, "")
    assert sum(got) == pytest.approx(1.0, abs=1e-12)
    assert sum(want) == pytest.approx(1.0, abs=1e-8)
    for g, w in zip(got, want, strict=True):
        # Relative accuracy, the smallest probabilities included (inverse weights use them).
        assert g == pytest.approx(w, rel=1e-5, abs=1e-300), (got, want)


def test_tiny_probabilities_are_exact_not_floored() -> None:
    # The Monte Carlo estimate this replaced floored every share at 1/(K * 513); here the
    # losing variant's true probability is about 3e-6.
    engine = engine_with(1.0, 1.0, 0.0, [(5000, 200), (5000, 300)])
    low, high = engine.propensities(EXPERIMENT, "")
    assert 1e-7 < low < 1e-5 < 1 - 1e-5 < high


def test_a_decision_logs_the_propensity_of_its_variant() -> None:
    seed_rng(3)
    engine = engine_with(1.0, 1.0, 0.01, [(1000, 40), (1000, 60), (1000, 50)])
    exact = engine.propensities(EXPERIMENT, "")
    seen = set()
    for i in range(2000):
        variant, _level, propensity, _key = engine.decide(EXPERIMENT, f"u{i}", [], record=False)
        assert propensity == exact[variant]
        seen.add(variant)
    assert seen == {0, 1, 2}
    # And the choices follow those probabilities (chi-square goodness of fit).
    picks = np.bincount(
        [engine.decide(EXPERIMENT, f"v{i}", [], record=False)[0] for i in range(20_000)],
        minlength=3,
    )
    assert stats.chisquare(picks, np.array(exact) * picks.sum()).pvalue > 1e-3


def test_decisions_pick_as_often_as_a_beta_draw_per_variant_does() -> None:
    # A decision picks by the kept state's selection probabilities instead of drawing a Beta
    # per variant; both must choose each variant equally often. NumPy's Beta sampler (not
    # ours) makes the reference Thompson draws, bonus included.
    seed_rng(5)
    counts = [(400, 20), (400, 26), (400, 23), (400, 17), (400, 25)]
    exploration = 0.02
    engine = engine_with(1.0, 1.0, exploration, counts)
    n = 40_000
    decided = np.bincount(
        [engine.decide(EXPERIMENT, f"d{i}", [], record=False)[0] for i in range(n)],
        minlength=len(counts),
    )
    rng = np.random.default_rng(5)
    alphas = np.array([1.0 + c for _, c in counts])
    betas = np.array([1.0 + a - c for a, c in counts])
    bonus = np.array([exploration / math.sqrt(a + 1) for a, _ in counts])
    drawn = np.bincount(
        (rng.beta(alphas, betas, size=(n, len(counts))) + bonus).argmax(axis=1),
        minlength=len(counts),
    )
    assert decided.min() > 500  # every variant is chosen often enough to compare
    assert stats.chi2_contingency(np.vstack([decided, drawn])).pvalue > 1e-3
