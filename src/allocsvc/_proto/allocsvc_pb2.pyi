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
    __slots__ = ("assignment_id", "variant_id", "counted")
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    VARIANT_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    assignment_id: str
    variant_id: str
    counted: bool
    def __init__(self, assignment_id: _Optional[str] = ..., variant_id: _Optional[str] = ..., counted: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("mode",)
    MODE_FIELD_NUMBER: _ClassVar[int]
    mode: ExplorationMode
    def __init__(self, mode: _Optional[_Union[ExplorationMode, str]] = ...) -> None: ...

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
