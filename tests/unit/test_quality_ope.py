"""Off-policy estimators: Open Bandit Pipeline's published formulas on hand-checked examples,
unbiasedness on a known logging policy, log files and the `allocsvc evaluate` command.

obp itself does not install cleanly next to this project's numpy/scikit-learn (pip resolves it to
obp 0.4.1 and a full torch), so the estimators are checked against obp's formulas
(`obp.ope.InverseProbabilityWeighting`, `SelfNormalizedInverseProbabilityWeighting`,
`DoublyRobust`, no clipping), written out by hand below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from allocsvc.cli import main
from allocsvc.quality import ope

pytestmark = pytest.mark.unit

# Four logged rows, two variants. Hand-computed below.
REWARD = np.array([1.0, 0.0, 1.0, 0.0])
ACTION = np.array([0, 1, 1, 0])
PSCORE = np.array([0.5, 0.25, 0.75, 0.5])
# Target: row-wise probabilities of the two variants.
ACTION_DIST = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]])
Q = np.array([[0.6, 0.2], [0.5, 0.5], [0.1, 0.9], [0.3, 0.4]])


def test_ips_matches_the_hand_computed_value() -> None:
    # w = [1/0.5, 0.5/0.25, 0.8/0.75, 0/0.5] = [2, 2, 16/15, 0]; w*r = [2, 0, 16/15, 0]
    est = ope.ips(REWARD, ACTION, PSCORE, ACTION_DIST)
    assert est.value == pytest.approx((2 + 16 / 15) / 4)
    terms = np.array([2.0, 0.0, 16 / 15, 0.0])
    se = terms.std(ddof=1) / 2
    assert est.low == pytest.approx(est.value - 1.959963984540054 * se)
    assert est.high == pytest.approx(est.value + 1.959963984540054 * se)


def test_snips_matches_the_hand_computed_value() -> None:
    # sum w r / sum w = (2 + 16/15) / (2 + 2 + 16/15)
    est = ope.snips(REWARD, ACTION, PSCORE, ACTION_DIST)
    assert est.value == pytest.approx((2 + 16 / 15) / (4 + 16 / 15))


def test_dr_matches_the_hand_computed_value() -> None:
    # model value of pi_e per row: [0.6, 0.5, 0.02 + 0.72, 0.4]
    # residual term w (r - q(a)): [2 (1 - 0.6), 2 (0 - 0.5), 16/15 (1 - 0.9), 0]
    rows = [0.6 + 0.8, 0.5 - 1.0, 0.74 + 16 / 150, 0.4]
    est = ope.dr(REWARD, ACTION, PSCORE, ACTION_DIST, Q)
    assert est.value == pytest.approx(sum(rows) / 4)


def test_dr_with_a_perfect_model_and_ips_with_on_policy_weights() -> None:
    rng = np.random.default_rng(4)
    n, k = 2000, 3
    pscore_all = rng.dirichlet(np.ones(k), n)
    action = np.array([rng.choice(k, p=p) for p in pscore_all])
    pscore = pscore_all[np.arange(n), action]
    reward = rng.random(n)
    # Evaluating the logging policy itself: every weight is 1, IPS = SNIPS = mean reward.
    assert ope.ips(reward, action, pscore, pscore_all).value == pytest.approx(reward.mean())
    assert ope.snips(reward, action, pscore, pscore_all).value == pytest.approx(reward.mean())
    # A model that is exact on the logged actions leaves DR equal to the model's value.
    q = rng.random((n, k))
    q[np.arange(n), action] = reward
    target = rng.dirichlet(np.ones(k), n)
    expected = (target * q).sum(1).mean()
    assert ope.dr(reward, action, pscore, target, q).value == pytest.approx(expected)


def test_estimators_are_unbiased_on_a_known_logging_policy() -> None:
    # Logging: per context a fixed non-uniform split; rewards Bernoulli with known rates.
    rng = np.random.default_rng(8)
    rates = np.array([[0.02, 0.05, 0.08], [0.09, 0.03, 0.04]])
    logging = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    target = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    true_value = 0.5 * 0.08 + 0.5 * 0.09
    misses = {"ips": 0, "snips": 0, "dr": 0}
    runs = 40
    for _ in range(runs):
        n = 20_000
        context = rng.integers(0, 2, n)
        cumulative = logging[context].cumsum(1)
        action = (rng.random(n)[:, None] >= cumulative).sum(1)
        reward = (rng.random(n) < rates[context, action]).astype(float)
        log = ope.BanditLog(
            contexts=context,
            context_names=("a", "b"),
            variants=action,
            propensities=logging[context, action],
            rewards=reward,
            variant_names=("v0", "v1", "v2"),
        )
        for est in ope.evaluate(log, target):
            misses[est.estimator] += not est.covers(true_value)
    # 95% intervals: about 2 misses in 40; more than 8 would mean bias or a wrong interval.
    assert all(m <= 8 for m in misses.values()), misses


def test_input_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="pscore"):
        ope.ips(REWARD, ACTION, np.array([0.5, 0.0, 0.5, 0.5]), ACTION_DIST)
    with pytest.raises(ValueError, match="action"):
        ope.ips(REWARD, np.array([0, 1, 2, 0]), PSCORE, ACTION_DIST)
    with pytest.raises(ValueError, match="estimated_rewards"):
        ope.dr(REWARD, ACTION, PSCORE, ACTION_DIST, Q[:, :1])


def _write_log(path: Path, rng: np.random.Generator, n: int = 4000) -> None:
    rates = {"country:us": [0.04, 0.08], "country:de": [0.10, 0.02]}
    lines = []
    for _ in range(n):
        context = "country:us" if rng.random() < 0.5 else "country:de"
        variant = int(rng.random() < 0.5)
        reward = int(rng.random() < rates[context][variant])
        lines.append(
            json.dumps(
                {"context": context, "variant": f"v{variant}", "propensity": 0.5, "reward": reward}
            )
        )
    path.write_text("\n".join(lines) + "\n")


def test_log_round_trip_and_target_specs(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    _write_log(tmp_path / "log.jsonl", rng)
    log = ope.read_log(tmp_path / "log.jsonl")
    assert len(log) == 4000 and log.variant_names == ("v0", "v1")
    ope.write_log(tmp_path / "log.csv", log)
    again = ope.read_log(tmp_path / "log.csv")
    np.testing.assert_array_equal(again.variants, log.variants)
    np.testing.assert_array_equal(again.rewards, log.rewards)
    assert again.context_names == log.context_names
    greedy = ope.target_policy(log, "greedy")
    us, de = log.context_names.index("country:us"), log.context_names.index("country:de")
    assert greedy[us].tolist() == [0.0, 1.0] and greedy[de].tolist() == [1.0, 0.0]
    (tmp_path / "t.json").write_text(json.dumps({"*": {"v0": 0.25, "v1": 0.75}}))
    assert ope.target_policy(log, str(tmp_path / "t.json")).tolist() == [[0.25, 0.75]] * 2
    with pytest.raises(ValueError, match="target"):
        ope.target_policy(log, "variant:nope")


def test_evaluate_command(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    _write_log(tmp_path / "log.jsonl", rng, n=20_000)
    result = CliRunner().invoke(
        main, ["evaluate", str(tmp_path / "log.jsonl"), "--target", "variant:v1", "--as-json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["rows"] == 20_000
    values = {e["estimator"]: e for e in out["estimates"]}
    # Always v1: 0.5 * 0.08 + 0.5 * 0.02 = 0.05.
    for name in ("ips", "snips", "dr"):
        assert values[name]["low"] <= 0.05 <= values[name]["high"], values[name]
    text = CliRunner().invoke(main, ["evaluate", str(tmp_path / "log.jsonl")])
    assert text.exit_code == 0 and "snips" in text.output
    bad = CliRunner().invoke(main, ["evaluate", str(tmp_path / "log.jsonl"), "--target", "nope"])
    assert bad.exit_code != 0 and "target" in bad.output
