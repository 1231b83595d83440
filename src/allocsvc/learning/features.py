"""The feature vector of one request (SPEC §5): 20 numbers, the same in training and serving.

`raw_features` takes the few fields of an extracted context that learning uses (cheap enough for
the hot path); `FeatureNormaliser` turns them into the vector. Training and serving call the same
`transform`, so a context maps to the same vector in both.

Layout (20 dimensions):
- channel one-hot: web, email, funnel, push (4)
- device one-hot: mobile, desktop, tablet, other (4)
- source one-hot: the `max_sources` most frequent sources of the training data, then other (4)
- hour of day as sin/cos of 2πh/24, day of week as sin/cos of 2πd/7 (4), each in [-1, 1]
- min-max scaled signals clipped to [0, 1]: pages_viewed, time_seconds, engagement_score,
  drop_risk (4); a missing signal counts as the training minimum (0)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from allocsvc.context.extraction import ExtractedContext

CHANNELS: Final = ("web", "email", "funnel", "push")
DEVICES: Final = ("mobile", "desktop", "tablet")
SIGNALS: Final = ("pages_viewed", "time_seconds", "engagement_score", "drop_risk")
DEFAULT_MAX_SOURCES: Final = 3
OTHER: Final = "other"

_HOUR_SIN: Final = tuple(math.sin(2 * math.pi * h / 24) for h in range(24))
_HOUR_COS: Final = tuple(math.cos(2 * math.pi * h / 24) for h in range(24))
_DAY_SIN: Final = tuple(math.sin(2 * math.pi * d / 7) for d in range(7))
_DAY_COS: Final = tuple(math.cos(2 * math.pi * d / 7) for d in range(7))
_CHANNEL_ONE_HOT: Final = {
    c: tuple(1.0 if i == j else 0.0 for j in range(len(CHANNELS))) for i, c in enumerate(CHANNELS)
}
_DEVICE_ONE_HOT: Final = {
    d: tuple(1.0 if i == j else 0.0 for j in range(len(DEVICES) + 1))
    for i, d in enumerate((*DEVICES, OTHER))
}


class RawFeatures(NamedTuple):
    """What learning keeps of one request's context (plain values, cheap to copy and send)."""

    channel: str
    device: str
    source: str
    hour: int
    day_of_week: int
    pages_viewed: float | None = None
    time_seconds: float | None = None
    engagement_score: float | None = None
    drop_risk: float | None = None


def raw_features(context: ExtractedContext) -> RawFeatures:
    return RawFeatures(
        context.channel,
        context.device,
        context.source,
        context.hour,
        context.day_of_week,
        context.pages_viewed,
        context.time_seconds,
        context.engagement_score,
        context.drop_risk,
    )


@dataclass(frozen=True, slots=True)
class FeatureNormaliser:
    """Fitted parameters of the feature vector; JSON round-trips exactly."""

    sources: tuple[str, ...]
    minimum: tuple[float, ...]
    maximum: tuple[float, ...]
    max_sources: int = DEFAULT_MAX_SOURCES

    @classmethod
    def fit(
        cls, rows: Iterable[RawFeatures], max_sources: int = DEFAULT_MAX_SOURCES
    ) -> FeatureNormaliser:
        """Most frequent sources (ties by name) and the min/max of each signal."""
        counts: Counter[str] = Counter()
        lows = [math.inf] * len(SIGNALS)
        highs = [-math.inf] * len(SIGNALS)
        for row in rows:
            counts[row.source] += 1
            for i, value in enumerate(row[5:]):
                if value is not None:
                    lows[i] = min(lows[i], value)
                    highs[i] = max(highs[i], value)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        sources = tuple(source for source, _ in ranked[:max_sources])
        minimum = tuple(0.0 if math.isinf(lo) else lo for lo in lows)
        maximum = tuple(lo if math.isinf(hi) else hi for lo, hi in zip(minimum, highs, strict=True))
        return cls(sources, minimum, maximum, max_sources)

    @property
    def dimensions(self) -> int:
        return len(CHANNELS) + len(DEVICES) + 1 + self.max_sources + 1 + 4 + len(SIGNALS)

    @property
    def feature_names(self) -> list[str]:
        padded = [*self.sources, *(f"_unused{i}" for i in range(self.max_sources))]
        return [
            *(f"channel={c}" for c in CHANNELS),
            *(f"device={d}" for d in (*DEVICES, OTHER)),
            *(f"source={s}" for s in padded[: self.max_sources]),
            f"source={OTHER}",
            "hour_sin",
            "hour_cos",
            "weekday_sin",
            "weekday_cos",
            *SIGNALS,
        ]

    @property
    def feature_ranges(self) -> list[tuple[float, float]]:
        """The interval each feature lies in (cyclic ones in [-1, 1], the rest in [0, 1])."""
        ranges = [(0.0, 1.0)] * self.dimensions
        first_cyclic = len(CHANNELS) + len(DEVICES) + 1 + self.max_sources + 1
        for i in range(first_cyclic, first_cyclic + 4):
            ranges[i] = (-1.0, 1.0)
        return ranges

    def transform(self, row: RawFeatures) -> list[float]:
        """The feature vector of one request (serving and training both call this)."""
        vector = [
            *_CHANNEL_ONE_HOT.get(row.channel, (0.0,) * len(CHANNELS)),
            *_DEVICE_ONE_HOT.get(row.device, _DEVICE_ONE_HOT[OTHER]),
        ]
        slots = [0.0] * (self.max_sources + 1)
        try:
            slots[self.sources.index(row.source)] = 1.0
        except ValueError:
            slots[self.max_sources] = 1.0
        vector += slots
        vector += (
            _HOUR_SIN[row.hour],
            _HOUR_COS[row.hour],
            _DAY_SIN[row.day_of_week],
            _DAY_COS[row.day_of_week],
        )
        for value, lo, hi in zip(row[5:], self.minimum, self.maximum, strict=True):
            if value is None or hi <= lo:
                vector.append(0.0)
            else:
                vector.append(min(1.0, max(0.0, (value - lo) / (hi - lo))))
        return vector

    def transform_many(self, rows: Sequence[RawFeatures]) -> npt.NDArray[np.float64]:
        if not rows:
            return np.zeros((0, self.dimensions))
        return np.array([self.transform(row) for row in rows], dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "minimum": list(self.minimum),
            "maximum": list(self.maximum),
            "max_sources": self.max_sources,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureNormaliser:
        return cls(
            tuple(str(s) for s in data["sources"]),
            tuple(float(v) for v in data["minimum"]),
            tuple(float(v) for v in data["maximum"]),
            int(data["max_sources"]),
        )
