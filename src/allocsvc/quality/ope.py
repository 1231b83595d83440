"""Off-policy evaluation: the value of a candidate policy estimated from another policy's logs.

A log row is (context, variant, propensity, reward): the variant the logging policy chose, the
probability it had of choosing it, and whether the user converted. A candidate policy is given as
`action_dist[i, k]`, its probability of choosing variant k in row i's context. The estimators and
their names follow Open Bandit Pipeline (`obp.ope`, Saito et al. 2021), with no clipping:

- IPS (Horvitz & Thompson 1952; Precup et al. 2000): V = 1/n sum_i w_i r_i,
  w_i = pi_e(a_i | x_i) / pi_b(a_i | x_i).
- SNIPS (Swaminathan & Joachims 2015): V = sum_i w_i r_i / sum_i w_i.
- DR (Dudik et al. 2014): V = 1/n sum_i [ sum_k pi_e(k | x_i) q(x_i, k) + w_i (r_i - q(x_i, a_i)) ]
  with q a reward model.

Intervals are normal-approximation 95% intervals over the per-row terms (for SNIPS by the delta
method: terms w_i (r_i - V) / mean(w)); obp reports bootstrap intervals instead, which agree for
large n.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allocsvc.quality.scenarios import FloatArray, IntArray

Z95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Estimate:
    """One estimator's value of the candidate policy, with a 95% interval."""

    estimator: str
    value: float
    low: float
    high: float

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass(frozen=True, eq=False)
class BanditLog:
    """Logged bandit feedback; `contexts` index into `context_names`."""

    contexts: IntArray
    context_names: tuple[str, ...]
    variants: IntArray
    propensities: FloatArray
    rewards: FloatArray
    variant_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.variants)

    @property
    def n_variants(self) -> int:
        return len(self.variant_names)


def _check(
    reward: FloatArray, action: IntArray, pscore: FloatArray, action_dist: FloatArray
) -> None:
    n = len(reward)
    if n == 0:
        raise ValueError("reward: the log is empty")
    if len(action) != n or len(pscore) != n or action_dist.shape[0] != n:
        raise ValueError("reward, action, pscore, action_dist: lengths differ")
    if np.any(pscore <= 0) or np.any(pscore > 1):
        raise ValueError("pscore: propensities must be in (0, 1]")
    if np.any(action < 0) or np.any(action >= action_dist.shape[1]):
        raise ValueError("action: variant index out of range")


def _weights(action: IntArray, pscore: FloatArray, action_dist: FloatArray) -> FloatArray:
    return np.asarray(action_dist[np.arange(len(action)), action] / pscore, dtype=np.float64)


def _normal(name: str, terms: FloatArray, value: float) -> Estimate:
    n = len(terms)
    se = float(terms.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return Estimate(name, value, value - Z95 * se, value + Z95 * se)


def ips(
    reward: FloatArray, action: IntArray, pscore: FloatArray, action_dist: FloatArray
) -> Estimate:
    """Inverse propensity scoring: mean of w_i r_i."""
    _check(reward, action, pscore, action_dist)
    terms = _weights(action, pscore, action_dist) * reward
    return _normal("ips", terms, float(terms.mean()))


def snips(
    reward: FloatArray, action: IntArray, pscore: FloatArray, action_dist: FloatArray
) -> Estimate:
    """Self-normalised IPS: sum w_i r_i / sum w_i (bias O(1/n), much less variance)."""
    _check(reward, action, pscore, action_dist)
    w = _weights(action, pscore, action_dist)
    if w.sum() <= 0:
        return Estimate("snips", float("nan"), float("nan"), float("nan"))
    value = float((w * reward).sum() / w.sum())
    return _normal("snips", w * (reward - value) / w.mean(), value)


def dr(
    reward: FloatArray,
    action: IntArray,
    pscore: FloatArray,
    action_dist: FloatArray,
    estimated_rewards: FloatArray,
) -> Estimate:
    """Doubly robust: the reward model's value of pi_e plus the IPS-weighted model residual."""
    _check(reward, action, pscore, action_dist)
    if estimated_rewards.shape != action_dist.shape:
        raise ValueError("estimated_rewards: must have the shape of action_dist")
    rows = np.arange(len(action))
    w = _weights(action, pscore, action_dist)
    terms = (action_dist * estimated_rewards).sum(1) + w * (
        reward - estimated_rewards[rows, action]
    )
    return _normal("dr", terms, float(terms.mean()))


def reward_model(log: BanditLog, prior_strength: float = 20.0) -> FloatArray:
    """q(context, variant) per context, shape (contexts, variants): each cell's conversion rate
    shrunk toward the variant's overall rate with `prior_strength` pseudo-observations."""
    k = log.n_variants
    c = len(log.context_names)
    n = np.zeros((c, k))
    s = np.zeros((c, k))
    np.add.at(n, (log.contexts, log.variants), 1.0)
    np.add.at(s, (log.contexts, log.variants), log.rewards)
    overall = (s.sum(0) + 0.5) / (n.sum(0) + 1.0)
    return np.asarray((s + prior_strength * overall) / (n + prior_strength), dtype=np.float64)


def evaluate(log: BanditLog, target: FloatArray) -> list[Estimate]:
    """IPS, SNIPS and DR of a candidate policy given per context: `target[c, k]`."""
    if target.shape != (len(log.context_names), log.n_variants):
        raise ValueError("target: needs one row per context and one column per variant")
    action_dist = target[log.contexts]
    q = reward_model(log)[log.contexts]
    args = (log.rewards, log.variants, log.propensities, action_dist)
    return [ips(*args), snips(*args), dr(*args, q)]


def on_policy(log: BanditLog) -> Estimate:
    """The logging policy's own value: the mean reward, with a normal 95% interval."""
    return _normal("on_policy", log.rewards, float(log.rewards.mean()))


def effective_sample_size(log: BanditLog, target: FloatArray) -> float:
    """Kish's effective sample size of the importance weights, (sum w)^2 / sum w^2."""
    w = _weights(log.variants, log.propensities, target[log.contexts])
    return float(w.sum() ** 2 / (w * w).sum()) if np.any(w > 0) else 0.0


# Log files and candidate policies -------------------------------------------------------------

LOG_FIELDS = ("context", "variant", "propensity", "reward")


def make_log(
    contexts: Sequence[str],
    variants: Sequence[str] | Sequence[int],
    propensities: Iterable[float],
    rewards: Iterable[float],
    variant_names: Sequence[str] | None = None,
) -> BanditLog:
    """A `BanditLog` from parallel columns; variant names are sorted unless given."""
    names = (
        tuple(variant_names)
        if variant_names is not None
        else tuple(sorted({str(v) for v in variants}))
    )
    index = {v: i for i, v in enumerate(names)}
    try:
        actions = np.array([index[str(v)] for v in variants], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"variant: {exc.args[0]!r} is not one of {list(names)}") from None
    context_names = tuple(dict.fromkeys(contexts))
    by_context = {c: i for i, c in enumerate(context_names)}
    return BanditLog(
        contexts=np.array([by_context[c] for c in contexts], dtype=np.int64),
        context_names=context_names,
        variants=actions,
        propensities=np.array(list(propensities), dtype=np.float64),
        rewards=np.array(list(rewards), dtype=np.float64),
        variant_names=names,
    )


def read_log(path: Path) -> BanditLog:
    """A log file: CSV with a header, or JSON lines, with fields context, variant, propensity,
    reward (context is any string, e.g. the assignment's segment key; reward 0/1 or a value)."""
    rows: list[Mapping[str, object]]
    with path.open(newline="") as f:
        if path.suffix in {".jsonl", ".json", ".ndjson"}:
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for i, row in enumerate(rows):
        missing = [k for k in LOG_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i + 1} lacks {', '.join(missing)}")
    return make_log(
        [str(r["context"]) for r in rows],
        [str(r["variant"]) for r in rows],
        [float(str(r["propensity"])) for r in rows],
        [float(str(r["reward"])) for r in rows],
    )


def write_log(path: Path, log: BanditLog) -> None:
    """Write a log as CSV (the format `read_log` and `allocsvc evaluate` take)."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(LOG_FIELDS)
        for c, a, p, r in zip(
            log.contexts, log.variants, log.propensities, log.rewards, strict=True
        ):
            out.writerow(
                [log.context_names[c], log.variant_names[a], repr(float(p)), repr(float(r))]
            )


def target_policy(log: BanditLog, spec: str) -> FloatArray:
    """A candidate policy over the log's contexts, shape (contexts, variants), from a spec:

    - `uniform`: every variant equally;
    - `variant:NAME`: always that variant;
    - `greedy`: per context the variant with the best reward-model estimate (fit on this same
      log, so its estimate is optimistic);
    - a path to a JSON file `{"context": {"variant": probability, ...}, "*": {...}}` where `*`
      is the default for contexts not listed.
    """
    c, k = len(log.context_names), log.n_variants
    if spec == "uniform":
        return np.full((c, k), 1.0 / k)
    if spec.startswith("variant:"):
        name = spec.split(":", 1)[1]
        if name not in log.variant_names:
            raise ValueError(
                f"target: variant {name!r} is not in the log {list(log.variant_names)}"
            )
        out = np.zeros((c, k))
        out[:, log.variant_names.index(name)] = 1.0
        return out
    if spec == "greedy":
        best = reward_model(log).argmax(1)
        out = np.zeros((c, k))
        out[np.arange(c), best] = 1.0
        return out
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"target: {spec!r} is not uniform, variant:NAME, greedy or a JSON file")
    table = json.loads(path.read_text())
    out = np.zeros((c, k))
    for i, context in enumerate(log.context_names):
        row = table.get(context, table.get("*"))
        if row is None:
            raise ValueError(f"target: no probabilities for context {context!r} and no '*'")
        for name, p in row.items():
            if name not in log.variant_names:
                raise ValueError(f"target: variant {name!r} is not in the log")
            out[i, log.variant_names.index(name)] = float(p)
        if not math.isclose(out[i].sum(), 1.0, abs_tol=1e-6):
            raise ValueError(f"target: probabilities for {context!r} sum to {out[i].sum()}")
    return out
