"""Simulator sanity: oracle regret 0, uniform regret at its expectation, identical streams for
every policy, reproducibility, the cascade learning per segment, k-means, `allocsvc simulate`."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from allocsvc.cli import main
from allocsvc.quality.policies import fit_clusters, silhouette, standard_policies
from allocsvc.quality.scenarios import SCENARIOS, draw_users, scenario
from allocsvc.quality.simulator import bootstrap, compare, run_policy, run_stream

pytestmark = pytest.mark.unit

USERS = 6000
POLICIES = ["global_ts", "cascade"]


def test_every_scenario_draws_valid_streams() -> None:
    for name in SCENARIOS:
        truth = scenario(name)
        users = draw_users(truth, 2000, seed=3)
        assert np.isclose(truth.traffic.sum(), 1.0)
        assert users.rates.shape == (2000, truth.variants)
        assert np.all((users.rates > 0) & (users.rates < 1))
        assert users.leaf.max() < len(truth.leaves)


def test_same_seed_same_stream_other_seed_another() -> None:
    truth = scenario("new_segment")
    a, b, c = (draw_users(truth, 3000, s) for s in (5, 5, 6))
    for field in ("leaf", "type", "features", "draw", "rates"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.draw, c.draw)
    # The new country's leaves appear only from half way on.
    new = np.isin(a.leaf, truth.new_leaves)
    assert not new[:1500].any() and new[1500:].any()


def test_every_policy_sees_the_same_users_and_draws() -> None:
    truth = scenario("heterogeneous")
    users = draw_users(truth, USERS, seed=2)
    specs = standard_policies(truth.dimensions, truth.variants)
    traces = {p: run_policy(specs[p], truth, users) for p in ("uniform", "global_ts", "cascade")}
    for trace in traces.values():
        # converted is exactly `draw < true rate of the chosen variant` on the shared stream.
        chosen = users.rates[np.arange(USERS), trace.variant]
        np.testing.assert_array_equal(trace.converted, users.draw < chosen)
        np.testing.assert_allclose(trace.regret, users.best_rate - chosen)
    # Same seed, same decisions: the runs are reproducible.
    again = run_policy(specs["cascade"], truth, draw_users(truth, USERS, seed=2))
    np.testing.assert_array_equal(again.variant, traces["cascade"].variant)
    np.testing.assert_array_equal(again.propensity, traces["cascade"].propensity)


def test_oracle_regret_is_zero_and_it_converts_best() -> None:
    runs = run_stream("heterogeneous", 1, USERS, ["oracle", "uniform", "global_ts", "cascade"])
    by = {r.policy: r for r in runs}
    assert by["oracle"].regret == 0.0
    assert all(r.regret > 0 for r in runs if r.policy != "oracle")
    assert by["oracle"].expected_rate == max(r.expected_rate for r in runs)


def test_uniform_regret_matches_its_expected_value() -> None:
    truth = scenario("homogeneous")
    spec = standard_policies(truth.dimensions, truth.variants)["uniform"]
    n = 20_000
    users = draw_users(truth, n, seed=9)
    trace = run_policy(spec, truth, users)
    # Expected regret of a uniform split: each user's best rate minus the mean of its rates.
    gaps = users.best_rate[:, None] - users.rates
    expected = (gaps.mean(1)).sum()
    # Variance of the per-user regret under uniform choice, for a 4-sigma band.
    sd = np.sqrt(((gaps - gaps.mean(1, keepdims=True)) ** 2).mean(1).sum())
    assert abs(trace.regret.sum() - expected) < 4 * sd
    # The hash split is close to equal shares (chi-square against 1/3 each).
    counts = np.bincount(trace.variant, minlength=3)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert np.allclose(trace.propensity, 1 / 3)


def test_cascade_learns_the_segment_best_and_beats_global_on_heterogeneous() -> None:
    # Segments serve once a tree has kept them, which under global sampling (that hardly
    # explores the variants it is sure of) takes tens of thousands of users here, and more
    # on some streams than on others: three streams, pooled.
    runs = [r for seed in (1, 2, 3) for r in run_stream("heterogeneous", seed, 60_000, POLICIES)]
    regret = {p: sum(r.regret for r in runs if r.policy == p) for p in POLICIES}
    assert regret["cascade"] < 0.8 * regret["global_ts"]
    # It used segment levels, not only the global node.
    cascade = [r for r in runs if r.policy == "cascade"]
    assert sum(c for r in cascade for lv, c in r.levels.items() if lv > 0) > 0.3 * 180_000


def test_tree_policies_serve_globally_until_their_first_tree() -> None:
    truth = scenario("heterogeneous")
    users = draw_users(truth, USERS, seed=2)
    specs = standard_policies(truth.dimensions, truth.variants)
    never = run_policy(specs["cascade"], truth, users, rebuild_every=0, first_rebuild=0)
    assert set(never.level.tolist()) == {0}
    # Without a tree at all (the policy that never builds one) every node may serve.
    unpruned = run_policy(specs["cascade_unpruned"], truth, users)
    assert (unpruned.level == 3).mean() > 0.3


def test_cascade_keeps_no_segment_where_there_is_nothing_to_find() -> None:
    runs = run_stream("homogeneous", 4, 30_000, ["cascade", "cascade_unpruned"])
    by = {r.policy: r for r in runs}
    assert by["cascade"].levels == {0: 30_000}
    assert by["cascade_unpruned"].levels.get(3, 0) > 20_000


def test_propensities_are_probabilities_of_the_chosen_variant() -> None:
    truth = scenario("homogeneous")
    spec = standard_policies(truth.dimensions, truth.variants)["global_ts"]
    trace = run_policy(spec, truth, draw_users(truth, 20_000, seed=1))
    assert np.all((trace.propensity > 0) & (trace.propensity <= 1))
    # Variant 2 is best everywhere: late in the run what is chosen is chosen with high
    # probability (it exploits), early it is not.
    assert trace.propensity[-1000:].mean() > trace.propensity[:200].mean()


def test_compare_pairs_seeds_and_bootstrap_brackets_the_mean() -> None:
    runs = [
        r
        for seed in (1, 2, 3)
        for r in run_stream("homogeneous", seed, 3000, ["uniform", "global_ts"])
    ]
    rows = {r.policy: r for r in compare(runs, resamples=500)}
    assert rows["global_ts"].regret_ratio is None
    ratio = rows["uniform"].regret_ratio
    assert ratio is not None and ratio.low <= ratio.value <= ratio.high
    x = np.array([1.0, 2.0, 3.0, 4.0])
    ci = bootstrap([x], lambda v: float(v.mean()))
    assert ci.value == 2.5 and 1.0 <= ci.low < 2.5 < ci.high <= 4.0


def test_kmeans_finds_the_clusters_of_the_cluster_scenario() -> None:
    truth = scenario("clusters")
    users = draw_users(truth, 1500, seed=1)
    model = fit_clusters(users.features, seed=1)
    assert len(model.centroids) == 4
    labels = model.assign(users.features)
    # Each found cluster is (almost) one true cluster.
    for j in range(4):
        members = users.type[labels == j]
        assert np.bincount(members).max() >= 0.95 * len(members)


def test_silhouette_matches_sklearn_formula_on_a_small_case() -> None:
    x = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 0.0], [5.0, 1.0], [5.0, 2.0]])
    labels = np.array([0, 0, 1, 1, 1])
    # Point 0: a = 1, b = mean(5, sqrt(26), sqrt(29)); s = (b - a) / b. Etc.
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    expected = []
    for i in range(5):
        same = labels == labels[i]
        a = d[i, same].sum() / (same.sum() - 1)
        b = d[i, ~same].mean()
        expected.append((b - a) / max(a, b))
    assert silhouette(x, labels) == pytest.approx(np.mean(expected))


def test_simulate_command_prints_the_table() -> None:
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--scenario",
            "homogeneous",
            "--policy",
            "uniform",
            "--policy",
            "global_ts",
            "--seeds",
            "2",
            "--users",
            "2000",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| homogeneous | uniform |" in result.output
    assert "| homogeneous | global_ts |" in result.output
    bad = CliRunner().invoke(main, ["simulate", "--scenario", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output
