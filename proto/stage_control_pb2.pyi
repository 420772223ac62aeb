from layerline.proto import activation_pb2 as _activation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_CLAIMED_BY_OTHER: _ClassVar[RejectReason]
    REJECT_REASON_STALE_TERM: _ClassVar[RejectReason]
    REJECT_REASON_NOT_CLAIMED: _ClassVar[RejectReason]
    REJECT_REASON_BAD_REQUEST: _ClassVar[RejectReason]
    REJECT_REASON_UNAUTHENTICATED: _ClassVar[RejectReason]
    REJECT_REASON_LOAD_FAILED: _ClassVar[RejectReason]
    REJECT_REASON_NOT_PREPARED: _ClassVar[RejectReason]
    REJECT_REASON_PACKAGE_MISMATCH: _ClassVar[RejectReason]
    REJECT_REASON_INTERNAL: _ClassVar[RejectReason]

class InventoryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVENTORY_STATE_UNSPECIFIED: _ClassVar[InventoryState]
    INVENTORY_STATE_PREPARING: _ClassVar[InventoryState]
    INVENTORY_STATE_READY: _ClassVar[InventoryState]
    INVENTORY_STATE_FAILED: _ClassVar[InventoryState]

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATE_UNSPECIFIED: _ClassVar[StageState]
    STAGE_STATE_FREE: _ClassVar[StageState]
    STAGE_STATE_CLAIMED: _ClassVar[StageState]
    STAGE_STATE_PREPARING: _ClassVar[StageState]
    STAGE_STATE_PREPARED: _ClassVar[StageState]
    STAGE_STATE_LOADING: _ClassVar[StageState]
    STAGE_STATE_READY: _ClassVar[StageState]
    STAGE_STATE_FAILED: _ClassVar[StageState]
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_CLAIMED_BY_OTHER: RejectReason
REJECT_REASON_STALE_TERM: RejectReason
REJECT_REASON_NOT_CLAIMED: RejectReason
REJECT_REASON_BAD_REQUEST: RejectReason
REJECT_REASON_UNAUTHENTICATED: RejectReason
REJECT_REASON_LOAD_FAILED: RejectReason
REJECT_REASON_NOT_PREPARED: RejectReason
REJECT_REASON_PACKAGE_MISMATCH: RejectReason
REJECT_REASON_INTERNAL: RejectReason
INVENTORY_STATE_UNSPECIFIED: InventoryState
INVENTORY_STATE_PREPARING: InventoryState
INVENTORY_STATE_READY: InventoryState
INVENTORY_STATE_FAILED: InventoryState
STAGE_STATE_UNSPECIFIED: StageState
STAGE_STATE_FREE: StageState
STAGE_STATE_CLAIMED: StageState
STAGE_STATE_PREPARING: StageState
STAGE_STATE_PREPARED: StageState
STAGE_STATE_LOADING: StageState
STAGE_STATE_READY: StageState
STAGE_STATE_FAILED: StageState

class StageControlRequest(_message.Message):
    __slots__ = ("coordinator_id", "term", "run_id", "claim", "prepare", "inventory", "load", "release", "status")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    term: int
    run_id: str
    claim: Claim
    prepare: Prepare
    inventory: InventoryRequest
    load: StageLoadRequest
    release: Release
    status: StatusRequest
    def __init__(self, coordinator_id: _Optional[str] = ..., term: _Optional[int] = ..., run_id: _Optional[str] = ..., claim: _Optional[_Union[Claim, _Mapping]] = ..., prepare: _Optional[_Union[Prepare, _Mapping]] = ..., inventory: _Optional[_Union[InventoryRequest, _Mapping]] = ..., load: _Optional[_Union[StageLoadRequest, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., status: _Optional[_Union[StatusRequest, _Mapping]] = ...) -> None: ...

class StageControlResponse(_message.Message):
    __slots__ = ("claim_accepted", "prepare_accepted", "inventory", "ready", "released", "status", "rejected")
    CLAIM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PREPARE_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    claim_accepted: ClaimAccepted
    prepare_accepted: PrepareAccepted
    inventory: Inventory
    ready: Ready
    released: Released
    status: Status
    rejected: Rejected
    def __init__(self, claim_accepted: _Optional[_Union[ClaimAccepted, _Mapping]] = ..., prepare_accepted: _Optional[_Union[PrepareAccepted, _Mapping]] = ..., inventory: _Optional[_Union[Inventory, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., released: _Optional[_Union[Released, _Mapping]] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., rejected: _Optional[_Union[Rejected, _Mapping]] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class PackageIdentity(_message.Message):
    __slots__ = ("ref", "manifest_sha256")
    REF_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    ref: str
    manifest_sha256: str
    def __init__(self, ref: _Optional[str] = ..., manifest_sha256: _Optional[str] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("package", "lease_duration_ms", "probe_shape")
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    PROBE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    package: PackageIdentity
    lease_duration_ms: int
    probe_shape: LayerShape
    def __init__(self, package: _Optional[_Union[PackageIdentity, _Mapping]] = ..., lease_duration_ms: _Optional[int] = ..., probe_shape: _Optional[_Union[LayerShape, _Mapping]] = ...) -> None: ...

class LayerShape(_message.Message):
    __slots__ = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "weight_format", "bits", "group_size", "stored_dtype", "batch_rows")
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    weight_format: str
    bits: int
    group_size: int
    stored_dtype: str
    batch_rows: int
    def __init__(self, hidden_size: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., intermediate_size: _Optional[int] = ..., weight_format: _Optional[str] = ..., bits: _Optional[int] = ..., group_size: _Optional[int] = ..., stored_dtype: _Optional[str] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class LayerProbe(_message.Message):
    __slots__ = ("one_row_us", "batch_us", "batch_rows", "weight_format", "layer_bytes", "memory_free_bytes", "error")
    ONE_ROW_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    one_row_us: int
    batch_us: int
    batch_rows: int
    weight_format: str
    layer_bytes: int
    memory_free_bytes: int
    error: str
    def __init__(self, one_row_us: _Optional[int] = ..., batch_us: _Optional[int] = ..., batch_rows: _Optional[int] = ..., weight_format: _Optional[str] = ..., layer_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ClaimAccepted(_message.Message):
    __slots__ = ("lease_duration_ms", "lease_expires_unix_ms", "preempted_coordinator_id", "probe")
    LEASE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    lease_duration_ms: int
    lease_expires_unix_ms: int
    preempted_coordinator_id: str
    probe: LayerProbe
    def __init__(self, lease_duration_ms: _Optional[int] = ..., lease_expires_unix_ms: _Optional[int] = ..., preempted_coordinator_id: _Optional[str] = ..., probe: _Optional[_Union[LayerProbe, _Mapping]] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("reason", "message", "holder_coordinator_id", "holder_term", "lease_remaining_ms")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_TERM_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    reason: RejectReason
    message: str
    holder_coordinator_id: str
    holder_term: int
    lease_remaining_ms: int
    def __init__(self, reason: _Optional[_Union[RejectReason, str]] = ..., message: _Optional[str] = ..., holder_coordinator_id: _Optional[str] = ..., holder_term: _Optional[int] = ..., lease_remaining_ms: _Optional[int] = ...) -> None: ...

class Prepare(_message.Message):
    __slots__ = ("layers", "include_stage0_files", "file_sources")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STAGE0_FILES_FIELD_NUMBER: _ClassVar[int]
    FILE_SOURCES_FIELD_NUMBER: _ClassVar[int]
    layers: LayerRange
    include_stage0_files: bool
    file_sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layers: _Optional[_Union[LayerRange, _Mapping]] = ..., include_stage0_files: _Optional[bool] = ..., file_sources: _Optional[_Iterable[str]] = ...) -> None: ...

class PrepareAccepted(_message.Message):
    __slots__ = ("bytes_total", "files")
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    bytes_total: int
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bytes_total: _Optional[int] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class InventoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("state", "bytes_present", "bytes_total", "layers_ready", "error", "layers", "sources", "bytes_hashed", "files")
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_PRESENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_READY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    BYTES_HASHED_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    state: InventoryState
    bytes_present: int
    bytes_total: int
    layers_ready: int
    error: str
    layers: LayerRange
    sources: _containers.RepeatedCompositeFieldContainer[SourceBytes]
    bytes_hashed: int
    files: _containers.RepeatedCompositeFieldContainer[PreparedFile]
    def __init__(self, state: _Optional[_Union[InventoryState, str]] = ..., bytes_present: _Optional[int] = ..., bytes_total: _Optional[int] = ..., layers_ready: _Optional[int] = ..., error: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., sources: _Optional[_Iterable[_Union[SourceBytes, _Mapping]]] = ..., bytes_hashed: _Optional[int] = ..., files: _Optional[_Iterable[_Union[PreparedFile, _Mapping]]] = ...) -> None: ...

class SourceBytes(_message.Message):
    __slots__ = ("source", "bytes", "files")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    source: str
    bytes: int
    files: int
    def __init__(self, source: _Optional[str] = ..., bytes: _Optional[int] = ..., files: _Optional[int] = ...) -> None: ...

class PreparedFile(_message.Message):
    __slots__ = ("path", "source")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    path: str
    source: str
    def __init__(self, path: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("manifest_sha256", "path", "sha256", "offset")
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    manifest_sha256: str
    path: str
    sha256: str
    offset: int
    def __init__(self, manifest_sha256: _Optional[str] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "data", "file_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    file_bytes: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., file_bytes: _Optional[int] = ...) -> None: ...

class StageLoadRequest(_message.Message):
    __slots__ = ("layers", "stage_index", "stage_count", "upstream_peer", "downstream_peer", "package", "wire_dtype", "kv_cache", "batch", "weight_format", "frame_timeout_ms")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_PEER_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_PEER_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    FRAME_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    layers: LayerRange
    stage_index: int
    stage_count: int
    upstream_peer: str
    downstream_peer: str
    package: PackageIdentity
    wire_dtype: _activation_pb2.WireDtype
    kv_cache: KvCacheConfig
    batch: BatchConfig
    weight_format: str
    frame_timeout_ms: int
    def __init__(self, layers: _Optional[_Union[LayerRange, _Mapping]] = ..., stage_index: _Optional[int] = ..., stage_count: _Optional[int] = ..., upstream_peer: _Optional[str] = ..., downstream_peer: _Optional[str] = ..., package: _Optional[_Union[PackageIdentity, _Mapping]] = ..., wire_dtype: _Optional[_Union[_activation_pb2.WireDtype, str]] = ..., kv_cache: _Optional[_Union[KvCacheConfig, _Mapping]] = ..., batch: _Optional[_Union[BatchConfig, _Mapping]] = ..., weight_format: _Optional[str] = ..., frame_timeout_ms: _Optional[int] = ...) -> None: ...

class KvCacheConfig(_message.Message):
    __slots__ = ("context_length", "max_sessions")
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    context_length: int
    max_sessions: int
    def __init__(self, context_length: _Optional[int] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class BatchConfig(_message.Message):
    __slots__ = ("max_batch_tokens",)
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    def __init__(self, max_batch_tokens: _Optional[int] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("activation_endpoint", "layers", "memory_bytes_used")
    ACTIVATION_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    activation_endpoint: str
    layers: LayerRange
    memory_bytes_used: int
    def __init__(self, activation_endpoint: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., memory_bytes_used: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Released(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Status(_message.Message):
    __slots__ = ("state", "healthy", "message", "holder_coordinator_id", "holder_term", "run_id", "lease_remaining_ms", "loaded_layers", "memory_total_bytes", "memory_free_bytes", "activation_endpoint", "version", "active_sessions", "kv_cache_bytes")
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_TERM_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    LOADED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    state: StageState
    healthy: bool
    message: str
    holder_coordinator_id: str
    holder_term: int
    run_id: str
    lease_remaining_ms: int
    loaded_layers: LayerRange
    memory_total_bytes: int
    memory_free_bytes: int
    activation_endpoint: str
    version: str
    active_sessions: int
    kv_cache_bytes: int
    def __init__(self, state: _Optional[_Union[StageState, str]] = ..., healthy: _Optional[bool] = ..., message: _Optional[str] = ..., holder_coordinator_id: _Optional[str] = ..., holder_term: _Optional[int] = ..., run_id: _Optional[str] = ..., lease_remaining_ms: _Optional[int] = ..., loaded_layers: _Optional[_Union[LayerRange, _Mapping]] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., activation_endpoint: _Optional[str] = ..., version: _Optional[str] = ..., active_sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ...) -> None: ...
