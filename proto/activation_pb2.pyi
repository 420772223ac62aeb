from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDtype]
    WIRE_DTYPE_F32: _ClassVar[WireDtype]
    WIRE_DTYPE_F16: _ClassVar[WireDtype]
    WIRE_DTYPE_BF16: _ClassVar[WireDtype]

class ActivationErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_ERROR_CODE_UNSPECIFIED: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_NOT_READY: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_BAD_FRAME: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_POSITION_GAP: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_CONTEXT_FULL: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_TOO_MANY_SESSIONS: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_INTERNAL: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_UNAUTHENTICATED: _ClassVar[ActivationErrorCode]
    ACTIVATION_ERROR_CODE_TOO_MANY_CONNECTIONS: _ClassVar[ActivationErrorCode]
WIRE_DTYPE_UNSPECIFIED: WireDtype
WIRE_DTYPE_F32: WireDtype
WIRE_DTYPE_F16: WireDtype
WIRE_DTYPE_BF16: WireDtype
ACTIVATION_ERROR_CODE_UNSPECIFIED: ActivationErrorCode
ACTIVATION_ERROR_CODE_NOT_READY: ActivationErrorCode
ACTIVATION_ERROR_CODE_BAD_FRAME: ActivationErrorCode
ACTIVATION_ERROR_CODE_POSITION_GAP: ActivationErrorCode
ACTIVATION_ERROR_CODE_CONTEXT_FULL: ActivationErrorCode
ACTIVATION_ERROR_CODE_TOO_MANY_SESSIONS: ActivationErrorCode
ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE: ActivationErrorCode
ACTIVATION_ERROR_CODE_INTERNAL: ActivationErrorCode
ACTIVATION_ERROR_CODE_UNAUTHENTICATED: ActivationErrorCode
ACTIVATION_ERROR_CODE_TOO_MANY_CONNECTIONS: ActivationErrorCode

class ActivationHello(_message.Message):
    __slots__ = ("auth_token", "error", "code")
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    auth_token: str
    error: str
    code: ActivationErrorCode
    def __init__(self, auth_token: _Optional[str] = ..., error: _Optional[str] = ..., code: _Optional[_Union[ActivationErrorCode, str]] = ...) -> None: ...

class ActivationFrame(_message.Message):
    __slots__ = ("session_id", "seq", "end_session", "error", "batch", "timings")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    END_SESSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    end_session: EndSession
    error: ActivationError
    batch: BatchActivations
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., end_session: _Optional[_Union[EndSession, _Mapping]] = ..., error: _Optional[_Union[ActivationError, _Mapping]] = ..., batch: _Optional[_Union[BatchActivations, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage_index", "total_ns", "compute_ns", "downstream_ns")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_NS_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    total_ns: int
    compute_ns: int
    downstream_ns: int
    def __init__(self, stage_index: _Optional[int] = ..., total_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., downstream_ns: _Optional[int] = ...) -> None: ...

class Activations(_message.Message):
    __slots__ = ("token_count", "dtype", "shape", "data")
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    token_count: int
    dtype: WireDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, token_count: _Optional[int] = ..., dtype: _Optional[_Union[WireDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BatchActivations(_message.Message):
    __slots__ = ("sessions", "activations")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionRows]
    activations: Activations
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionRows, _Mapping]]] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ...) -> None: ...

class SessionRows(_message.Message):
    __slots__ = ("session_id", "start_pos", "token_count", "parents", "keep")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_pos: int
    token_count: int
    parents: _containers.RepeatedScalarFieldContainer[int]
    keep: KeepPath
    def __init__(self, session_id: _Optional[str] = ..., start_pos: _Optional[int] = ..., token_count: _Optional[int] = ..., parents: _Optional[_Iterable[int]] = ..., keep: _Optional[_Union[KeepPath, _Mapping]] = ...) -> None: ...

class KeepPath(_message.Message):
    __slots__ = ("base", "path")
    BASE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    base: int
    path: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, base: _Optional[int] = ..., path: _Optional[_Iterable[int]] = ...) -> None: ...

class EndSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivationError(_message.Message):
    __slots__ = ("code", "message", "stage_index")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    code: ActivationErrorCode
    message: str
    stage_index: int
    def __init__(self, code: _Optional[_Union[ActivationErrorCode, str]] = ..., message: _Optional[str] = ..., stage_index: _Optional[int] = ...) -> None: ...
