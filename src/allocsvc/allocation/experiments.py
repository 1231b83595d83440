"""Experiments: the domain model, its validation, and what the Rust core is told about them."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum

from allocsvc.context import SEGMENT_DIMENSIONS
from allocsvc.errors import InvalidRequest

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_DESCRIPTION_CHARS = 4096
MAX_PAYLOAD_CHARS = 65536
MAX_SEGMENT_LEVELS = 5
DEFAULT_WARM_START = 10.0
DEFAULT_AUTO_ACTIVATION_THRESHOLD = 1000
# Dimension used for `auto` segmentation: the user's cluster id.
CLUSTER_DIMENSION = "cluster"


class Status(StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    ARCHIVED = "archived"


class Policy(StrEnum):
    THOMPSON = "thompson"
    UNIFORM = "uniform"
    FIXED = "fixed"


class SegmentationMode(StrEnum):
    DISABLED = "disabled"
    MANUAL = "manual"
    AUTO = "auto"


class Exploration(StrEnum):
    DEFAULT = "default"
    AGGRESSIVE = "aggressive"
    CONSERVATIVE = "conservative"

    @property
    def bonus_scale(self) -> float:
        """Scale c of the additive bonus c / sqrt(n_variant + 1) on each Thompson draw."""
        return _BONUS[self]


_BONUS = {
    Exploration.CONSERVATIVE: 0.0,
    Exploration.DEFAULT: 0.01,
    Exploration.AGGRESSIVE: 0.05,
}


@dataclass(frozen=True, slots=True)
class Variant:
    key: str
    name: str
    weight: float | None = None
    payload_json: str = ""


@dataclass(frozen=True, slots=True)
class Segmentation:
    mode: SegmentationMode = SegmentationMode.DISABLED
    segment_by: tuple[str, ...] = ()
    min_samples_per_segment: int = 0
    auto_activation: bool = False
    auto_activation_threshold: int = DEFAULT_AUTO_ACTIVATION_THRESHOLD


@dataclass(frozen=True, slots=True)
class Hierarchy:
    min_samples_per_level: tuple[int, ...] = ()
    max_depth: int = 0
    warm_start_strength: float = DEFAULT_WARM_START


@dataclass(frozen=True, slots=True)
class Experiment:
    """An experiment as the service keeps it. `handle` is the internal numeric id."""

    key: str
    name: str
    variants: tuple[Variant, ...]
    status: Status = Status.DRAFT
    description: str = ""
    policy: Policy = Policy.THOMPSON
    segmentation: Segmentation = field(default_factory=Segmentation)
    hierarchy: Hierarchy = field(default_factory=Hierarchy)
    exploration: Exploration = Exploration.DEFAULT
    # Least probability of each variant under Thompson sampling (0: off); see `check_floor`.
    propensity_floor: float = 0.0
    sticky: bool = True
    handle: int = 0
    created_at_ms: int = 0
    updated_at_ms: int = 0

    @property
    def dimensions(self) -> tuple[str, ...]:
        """Segment dimensions in cascade order (level 1 first)."""
        mode = self.segmentation.mode
        if mode is SegmentationMode.MANUAL:
            return self.segmentation.segment_by
        if mode is SegmentationMode.AUTO:
            return (CLUSTER_DIMENSION,)
        return ()

    @property
    def min_samples(self) -> tuple[int, ...]:
        """Minimum allocations per cascade level, one per dimension."""
        levels = len(self.dimensions)
        per_level = self.hierarchy.min_samples_per_level
        if len(per_level) == levels:
            return per_level
        return (self.segmentation.min_samples_per_segment,) * levels

    def variant_index(self, key: str) -> int | None:
        for i, v in enumerate(self.variants):
            if v.key == key:
                return i
        return None

    def with_changes(self, **changes: object) -> Experiment:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class SegmentationDefaults:
    """The server's own segmentation settings (config sections `contextual` and `hierarchy`).

    - `contextual` off: every experiment allocates from its global posteriors; its segmentation
      config is kept (GetExperiment shows it) and applies again once contextual is back on.
    - `context_features`: the dimensions `manual` segmentation may use (empty: every known
      one); others are refused at create and update. An experiment stored earlier with a
      dimension no longer allowed allocates from its global posteriors.
    - `min_samples_per_segment`, `hierarchy_levels`, `max_depth`: filled into an experiment
      that leaves them unset (0, or no `segment_by` in `manual` mode) when it is created or
      its segmentation or hierarchy is changed, so GetExperiment shows the values in use.
      `max_depth` is filled only where it is shallower than the experiment's levels.

    The plain `SegmentationDefaults()` changes nothing.
    """

    contextual: bool = True
    context_features: tuple[str, ...] = ()
    min_samples_per_segment: int = 0
    hierarchy_levels: tuple[str, ...] = ()
    max_depth: int = 0

    def allows(self, dimension: str) -> bool:
        return not self.context_features or dimension in self.context_features

    def fill(self, experiment: Experiment) -> Experiment:
        """The experiment with the server's defaults where it leaves a setting unset."""
        seg = experiment.segmentation
        if seg.mode is SegmentationMode.MANUAL and not seg.segment_by and self.hierarchy_levels:
            seg = replace(seg, segment_by=self.hierarchy_levels)
        filled = replace(experiment, segmentation=seg)
        levels = len(filled.dimensions)
        if not levels:
            return filled
        hierarchy = filled.hierarchy
        if (
            seg.min_samples_per_segment == 0
            and not hierarchy.min_samples_per_level
            and self.min_samples_per_segment
        ):
            seg = replace(seg, min_samples_per_segment=self.min_samples_per_segment)
        if hierarchy.max_depth == 0 and 0 < self.max_depth < levels:
            hierarchy = replace(hierarchy, max_depth=self.max_depth)
        return replace(filled, segmentation=seg, hierarchy=hierarchy)

    def check(self, experiment: Experiment) -> None:
        """Refuse `manual` dimensions outside `context_features` (InvalidRequest naming one)."""
        if experiment.segmentation.mode is not SegmentationMode.MANUAL:
            return
        for i, dim in enumerate(experiment.segmentation.segment_by):
            if not self.allows(dim):
                raise InvalidRequest(
                    f"experiment.segmentation.segment_by[{i}]",
                    f"{dim!r} is not among this server's contextual.context_features "
                    f"({', '.join(self.context_features)})",
                )

    def served(self, experiment: Experiment) -> Experiment:
        """The experiment as allocation serves it: without segmentation when contextual is
        off or it segments by a dimension no longer allowed."""
        seg = experiment.segmentation
        if seg.mode is SegmentationMode.DISABLED:
            return experiment
        allowed = seg.mode is SegmentationMode.AUTO or all(self.allows(d) for d in seg.segment_by)
        if self.contextual and allowed:
            return experiment
        return replace(
            experiment,
            segmentation=replace(seg, mode=SegmentationMode.DISABLED),
            hierarchy=replace(experiment.hierarchy, min_samples_per_level=()),
        )


def _check_text(field_name: str, value: str, limit: int, *, required: bool) -> None:
    if required and not value.strip():
        raise InvalidRequest(field_name, "must not be empty")
    if len(value) > limit:
        raise InvalidRequest(field_name, f"longer than {limit} characters")
    if "\x00" in value:
        raise InvalidRequest(field_name, "must not contain NUL characters")


def check_id(field_name: str, value: str) -> None:
    """An experiment or variant id: 1-128 of letters, digits, `.`, `_`, `-`."""
    _check_text(field_name, value, MAX_ID_CHARS, required=True)
    if not ID_PATTERN.match(value):
        raise InvalidRequest(
            field_name, "must start with a letter or digit and use only A-Z a-z 0-9 . _ -"
        )


def validate(experiment: Experiment, *, max_variants: int) -> None:
    """Raise InvalidRequest naming the first bad field of an experiment definition."""
    check_id("experiment.id", experiment.key)
    _check_text("experiment.name", experiment.name, MAX_NAME_CHARS, required=False)
    _check_text(
        "experiment.description", experiment.description, MAX_DESCRIPTION_CHARS, required=False
    )
    _validate_variants(experiment, max_variants)
    _validate_segmentation(experiment)
    h = experiment.hierarchy
    if not (math.isfinite(h.warm_start_strength) and h.warm_start_strength >= 0):
        raise InvalidRequest(
            "experiment.hierarchy.warm_start_strength", "must be a finite number >= 0"
        )
    check_floor(experiment.propensity_floor, len(experiment.variants))


def check_floor(floor: float, variants: int) -> None:
    """A propensity floor f must satisfy 0 <= f < 1 / variants.

    With it, Thompson sampling picks variant i with probability (1 - K f) p_i + f (K variants,
    p_i the Thompson selection probability): a mixture with the uniform choice at weight K f.
    Every logged propensity is then at least f, so inverse propensity weights stay below 1 / f
    and the logs support off-policy evaluation of any other policy.
    """
    if not (math.isfinite(floor) and floor >= 0 and floor * variants < 1):
        raise InvalidRequest(
            "experiment.exploration.propensity_floor",
            f"must be >= 0 and below 1 / {variants} (one over the number of variants), got {floor}",
        )


def _validate_variants(experiment: Experiment, max_variants: int) -> None:
    variants = experiment.variants
    if not 2 <= len(variants) <= max_variants:
        raise InvalidRequest(
            "experiment.variants", f"needs 2 to {max_variants} variants, got {len(variants)}"
        )
    keys: set[str] = set()
    names: set[str] = set()
    for i, v in enumerate(variants):
        prefix = f"experiment.variants[{i}]"
        check_id(f"{prefix}.id", v.key)
        _check_text(f"{prefix}.name", v.name, MAX_NAME_CHARS, required=False)
        if v.key in keys:
            raise InvalidRequest(f"{prefix}.id", f"duplicate variant id {v.key!r}")
        keys.add(v.key)
        name = v.name.strip().lower()
        if name and name in names:
            raise InvalidRequest(f"{prefix}.name", f"duplicate variant name {v.name!r}")
        names.add(name)
        if v.weight is not None and not (math.isfinite(v.weight) and v.weight >= 0):
            raise InvalidRequest(f"{prefix}.weight", "must be a finite number >= 0")
        if v.payload_json:
            if len(v.payload_json) > MAX_PAYLOAD_CHARS:
                raise InvalidRequest(
                    f"{prefix}.payload_json", f"longer than {MAX_PAYLOAD_CHARS} characters"
                )
            try:
                json.loads(v.payload_json)
            except ValueError as exc:
                raise InvalidRequest(f"{prefix}.payload_json", f"not valid JSON: {exc}") from None
    weights = [v.weight for v in variants]
    given = [w for w in weights if w is not None]
    if given and len(given) != len(weights):
        raise InvalidRequest(
            "experiment.variants.weight", "give a weight for every variant or none"
        )
    if given and sum(given) <= 0:
        raise InvalidRequest("experiment.variants.weight", "weights must sum to a positive number")
    if experiment.policy is Policy.FIXED and not given:
        raise InvalidRequest("experiment.variants.weight", "the fixed policy needs weights")


def _validate_segmentation(experiment: Experiment) -> None:
    seg = experiment.segmentation
    if seg.mode is SegmentationMode.MANUAL:
        if not seg.segment_by:
            raise InvalidRequest(
                "experiment.segmentation.segment_by", "manual segmentation needs dimensions"
            )
        if len(seg.segment_by) > MAX_SEGMENT_LEVELS:
            raise InvalidRequest(
                "experiment.segmentation.segment_by",
                f"at most {MAX_SEGMENT_LEVELS} dimensions",
            )
        seen: set[str] = set()
        for i, dim in enumerate(seg.segment_by):
            if dim not in SEGMENT_DIMENSIONS:
                allowed = ", ".join(sorted(SEGMENT_DIMENSIONS))
                raise InvalidRequest(
                    f"experiment.segmentation.segment_by[{i}]",
                    f"unknown dimension {dim!r} (one of {allowed})",
                )
            if dim in seen:
                raise InvalidRequest(
                    f"experiment.segmentation.segment_by[{i}]", f"duplicate dimension {dim!r}"
                )
            seen.add(dim)
    per_level = experiment.hierarchy.min_samples_per_level
    if per_level and len(per_level) != len(experiment.dimensions):
        raise InvalidRequest(
            "experiment.hierarchy.min_samples_per_level",
            f"needs one entry per segment level ({len(experiment.dimensions)}), "
            f"got {len(per_level)}",
        )
