"""Translation between the generated proto messages and the domain objects."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.allocation.experiments import (
    DEFAULT_AUTO_ACTIVATION_THRESHOLD,
    DEFAULT_WARM_START,
    Experiment,
    Exploration,
    Hierarchy,
    Policy,
    Segmentation,
    SegmentationMode,
    Status,
    Variant,
)
from allocsvc.allocation.insights import SegmentCounts, Validation
from allocsvc.allocation.journal import StoredRecommendation
from allocsvc.allocation.service import (
    Allocation,
    AllocationRequest,
    ConversionRequest,
    ConversionResult,
)
from allocsvc.analytics import (
    EffectKind,
    Recommendation,
    SampleSize,
    SampleSizeQuery,
    SegmentAnalysis,
    TrafficPlan,
)
from allocsvc.api.errors import field_of, status_number
from allocsvc.errors import AllocsvcError, InvalidRequest
from allocsvc.hierarchy import CascadeUsage, SegmentTree

T = TypeVar("T")

_STATUS = {
    pb.EXPERIMENT_STATUS_DRAFT: Status.DRAFT,
    pb.EXPERIMENT_STATUS_RUNNING: Status.RUNNING,
    pb.EXPERIMENT_STATUS_PAUSED: Status.PAUSED,
    pb.EXPERIMENT_STATUS_ARCHIVED: Status.ARCHIVED,
}
_POLICY = {
    pb.ALLOCATION_POLICY_UNSPECIFIED: Policy.THOMPSON,
    pb.ALLOCATION_POLICY_THOMPSON: Policy.THOMPSON,
    pb.ALLOCATION_POLICY_UNIFORM: Policy.UNIFORM,
    pb.ALLOCATION_POLICY_FIXED: Policy.FIXED,
}
_SEGMENTATION = {
    pb.SEGMENTATION_MODE_UNSPECIFIED: SegmentationMode.DISABLED,
    pb.SEGMENTATION_MODE_DISABLED: SegmentationMode.DISABLED,
    pb.SEGMENTATION_MODE_MANUAL: SegmentationMode.MANUAL,
    pb.SEGMENTATION_MODE_AUTO: SegmentationMode.AUTO,
}
_EXPLORATION = {
    pb.EXPLORATION_MODE_UNSPECIFIED: Exploration.DEFAULT,
    pb.EXPLORATION_MODE_DEFAULT: Exploration.DEFAULT,
    pb.EXPLORATION_MODE_AGGRESSIVE: Exploration.AGGRESSIVE,
    pb.EXPLORATION_MODE_CONSERVATIVE: Exploration.CONSERVATIVE,
}


def _inverse(table: Mapping[Any, T]) -> dict[T, Any]:
    """Domain value -> proto number, preferring the explicit number over UNSPECIFIED."""
    return {value: number for number, value in sorted(table.items())}


_STATUS_PB = _inverse(_STATUS)
_POLICY_PB = _inverse(_POLICY)
_SEGMENTATION_PB = _inverse(_SEGMENTATION)
_EXPLORATION_PB = _inverse(_EXPLORATION)


def _enum(table: Mapping[Any, T], number: int, field: str) -> T:
    try:
        return table[number]
    except KeyError:
        raise InvalidRequest(field, f"unknown value {number}") from None


def status_from_pb(number: int, field: str = "status") -> Status:
    return _enum(_STATUS, number, field)


def experiment_from_pb(msg: pb.Experiment) -> Experiment:
    status = (
        Status.DRAFT
        if msg.status == pb.EXPERIMENT_STATUS_UNSPECIFIED
        else status_from_pb(msg.status, "experiment.status")
    )
    return Experiment(
        key=msg.id,
        name=msg.name or msg.id,
        description=msg.description,
        status=status,
        variants=tuple(_variant_from_pb(v, i) for i, v in enumerate(msg.variants)),
        policy=_enum(_POLICY, msg.policy, "experiment.policy"),
        segmentation=segmentation_from_pb(msg.segmentation),
        hierarchy=hierarchy_from_pb(msg.hierarchy),
        exploration=_enum(_EXPLORATION, msg.exploration.mode, "experiment.exploration.mode"),
        propensity_floor=msg.exploration.propensity_floor,
        sticky=msg.sticky if msg.HasField("sticky") else True,
    )


def _variant_from_pb(msg: pb.Variant, index: int) -> Variant:
    return Variant(
        key=msg.id,
        name=msg.name or msg.id,
        weight=msg.weight if msg.HasField("weight") else None,
        payload_json=msg.payload_json,
    )


def segmentation_from_pb(msg: pb.SegmentationConfig) -> Segmentation:
    return Segmentation(
        mode=_enum(_SEGMENTATION, msg.mode, "experiment.segmentation.mode"),
        segment_by=tuple(msg.segment_by),
        min_samples_per_segment=msg.min_samples_per_segment,
        auto_activation=msg.auto_activation,
        auto_activation_threshold=msg.auto_activation_threshold
        or DEFAULT_AUTO_ACTIVATION_THRESHOLD,
    )


def hierarchy_from_pb(msg: pb.HierarchyConfig) -> Hierarchy:
    return Hierarchy(
        min_samples_per_level=tuple(msg.min_samples_per_level),
        max_depth=msg.max_depth,
        warm_start_strength=msg.warm_start_strength or DEFAULT_WARM_START,
    )


def experiment_to_pb(e: Experiment) -> pb.Experiment:
    return pb.Experiment(
        id=e.key,
        name=e.name,
        description=e.description,
        status=_STATUS_PB[e.status],
        variants=[
            pb.Variant(id=v.key, name=v.name, weight=v.weight, payload_json=v.payload_json)
            for v in e.variants
        ],
        policy=_POLICY_PB[e.policy],
        segmentation=pb.SegmentationConfig(
            mode=_SEGMENTATION_PB[e.segmentation.mode],
            segment_by=e.segmentation.segment_by,
            min_samples_per_segment=e.segmentation.min_samples_per_segment,
            auto_activation=e.segmentation.auto_activation,
            auto_activation_threshold=e.segmentation.auto_activation_threshold,
        ),
        hierarchy=pb.HierarchyConfig(
            min_samples_per_level=e.hierarchy.min_samples_per_level,
            max_depth=e.hierarchy.max_depth,
            warm_start_strength=e.hierarchy.warm_start_strength,
        ),
        exploration=pb.ExplorationConfig(
            mode=_EXPLORATION_PB[e.exploration], propensity_floor=e.propensity_floor
        ),
        sticky=e.sticky,
        created_at_unix_ms=e.created_at_ms,
        updated_at_unix_ms=e.updated_at_ms,
    )


def changes_from_update(request: pb.UpdateExperimentRequest) -> dict[str, object]:
    """The fields named by the update mask, as domain values."""
    if not request.experiment.id:
        raise InvalidRequest("experiment.id", "must not be empty")
    paths = list(request.update_mask.paths)
    if not paths:
        raise InvalidRequest("update_mask", "name at least one field to update")
    parsed = experiment_from_pb(request.experiment)
    changes: dict[str, object] = {}
    for path in paths:
        if path == "status":
            changes["status"] = status_from_pb(request.experiment.status, "experiment.status")
        elif path in {
            "name",
            "description",
            "variants",
            "policy",
            "segmentation",
            "hierarchy",
            "exploration",
            "sticky",
        }:
            changes[path] = getattr(parsed, path)
            if path == "exploration":
                changes["propensity_floor"] = parsed.propensity_floor
        else:
            raise InvalidRequest("update_mask", f"cannot update {path!r}")
    return changes


def allocate_request(msg: pb.AllocateRequest) -> AllocationRequest:
    if msg.timestamp_unix_ms < 0:
        raise InvalidRequest("timestamp_unix_ms", "must not be negative")
    return AllocationRequest(
        experiment_key=msg.experiment_id,
        user_id=msg.user_id,
        channel=msg.channel,
        context=msg.context,
        signals=msg.signals,
        timestamp_ms=msg.timestamp_unix_ms,
    )


def allocate_response(a: Allocation, region: str) -> pb.AllocateResponse:
    s = a.assignment
    return pb.AllocateResponse(
        assignment_id=s.id,
        experiment_id=s.experiment_key,
        variant_id=a.variant.key,
        variant_name=a.variant.name,
        payload_json=a.variant.payload_json,
        segment_key=s.segment_key,
        cascade_level=s.cascade_level,
        propensity=s.propensity,
        sticky=a.sticky,
        region=region,
    )


def conversion_request(msg: pb.RecordConversionRequest) -> ConversionRequest:
    if math.isnan(msg.value):
        raise InvalidRequest("value", "must be a finite number >= 0")
    return ConversionRequest(
        assignment_id=msg.assignment_id,
        experiment_key=msg.experiment_id,
        user_id=msg.user_id,
        value=msg.value,
        idempotency_key=msg.idempotency_key,
    )


def conversion_response(r: ConversionResult, region: str = "") -> pb.RecordConversionResponse:
    return pb.RecordConversionResponse(
        assignment_id=r.assignment.id, variant_id=r.variant.key, counted=r.counted, region=region
    )


def item_error(exc: AllocsvcError) -> pb.ItemError:
    return pb.ItemError(code=status_number(exc), message=str(exc), field=field_of(exc))


def segmentation_to_pb(s: Segmentation) -> pb.SegmentationConfig:
    return pb.SegmentationConfig(
        mode=_SEGMENTATION_PB[s.mode],
        segment_by=s.segment_by,
        min_samples_per_segment=s.min_samples_per_segment,
        auto_activation=s.auto_activation,
        auto_activation_threshold=s.auto_activation_threshold,
    )


def segments_to_pb(segments: Sequence[SegmentCounts]) -> list[pb.SegmentCounts]:
    return [
        pb.SegmentCounts(
            segment_key=s.segment_key,
            level=s.level,
            variants=[
                pb.VariantCounts(variant_id=v, allocations=a, conversions=c, value_sum=x)
                for v, a, c, x in s.variants
            ],
        )
        for s in segments
    ]


def stored_recommendation_to_pb(r: StoredRecommendation, experiment_key: str) -> pb.Recommendation:
    return pb.Recommendation(
        id=r.id,
        experiment_id=experiment_key,
        kind=r.kind,
        dimensions=r.dimensions,
        expected_benefit=r.expected_benefit,
        reason=r.reason,
        status=r.status,
        created_at_unix_ms=r.created_ms,
    )


def recommendation_to_pb(r: Recommendation, experiment_key: str) -> pb.Recommendation:
    return pb.Recommendation(
        experiment_id=experiment_key,
        kind=r.kind.value,
        dimensions=r.dimensions,
        expected_benefit=r.expected_benefit,
        reason=r.reason,
        created_at_unix_ms=int(r.created_at.timestamp() * 1000),
    )


def tree_summary_to_pb(tree: SegmentTree) -> pb.TreeSummary:
    s = tree.summary
    return pb.TreeSummary(
        nodes=s.nodes,
        kept=s.kept,
        pruned=s.pruned,
        leaves=s.kept_leaves,
        kept_per_level=[level.kept for level in s.levels],
        best_segment=s.best_key or "",
        worst_segment=s.worst_key or "",
    )


def cascade_to_pb(usage: CascadeUsage) -> list[pb.CascadeLevelUsage]:
    return [
        pb.CascadeLevelUsage(
            level=u.level, allocations=u.allocations, conversions=u.conversions, share=u.share
        )
        for u in usage.levels
    ]


def analysis_to_pb(a: SegmentAnalysis) -> pb.AnalyzeSegmentsResponse:
    return pb.AnalyzeSegmentsResponse(
        results=[
            pb.SegmentVariantResult(
                segment_key=r.segment_key,
                variant_id=r.variant,
                allocations=r.allocations,
                conversions=r.conversions,
                conversion_rate=r.conversion_rate,
                global_rate=r.global_rate or 0.0,
                lift=r.lift or 0.0,
                p_value=_or_nan(r.p_value),
                p_adjusted=_or_nan(r.p_holm),
                cohens_h=r.cohens_h or 0.0,
                significant=r.significant,
                reason=r.reason or "",
            )
            for r in a.results
        ],
        high_performers=sorted({r.segment_key for r in a.high_performers}),
        underperformers=sorted({r.segment_key for r in a.underperformers}),
        anomalies=sorted({x.segment_key for x in a.anomalies}),
        recommendations=a.recommendations,
        reason=a.reason or "",
    )


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else x


def sample_size_query(msg: pb.CalculateSampleSizeRequest) -> SampleSizeQuery:
    if msg.variants == 1:
        raise InvalidRequest("variants", "needs at least 2 variants")
    return SampleSizeQuery(
        baseline_rate=msg.baseline_rate,
        minimum_detectable_effect=msg.minimum_detectable_effect,
        effect_kind=EffectKind.ABSOLUTE if msg.absolute_effect else EffectKind.RELATIVE,
        alpha=msg.alpha or 0.05,
        power=msg.power or 0.8,
        variants=msg.variants or 2,
        segments=msg.segments or 1,
        two_sided=not msg.one_sided,
    )


def sample_size_to_pb(size: SampleSize, plan: TrafficPlan | None) -> pb.CalculateSampleSizeResponse:
    return pb.CalculateSampleSizeResponse(
        per_variant=size.per_variant,
        total=size.total,
        effect_size=size.effect_size,
        adjusted_alpha=size.adjusted_alpha,
        days_needed=float(plan.days_needed or 0) if plan else 0.0,
        achievable=plan.achievable if plan else False,
        daily_traffic=plan.daily_traffic if plan else 0.0,
        reason=plan.reason
        if plan
        else f"{size.per_variant} per variant; no traffic figure to estimate days from",
    )


def validation_to_pb(v: Validation) -> pb.ValidateExperimentResponse:
    srm = v.sample_ratio
    es = v.early_stopping
    return pb.ValidateExperimentResponse(
        sample_ratio=pb.SampleRatioCheck(
            mismatch=srm.mismatch,
            statistic=srm.statistic,
            p_value=srm.p_value,
            observed=srm.observed,
            expected=srm.expected,
            reason=srm.reason,
        )
        if srm is not None
        else pb.SampleRatioCheck(reason=v.sample_ratio_reason),
        early_stopping=pb.EarlyStopping(
            stop=es.stop,
            winner=es.winner or "",
            variants=[
                pb.VariantProbability(variant_id=name, probability_best=p, expected_loss=loss)
                for name, p, loss in zip(
                    es.variants, es.probability_best, es.expected_loss, strict=True
                )
            ],
            reason=es.reason,
        ),
        alerts=[
            pb.Alert(
                kind=str(a.kind), severity=str(a.severity), message=a.message, subject=a.subject
            )
            for a in v.alerts
        ],
    )
