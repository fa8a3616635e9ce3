from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[ErrorCode]
    UNKNOWN_METHOD: _ClassVar[ErrorCode]
    MALFORMED: _ClassVar[ErrorCode]
    OVERSIZED: _ClassVar[ErrorCode]
    BAD_SHAPE: _ClassVar[ErrorCode]
    NON_FINITE: _ClassVar[ErrorCode]
    WRONG_RUN: _ClassVar[ErrorCode]
    UNAVAILABLE: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    STALE: _ClassVar[ErrorCode]
OK: ErrorCode
UNKNOWN_METHOD: ErrorCode
MALFORMED: ErrorCode
OVERSIZED: ErrorCode
BAD_SHAPE: ErrorCode
NON_FINITE: ErrorCode
WRONG_RUN: ErrorCode
UNAVAILABLE: ErrorCode
INTERNAL: ErrorCode
STALE: ErrorCode

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("method", "body", "tensors", "payload_bytes", "error", "error_message")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    method: str
    body: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    payload_bytes: int
    error: ErrorCode
    error_message: str
    def __init__(self, method: _Optional[str] = ..., body: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., payload_bytes: _Optional[int] = ..., error: _Optional[_Union[ErrorCode, str]] = ..., error_message: _Optional[str] = ...) -> None: ...

class ModelExchange(_message.Message):
    __slots__ = ("run_id", "config_hash", "round", "weight")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    round: int
    weight: float
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., round: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("run_id", "round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class PeerRecord(_message.Message):
    __slots__ = ("peer_id", "maddrs", "round", "task", "config_hash", "capabilities", "timestamp")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    round: int
    task: str
    config_hash: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    timestamp: float
    def __init__(self, peer_id: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., task: _Optional[str] = ..., config_hash: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., timestamp: _Optional[float] = ...) -> None: ...
