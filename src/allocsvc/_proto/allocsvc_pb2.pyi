from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExperimentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERIMENT_STATUS_UNSPECIFIED: _ClassVar[ExperimentStatus]
    EXPERIMENT_STATUS_DRAFT: _ClassVar[ExperimentStatus]
    EXPERIMENT_STATUS_RUNNING: _ClassVar[ExperimentStatus]
    EXPERIMENT_STATUS_PAUSED: _ClassVar[ExperimentStatus]
    EXPERIMENT_STATUS_ARCHIVED: _ClassVar[ExperimentStatus]

class AllocationPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOCATION_POLICY_UNSPECIFIED: _ClassVar[AllocationPolicy]
    ALLOCATION_POLICY_THOMPSON: _ClassVar[AllocationPolicy]
    ALLOCATION_POLICY_UNIFORM: _ClassVar[AllocationPolicy]
    ALLOCATION_POLICY_FIXED: _ClassVar[AllocationPolicy]

class SegmentationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEGMENTATION_MODE_UNSPECIFIED: _ClassVar[SegmentationMode]
    SEGMENTATION_MODE_DISABLED: _ClassVar[SegmentationMode]
    SEGMENTATION_MODE_MANUAL: _ClassVar[SegmentationMode]
    SEGMENTATION_MODE_AUTO: _ClassVar[SegmentationMode]

class ExplorationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLORATION_MODE_UNSPECIFIED: _ClassVar[ExplorationMode]
    EXPLORATION_MODE_DEFAULT: _ClassVar[ExplorationMode]
    EXPLORATION_MODE_AGGRESSIVE: _ClassVar[ExplorationMode]
    EXPLORATION_MODE_CONSERVATIVE: _ClassVar[ExplorationMode]
EXPERIMENT_STATUS_UNSPECIFIED: ExperimentStatus
EXPERIMENT_STATUS_DRAFT: ExperimentStatus
EXPERIMENT_STATUS_RUNNING: ExperimentStatus
EXPERIMENT_STATUS_PAUSED: ExperimentStatus
EXPERIMENT_STATUS_ARCHIVED: ExperimentStatus
ALLOCATION_POLICY_UNSPECIFIED: AllocationPolicy
ALLOCATION_POLICY_THOMPSON: AllocationPolicy
ALLOCATION_POLICY_UNIFORM: AllocationPolicy
ALLOCATION_POLICY_FIXED: AllocationPolicy
SEGMENTATION_MODE_UNSPECIFIED: SegmentationMode
SEGMENTATION_MODE_DISABLED: SegmentationMode
SEGMENTATION_MODE_MANUAL: SegmentationMode
SEGMENTATION_MODE_AUTO: SegmentationMode
EXPLORATION_MODE_UNSPECIFIED: ExplorationMode
EXPLORATION_MODE_DEFAULT: ExplorationMode
EXPLORATION_MODE_AGGRESSIVE: ExplorationMode
EXPLORATION_MODE_CONSERVATIVE: ExplorationMode

class AllocateRequest(_message.Message):
    __slots__ = ("experiment_id", "user_id", "channel", "context", "signals", "timestamp_unix_ms")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SignalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    user_id: str
    channel: str
    context: _containers.ScalarMap[str, str]
    signals: _containers.ScalarMap[str, float]
    timestamp_unix_ms: int
    def __init__(self, experiment_id: _Optional[str] = ..., user_id: _Optional[str] = ..., channel: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., signals: _Optional[_Mapping[str, float]] = ..., timestamp_unix_ms: _Optional[int] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("assignment_id", "experiment_id", "variant_id", "variant_name", "payload_json", "segment_key", "cascade_level", "propensity", "sticky", "region")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    CASCADE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    experiment_id: str
    variant_id: str
    variant_name: str
    payload_json: str
    segment_key: str
    cascade_level: int
    propensity: float
    sticky: bool
    region: str
    def __init__(self, assignment_id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., variant_id: _Optional[str] = ..., variant_name: _Optional[str] = ..., payload_json: _Optional[str] = ..., segment_key: _Optional[str] = ..., cascade_level: _Optional[int] = ..., propensity: _Optional[float] = ..., sticky: _Optional[bool] = ..., region: _Optional[str] = ...) -> None: ...

class AllocateBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[AllocateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[AllocateRequest, _Mapping]]] = ...) -> None: ...

class AllocateBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AllocateResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AllocateResult, _Mapping]]] = ...) -> None: ...

class AllocateResult(_message.Message):
    __slots__ = ("allocation", "error")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    allocation: AllocateResponse
    error: ItemError
    def __init__(self, allocation: _Optional[_Union[AllocateResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class RecordConversionRequest(_message.Message):
    __slots__ = ("assignment_id", "experiment_id", "user_id", "value", "idempotency_key")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    experiment_id: str
    user_id: str
    value: float
    idempotency_key: str
    def __init__(self, assignment_id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., user_id: _Optional[str] = ..., value: _Optional[float] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RecordConversionResponse(_message.Message):
    __slots__ = ("assignment_id", "variant_id", "counted", "region")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    variant_id: str
    counted: bool
    region: str
    def __init__(self, assignment_id: _Optional[str] = ..., variant_id: _Optional[str] = ..., counted: _Optional[bool] = ..., region: _Optional[str] = ...) -> None: ...

class RecordConversionBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecordConversionRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecordConversionRequest, _Mapping]]] = ...) -> None: ...

class RecordConversionBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecordConversionResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RecordConversionResult, _Mapping]]] = ...) -> None: ...

class RecordConversionResult(_message.Message):
    __slots__ = ("conversion", "error")
    CONVERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    conversion: RecordConversionResponse
    error: ItemError
    def __init__(self, conversion: _Optional[_Union[RecordConversionResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("id", "name", "description", "status", "variants", "policy", "segmentation", "hierarchy", "exploration", "sticky", "created_at_unix_ms", "updated_at_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    STICKY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    status: ExperimentStatus
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    policy: AllocationPolicy
    segmentation: SegmentationConfig
    hierarchy: HierarchyConfig
    exploration: ExplorationConfig
    sticky: bool
    created_at_unix_ms: int
    updated_at_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., status: _Optional[_Union[ExperimentStatus, str]] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., policy: _Optional[_Union[AllocationPolicy, str]] = ..., segmentation: _Optional[_Union[SegmentationConfig, _Mapping]] = ..., hierarchy: _Optional[_Union[HierarchyConfig, _Mapping]] = ..., exploration: _Optional[_Union[ExplorationConfig, _Mapping]] = ..., sticky: _Optional[bool] = ..., created_at_unix_ms: _Optional[int] = ..., updated_at_unix_ms: _Optional[int] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("id", "name", "weight", "payload_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    weight: float
    payload_json: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., weight: _Optional[float] = ..., payload_json: _Optional[str] = ...) -> None: ...

class SegmentationConfig(_message.Message):
    __slots__ = ("mode", "segment_by", "min_samples_per_segment", "auto_activation", "auto_activation_threshold")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BY_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_PER_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    AUTO_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    AUTO_ACTIVATION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    mode: SegmentationMode
    segment_by: _containers.RepeatedScalarFieldContainer[str]
    min_samples_per_segment: int
    auto_activation: bool
    auto_activation_threshold: int
    def __init__(self, mode: _Optional[_Union[SegmentationMode, str]] = ..., segment_by: _Optional[_Iterable[str]] = ..., min_samples_per_segment: _Optional[int] = ..., auto_activation: _Optional[bool] = ..., auto_activation_threshold: _Optional[int] = ...) -> None: ...

class HierarchyConfig(_message.Message):
    __slots__ = ("min_samples_per_level", "max_depth", "warm_start_strength")
    MIN_SAMPLES_PER_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    WARM_START_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    min_samples_per_level: _containers.RepeatedScalarFieldContainer[int]
    max_depth: int
    warm_start_strength: float
    def __init__(self, min_samples_per_level: _Optional[_Iterable[int]] = ..., max_depth: _Optional[int] = ..., warm_start_strength: _Optional[float] = ...) -> None: ...

class ExplorationConfig(_message.Message):
    __slots__ = ("mode", "propensity_floor")
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    mode: ExplorationMode
    propensity_floor: float
    def __init__(self, mode: _Optional[_Union[ExplorationMode, str]] = ..., propensity_floor: _Optional[float] = ...) -> None: ...

class CreateExperimentRequest(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ("status", "page_size", "page_token")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    status: ExperimentStatus
    page_size: int
    page_token: str
    def __init__(self, status: _Optional[_Union[ExperimentStatus, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments", "next_page_token")
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    next_page_token: str
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateExperimentRequest(_message.Message):
    __slots__ = ("experiment", "update_mask")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    experiment: Experiment
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, experiment: _Optional[_Union[Experiment, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class GetSegmentationConfigRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class UpdateSegmentationConfigRequest(_message.Message):
    __slots__ = ("experiment_id", "config")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    config: SegmentationConfig
    def __init__(self, experiment_id: _Optional[str] = ..., config: _Optional[_Union[SegmentationConfig, _Mapping]] = ...) -> None: ...

class GetEligibilityRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class GetEligibilityResponse(_message.Message):
    __slots__ = ("eligible", "average_daily_visitors", "threshold", "recommendation", "reason")
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_DAILY_VISITORS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    eligible: bool
    average_daily_visitors: float
    threshold: int
    recommendation: Recommendation
    reason: str
    def __init__(self, eligible: _Optional[bool] = ..., average_daily_visitors: _Optional[float] = ..., threshold: _Optional[int] = ..., recommendation: _Optional[_Union[Recommendation, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListSegmentsRequest(_message.Message):
    __slots__ = ("experiment_id", "page_size", "page_token")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    page_size: int
    page_token: str
    def __init__(self, experiment_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class VariantCounts(_message.Message):
    __slots__ = ("variant_id", "allocations", "conversions", "value_sum")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSIONS_FIELD_NUMBER: _ClassVar[int]
    VALUE_SUM_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    allocations: int
    conversions: int
    value_sum: float
    def __init__(self, variant_id: _Optional[str] = ..., allocations: _Optional[int] = ..., conversions: _Optional[int] = ..., value_sum: _Optional[float] = ...) -> None: ...

class SegmentCounts(_message.Message):
    __slots__ = ("segment_key", "level", "variants")
    SEGMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    segment_key: str
    level: int
    variants: _containers.RepeatedCompositeFieldContainer[VariantCounts]
    def __init__(self, segment_key: _Optional[str] = ..., level: _Optional[int] = ..., variants: _Optional[_Iterable[_Union[VariantCounts, _Mapping]]] = ...) -> None: ...

class ListSegmentsResponse(_message.Message):
    __slots__ = ("segments", "next_page_token")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[SegmentCounts]
    next_page_token: str
    def __init__(self, segments: _Optional[_Iterable[_Union[SegmentCounts, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("id", "experiment_id", "kind", "dimensions", "expected_benefit", "reason", "status", "created_at_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_BENEFIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    experiment_id: str
    kind: str
    dimensions: _containers.RepeatedScalarFieldContainer[str]
    expected_benefit: float
    reason: str
    status: str
    created_at_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., experiment_id: _Optional[str] = ..., kind: _Optional[str] = ..., dimensions: _Optional[_Iterable[str]] = ..., expected_benefit: _Optional[float] = ..., reason: _Optional[str] = ..., status: _Optional[str] = ..., created_at_unix_ms: _Optional[int] = ...) -> None: ...

class ListRecommendationsRequest(_message.Message):
    __slots__ = ("experiment_id", "status")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    status: str
    def __init__(self, experiment_id: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class ListRecommendationsResponse(_message.Message):
    __slots__ = ("recommendations",)
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    def __init__(self, recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ...) -> None: ...

class AcceptRecommendationRequest(_message.Message):
    __slots__ = ("recommendation_id",)
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    recommendation_id: str
    def __init__(self, recommendation_id: _Optional[str] = ...) -> None: ...

class DismissRecommendationRequest(_message.Message):
    __slots__ = ("recommendation_id",)
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    recommendation_id: str
    def __init__(self, recommendation_id: _Optional[str] = ...) -> None: ...

class RebuildTreeRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class TreeSummary(_message.Message):
    __slots__ = ("nodes", "kept", "pruned", "leaves", "kept_per_level", "best_segment", "worst_segment")
    NODES_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    KEPT_PER_LEVEL_FIELD_NUMBER: _ClassVar[int]
    BEST_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    WORST_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    kept: int
    pruned: int
    leaves: int
    kept_per_level: _containers.RepeatedScalarFieldContainer[int]
    best_segment: str
    worst_segment: str
    def __init__(self, nodes: _Optional[int] = ..., kept: _Optional[int] = ..., pruned: _Optional[int] = ..., leaves: _Optional[int] = ..., kept_per_level: _Optional[_Iterable[int]] = ..., best_segment: _Optional[str] = ..., worst_segment: _Optional[str] = ...) -> None: ...

class RebuildTreeResponse(_message.Message):
    __slots__ = ("summary", "version")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    summary: TreeSummary
    version: int
    def __init__(self, summary: _Optional[_Union[TreeSummary, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class GetTreeRequest(_message.Message):
    __slots__ = ("experiment_id", "format")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    format: str
    def __init__(self, experiment_id: _Optional[str] = ..., format: _Optional[str] = ...) -> None: ...

class CascadeLevelUsage(_message.Message):
    __slots__ = ("level", "allocations", "conversions", "share")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    level: int
    allocations: int
    conversions: int
    share: float
    def __init__(self, level: _Optional[int] = ..., allocations: _Optional[int] = ..., conversions: _Optional[int] = ..., share: _Optional[float] = ...) -> None: ...

class GetTreeResponse(_message.Message):
    __slots__ = ("format", "content", "summary", "cascade")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    format: str
    content: str
    summary: TreeSummary
    cascade: _containers.RepeatedCompositeFieldContainer[CascadeLevelUsage]
    def __init__(self, format: _Optional[str] = ..., content: _Optional[str] = ..., summary: _Optional[_Union[TreeSummary, _Mapping]] = ..., cascade: _Optional[_Iterable[_Union[CascadeLevelUsage, _Mapping]]] = ...) -> None: ...

class AnalyzeSegmentsRequest(_message.Message):
    __slots__ = ("experiment_id", "min_allocations", "alpha")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    min_allocations: int
    alpha: float
    def __init__(self, experiment_id: _Optional[str] = ..., min_allocations: _Optional[int] = ..., alpha: _Optional[float] = ...) -> None: ...

class SegmentVariantResult(_message.Message):
    __slots__ = ("segment_key", "variant_id", "allocations", "conversions", "conversion_rate", "global_rate", "lift", "p_value", "p_adjusted", "cohens_h", "significant", "reason")
    SEGMENT_KEY_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSIONS_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_RATE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_RATE_FIELD_NUMBER: _ClassVar[int]
    LIFT_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    P_ADJUSTED_FIELD_NUMBER: _ClassVar[int]
    COHENS_H_FIELD_NUMBER: _ClassVar[int]
    SIGNIFICANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    segment_key: str
    variant_id: str
    allocations: int
    conversions: int
    conversion_rate: float
    global_rate: float
    lift: float
    p_value: float
    p_adjusted: float
    cohens_h: float
    significant: bool
    reason: str
    def __init__(self, segment_key: _Optional[str] = ..., variant_id: _Optional[str] = ..., allocations: _Optional[int] = ..., conversions: _Optional[int] = ..., conversion_rate: _Optional[float] = ..., global_rate: _Optional[float] = ..., lift: _Optional[float] = ..., p_value: _Optional[float] = ..., p_adjusted: _Optional[float] = ..., cohens_h: _Optional[float] = ..., significant: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class AnalyzeSegmentsResponse(_message.Message):
    __slots__ = ("results", "high_performers", "underperformers", "anomalies", "recommendations", "reason")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    HIGH_PERFORMERS_FIELD_NUMBER: _ClassVar[int]
    UNDERPERFORMERS_FIELD_NUMBER: _ClassVar[int]
    ANOMALIES_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SegmentVariantResult]
    high_performers: _containers.RepeatedScalarFieldContainer[str]
    underperformers: _containers.RepeatedScalarFieldContainer[str]
    anomalies: _containers.RepeatedScalarFieldContainer[str]
    recommendations: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, results: _Optional[_Iterable[_Union[SegmentVariantResult, _Mapping]]] = ..., high_performers: _Optional[_Iterable[str]] = ..., underperformers: _Optional[_Iterable[str]] = ..., anomalies: _Optional[_Iterable[str]] = ..., recommendations: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class CalculateSampleSizeRequest(_message.Message):
    __slots__ = ("baseline_rate", "minimum_detectable_effect", "absolute_effect", "alpha", "power", "variants", "segments", "one_sided", "daily_traffic", "experiment_id", "horizon_days")
    BASELINE_RATE_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_DETECTABLE_EFFECT_FIELD_NUMBER: _ClassVar[int]
    ABSOLUTE_EFFECT_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    POWER_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ONE_SIDED_FIELD_NUMBER: _ClassVar[int]
    DAILY_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    HORIZON_DAYS_FIELD_NUMBER: _ClassVar[int]
    baseline_rate: float
    minimum_detectable_effect: float
    absolute_effect: bool
    alpha: float
    power: float
    variants: int
    segments: int
    one_sided: bool
    daily_traffic: float
    experiment_id: str
    horizon_days: int
    def __init__(self, baseline_rate: _Optional[float] = ..., minimum_detectable_effect: _Optional[float] = ..., absolute_effect: _Optional[bool] = ..., alpha: _Optional[float] = ..., power: _Optional[float] = ..., variants: _Optional[int] = ..., segments: _Optional[int] = ..., one_sided: _Optional[bool] = ..., daily_traffic: _Optional[float] = ..., experiment_id: _Optional[str] = ..., horizon_days: _Optional[int] = ...) -> None: ...

class CalculateSampleSizeResponse(_message.Message):
    __slots__ = ("per_variant", "total", "effect_size", "adjusted_alpha", "days_needed", "achievable", "daily_traffic", "reason")
    PER_VARIANT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    EFFECT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADJUSTED_ALPHA_FIELD_NUMBER: _ClassVar[int]
    DAYS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    ACHIEVABLE_FIELD_NUMBER: _ClassVar[int]
    DAILY_TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    per_variant: int
    total: int
    effect_size: float
    adjusted_alpha: float
    days_needed: float
    achievable: bool
    daily_traffic: float
    reason: str
    def __init__(self, per_variant: _Optional[int] = ..., total: _Optional[int] = ..., effect_size: _Optional[float] = ..., adjusted_alpha: _Optional[float] = ..., days_needed: _Optional[float] = ..., achievable: _Optional[bool] = ..., daily_traffic: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ValidateExperimentRequest(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class SampleRatioCheck(_message.Message):
    __slots__ = ("mismatch", "statistic", "p_value", "observed", "expected", "reason")
    MISMATCH_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    mismatch: bool
    statistic: float
    p_value: float
    observed: _containers.RepeatedScalarFieldContainer[int]
    expected: _containers.RepeatedScalarFieldContainer[float]
    reason: str
    def __init__(self, mismatch: _Optional[bool] = ..., statistic: _Optional[float] = ..., p_value: _Optional[float] = ..., observed: _Optional[_Iterable[int]] = ..., expected: _Optional[_Iterable[float]] = ..., reason: _Optional[str] = ...) -> None: ...

class VariantProbability(_message.Message):
    __slots__ = ("variant_id", "probability_best", "expected_loss")
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_BEST_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOSS_FIELD_NUMBER: _ClassVar[int]
    variant_id: str
    probability_best: float
    expected_loss: float
    def __init__(self, variant_id: _Optional[str] = ..., probability_best: _Optional[float] = ..., expected_loss: _Optional[float] = ...) -> None: ...

class EarlyStopping(_message.Message):
    __slots__ = ("stop", "winner", "variants", "reason")
    STOP_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    winner: str
    variants: _containers.RepeatedCompositeFieldContainer[VariantProbability]
    reason: str
    def __init__(self, stop: _Optional[bool] = ..., winner: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[VariantProbability, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("kind", "severity", "message", "subject")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    severity: str
    message: str
    subject: str
    def __init__(self, kind: _Optional[str] = ..., severity: _Optional[str] = ..., message: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class ValidateExperimentResponse(_message.Message):
    __slots__ = ("sample_ratio", "early_stopping", "alerts")
    SAMPLE_RATIO_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    sample_ratio: SampleRatioCheck
    early_stopping: EarlyStopping
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, sample_ratio: _Optional[_Union[SampleRatioCheck, _Mapping]] = ..., early_stopping: _Optional[_Union[EarlyStopping, _Mapping]] = ..., alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("code", "name", "countries", "postgres_dsn", "redis_url", "gdpr", "failover_region", "is_default", "serving", "healthy")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNTRIES_FIELD_NUMBER: _ClassVar[int]
    POSTGRES_DSN_FIELD_NUMBER: _ClassVar[int]
    REDIS_URL_FIELD_NUMBER: _ClassVar[int]
    GDPR_FIELD_NUMBER: _ClassVar[int]
    FAILOVER_REGION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    code: str
    name: str
    countries: _containers.RepeatedScalarFieldContainer[str]
    postgres_dsn: str
    redis_url: str
    gdpr: bool
    failover_region: str
    is_default: bool
    serving: bool
    healthy: bool
    def __init__(self, code: _Optional[str] = ..., name: _Optional[str] = ..., countries: _Optional[_Iterable[str]] = ..., postgres_dsn: _Optional[str] = ..., redis_url: _Optional[str] = ..., gdpr: _Optional[bool] = ..., failover_region: _Optional[str] = ..., is_default: _Optional[bool] = ..., serving: _Optional[bool] = ..., healthy: _Optional[bool] = ...) -> None: ...

class ListRegionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRegionsResponse(_message.Message):
    __slots__ = ("regions", "default_region")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REGION_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    default_region: str
    def __init__(self, regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., default_region: _Optional[str] = ...) -> None: ...

class GetRegionRequest(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class UpsertRegionRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: Region
    def __init__(self, region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class ExportUserDataRequest(_message.Message):
    __slots__ = ("user_id", "region")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    region: str
    def __init__(self, user_id: _Optional[str] = ..., region: _Optional[str] = ...) -> None: ...

class ExportUserDataResponse(_message.Message):
    __slots__ = ("user_id", "regions", "json", "records")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    regions: _containers.RepeatedScalarFieldContainer[str]
    json: str
    records: int
    def __init__(self, user_id: _Optional[str] = ..., regions: _Optional[_Iterable[str]] = ..., json: _Optional[str] = ..., records: _Optional[int] = ...) -> None: ...

class DeleteUserDataRequest(_message.Message):
    __slots__ = ("user_id", "region", "reason")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    region: str
    reason: str
    def __init__(self, user_id: _Optional[str] = ..., region: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteUserDataResponse(_message.Message):
    __slots__ = ("receipt_id", "regions", "removed")
    class RemovedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    receipt_id: str
    regions: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.ScalarMap[str, int]
    def __init__(self, receipt_id: _Optional[str] = ..., regions: _Optional[_Iterable[str]] = ..., removed: _Optional[_Mapping[str, int]] = ...) -> None: ...

class TrainClustersRequest(_message.Message):
    __slots__ = ("use_embeddings",)
    USE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    use_embeddings: bool
    def __init__(self, use_embeddings: _Optional[bool] = ...) -> None: ...

class LearningJob(_message.Message):
    __slots__ = ("job_id", "kind", "state", "reason", "done", "total", "message", "version", "started_unix_ms", "finished_unix_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    state: str
    reason: str
    done: int
    total: int
    message: str
    version: int
    started_unix_ms: int
    finished_unix_ms: int
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., version: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ...) -> None: ...

class GetClusteringStatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ClusterCandidate(_message.Message):
    __slots__ = ("k", "silhouette", "davies_bouldin", "calinski_harabasz")
    K_FIELD_NUMBER: _ClassVar[int]
    SILHOUETTE_FIELD_NUMBER: _ClassVar[int]
    DAVIES_BOULDIN_FIELD_NUMBER: _ClassVar[int]
    CALINSKI_HARABASZ_FIELD_NUMBER: _ClassVar[int]
    k: int
    silhouette: float
    davies_bouldin: float
    calinski_harabasz: float
    def __init__(self, k: _Optional[int] = ..., silhouette: _Optional[float] = ..., davies_bouldin: _Optional[float] = ..., calinski_harabasz: _Optional[float] = ...) -> None: ...

class ClusteringStatus(_message.Message):
    __slots__ = ("state", "version", "k", "samples", "silhouette", "davies_bouldin", "calinski_harabasz", "candidates", "cluster_sizes", "feature_names", "trained_unix_ms", "age_days", "stale", "drift", "drift_measured", "drift_threshold", "drift_by_feature", "retrain_scheduled", "job", "embedding_version")
    class DriftByFeatureEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SILHOUETTE_FIELD_NUMBER: _ClassVar[int]
    DAVIES_BOULDIN_FIELD_NUMBER: _ClassVar[int]
    CALINSKI_HARABASZ_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_SIZES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AGE_DAYS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    DRIFT_MEASURED_FIELD_NUMBER: _ClassVar[int]
    DRIFT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DRIFT_BY_FEATURE_FIELD_NUMBER: _ClassVar[int]
    RETRAIN_SCHEDULED_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    state: str
    version: int
    k: int
    samples: int
    silhouette: float
    davies_bouldin: float
    calinski_harabasz: float
    candidates: _containers.RepeatedCompositeFieldContainer[ClusterCandidate]
    cluster_sizes: _containers.RepeatedScalarFieldContainer[int]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    trained_unix_ms: int
    age_days: float
    stale: bool
    drift: float
    drift_measured: bool
    drift_threshold: float
    drift_by_feature: _containers.ScalarMap[str, float]
    retrain_scheduled: bool
    job: LearningJob
    embedding_version: int
    def __init__(self, state: _Optional[str] = ..., version: _Optional[int] = ..., k: _Optional[int] = ..., samples: _Optional[int] = ..., silhouette: _Optional[float] = ..., davies_bouldin: _Optional[float] = ..., calinski_harabasz: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[ClusterCandidate, _Mapping]]] = ..., cluster_sizes: _Optional[_Iterable[int]] = ..., feature_names: _Optional[_Iterable[str]] = ..., trained_unix_ms: _Optional[int] = ..., age_days: _Optional[float] = ..., stale: _Optional[bool] = ..., drift: _Optional[float] = ..., drift_measured: _Optional[bool] = ..., drift_threshold: _Optional[float] = ..., drift_by_feature: _Optional[_Mapping[str, float]] = ..., retrain_scheduled: _Optional[bool] = ..., job: _Optional[_Union[LearningJob, _Mapping]] = ..., embedding_version: _Optional[int] = ...) -> None: ...

class TrainEmbeddingsRequest(_message.Message):
    __slots__ = ("epochs", "loss", "labels", "fine_tune")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNE_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    loss: str
    labels: str
    fine_tune: bool
    def __init__(self, epochs: _Optional[int] = ..., loss: _Optional[str] = ..., labels: _Optional[str] = ..., fine_tune: _Optional[bool] = ...) -> None: ...

class FindSimilarUsersRequest(_message.Message):
    __slots__ = ("user_id", "k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class SimilarUser(_message.Message):
    __slots__ = ("user_id", "similarity")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    similarity: float
    def __init__(self, user_id: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class FindSimilarUsersResponse(_message.Message):
    __slots__ = ("users", "model_version")
    USERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[SimilarUser]
    model_version: int
    def __init__(self, users: _Optional[_Iterable[_Union[SimilarUser, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...
