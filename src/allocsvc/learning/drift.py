"""Drift between the training data of a model and recent traffic: PSI per feature.

The population stability index of one feature compares the share of values in each of B bins:

    PSI = Σ_b (a_b − e_b) · ln(a_b / e_b)

with e_b the training ("expected") share and a_b the recent ("actual") share of bin b; shares are
floored at 1e-4 so that an empty bin does not make the index infinite (Siddiqi, *Credit Risk
Scorecards*, 2006, ch. 8; the usual reading: < 0.1 stable, 0.1–0.25 some shift, > 0.25 a large
shift). Bins are B equal-width intervals over the feature's known range ([0, 1], or [-1, 1] for the
cyclic hour/weekday features), so the reference is fixed when the model is trained.

The drift of a model is the largest PSI over its features (one feature that moved is enough to
retrain); the per-feature values are reported with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

DEFAULT_BINS = 10
SHARE_FLOOR = 1e-4


def histogram(
    values: npt.NDArray[np.float64], low: float, high: float, bins: int = DEFAULT_BINS
) -> list[float]:
    """Share of `values` in each of `bins` equal-width bins over [low, high] (ends included)."""
    if len(values) == 0:
        return [0.0] * bins
    scaled = (np.clip(values, low, high) - low) / (high - low) * bins
    index = np.minimum(scaled.astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    return [float(c) / len(values) for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two bin-share vectors of the same length."""
    if len(expected) != len(actual):
        raise ValueError("expected and actual need the same number of bins")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e = max(e, SHARE_FLOOR)
        a = max(a, SHARE_FLOOR)
        total += (a - e) * math.log(a / e)
    return total


def reference(
    matrix: npt.NDArray[np.float64],
    ranges: Sequence[tuple[float, float]],
    bins: int = DEFAULT_BINS,
) -> list[list[float]]:
    """Bin shares of every feature (column) of the training matrix."""
    return [histogram(matrix[:, j], lo, hi, bins) for j, (lo, hi) in enumerate(ranges)]


@dataclass(frozen=True, slots=True)
class DriftReport:
    """Drift of recent traffic against a model's training data."""

    drift: float  # the largest per-feature PSI
    per_feature: dict[str, float]
    samples: int  # recent rows compared
    threshold: float

    @property
    def exceeded(self) -> bool:
        return self.drift > self.threshold


def measure(
    expected: Sequence[Sequence[float]],
    recent: npt.NDArray[np.float64],
    ranges: Sequence[tuple[float, float]],
    names: Sequence[str],
    threshold: float,
) -> DriftReport:
    """PSI of each feature of `recent` against the training bin shares `expected`."""
    per_feature = {
        name: psi(shares, histogram(recent[:, j], lo, hi, len(shares)))
        for j, (name, shares, (lo, hi)) in enumerate(zip(names, expected, ranges, strict=True))
    }
    return DriftReport(max(per_feature.values(), default=0.0), per_feature, len(recent), threshold)
