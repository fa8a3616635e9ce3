from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorCompression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[TensorCompression]
    COMPRESSION_FP16: _ClassVar[TensorCompression]
    COMPRESSION_BF16: _ClassVar[TensorCompression]
    COMPRESSION_INT8: _ClassVar[TensorCompression]
    COMPRESSION_TOPK: _ClassVar[TensorCompression]

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
    NOT_ADMITTED: _ClassVar[ErrorCode]
    REPLAYED: _ClassVar[ErrorCode]
    BUSY: _ClassVar[ErrorCode]

class MemberStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_JOIN: _ClassVar[MemberStatus]
    MEMBER_LEAVE: _ClassVar[MemberStatus]
COMPRESSION_NONE: TensorCompression
COMPRESSION_FP16: TensorCompression
COMPRESSION_BF16: TensorCompression
COMPRESSION_INT8: TensorCompression
COMPRESSION_TOPK: TensorCompression
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
NOT_ADMITTED: ErrorCode
REPLAYED: ErrorCode
BUSY: ErrorCode
MEMBER_JOIN: MemberStatus
MEMBER_LEAVE: MemberStatus

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "compression", "wire_bytes", "block_size", "blocks", "k", "value_dtype", "scale_dtype", "scale_exponent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    compression: TensorCompression
    wire_bytes: int
    block_size: int
    blocks: int
    k: int
    value_dtype: str
    scale_dtype: str
    scale_exponent: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., compression: _Optional[_Union[TensorCompression, str]] = ..., wire_bytes: _Optional[int] = ..., block_size: _Optional[int] = ..., blocks: _Optional[int] = ..., k: _Optional[int] = ..., value_dtype: _Optional[str] = ..., scale_dtype: _Optional[str] = ..., scale_exponent: _Optional[int] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("method", "body", "tensors", "payload_bytes", "error", "error_message", "nonce", "sent_at", "admission")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    method: str
    body: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    payload_bytes: int
    error: ErrorCode
    error_message: str
    nonce: bytes
    sent_at: float
    admission: bytes
    def __init__(self, method: _Optional[str] = ..., body: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., payload_bytes: _Optional[int] = ..., error: _Optional[_Union[ErrorCode, str]] = ..., error_message: _Optional[str] = ..., nonce: _Optional[bytes] = ..., sent_at: _Optional[float] = ..., admission: _Optional[bytes] = ...) -> None: ...

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
    __slots__ = ("peer_id", "maddrs", "round", "task", "config_hash", "capabilities", "timestamp", "secagg_key", "admission_mac")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SECAGG_KEY_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_MAC_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    round: int
    task: str
    config_hash: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    timestamp: float
    secagg_key: bytes
    admission_mac: bytes
    def __init__(self, peer_id: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., task: _Optional[str] = ..., config_hash: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., timestamp: _Optional[float] = ..., secagg_key: _Optional[bytes] = ..., admission_mac: _Optional[bytes] = ...) -> None: ...

class MemberEntry(_message.Message):
    __slots__ = ("peer_id", "last_active_round", "index", "status")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVE_ROUND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    last_active_round: int
    index: int
    status: MemberStatus
    def __init__(self, peer_id: _Optional[str] = ..., last_active_round: _Optional[int] = ..., index: _Optional[int] = ..., status: _Optional[_Union[MemberStatus, str]] = ...) -> None: ...

class MembershipView(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[MemberEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[MemberEntry, _Mapping]]] = ...) -> None: ...

class ModestPing(_message.Message):
    __slots__ = ("run_id", "config_hash", "round_estimate", "index")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    round_estimate: int
    index: int
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., round_estimate: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class ModestPong(_message.Message):
    __slots__ = ("round_estimate", "index", "model_round")
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROUND_FIELD_NUMBER: _ClassVar[int]
    round_estimate: int
    index: int
    model_round: int
    def __init__(self, round_estimate: _Optional[int] = ..., index: _Optional[int] = ..., model_round: _Optional[int] = ...) -> None: ...

class ModestAdvert(_message.Message):
    __slots__ = ("run_id", "config_hash", "status", "index", "round_estimate")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    status: MemberStatus
    index: int
    round_estimate: int
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., status: _Optional[_Union[MemberStatus, str]] = ..., index: _Optional[int] = ..., round_estimate: _Optional[int] = ...) -> None: ...

class ModestAdvertAck(_message.Message):
    __slots__ = ("round_estimate", "view")
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    round_estimate: int
    view: MembershipView
    def __init__(self, round_estimate: _Optional[int] = ..., view: _Optional[_Union[MembershipView, _Mapping]] = ...) -> None: ...

class ModestModel(_message.Message):
    __slots__ = ("run_id", "config_hash", "round", "round_estimate", "view", "parent_digest", "combined", "sample", "sample_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    PARENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    round: int
    round_estimate: int
    view: MembershipView
    parent_digest: bytes
    combined: int
    sample: _containers.RepeatedScalarFieldContainer[str]
    sample_key: bytes
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., round: _Optional[int] = ..., round_estimate: _Optional[int] = ..., view: _Optional[_Union[MembershipView, _Mapping]] = ..., parent_digest: _Optional[bytes] = ..., combined: _Optional[int] = ..., sample: _Optional[_Iterable[str]] = ..., sample_key: _Optional[bytes] = ...) -> None: ...

class ModestModelAck(_message.Message):
    __slots__ = ("accepted", "round_estimate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round_estimate: int
    def __init__(self, accepted: _Optional[bool] = ..., round_estimate: _Optional[int] = ...) -> None: ...

class ModestUpdate(_message.Message):
    __slots__ = ("run_id", "config_hash", "round", "round_estimate", "view", "base_digest", "train_loss", "examples", "parent_digest", "secure", "aggregators", "base_sender")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PARENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATORS_FIELD_NUMBER: _ClassVar[int]
    BASE_SENDER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    round: int
    round_estimate: int
    view: MembershipView
    base_digest: bytes
    train_loss: float
    examples: int
    parent_digest: bytes
    secure: bool
    aggregators: _containers.RepeatedScalarFieldContainer[str]
    base_sender: str
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., round: _Optional[int] = ..., round_estimate: _Optional[int] = ..., view: _Optional[_Union[MembershipView, _Mapping]] = ..., base_digest: _Optional[bytes] = ..., train_loss: _Optional[float] = ..., examples: _Optional[int] = ..., parent_digest: _Optional[bytes] = ..., secure: _Optional[bool] = ..., aggregators: _Optional[_Iterable[str]] = ..., base_sender: _Optional[str] = ...) -> None: ...

class ModestGroupSums(_message.Message):
    __slots__ = ("run_id", "config_hash", "index", "base_digest", "groups", "left_out")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    index: int
    base_digest: bytes
    groups: _containers.RepeatedCompositeFieldContainer[ModestGroupSum]
    left_out: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., index: _Optional[int] = ..., base_digest: _Optional[bytes] = ..., groups: _Optional[_Iterable[_Union[ModestGroupSum, _Mapping]]] = ..., left_out: _Optional[_Iterable[int]] = ...) -> None: ...

class ModestGroupSum(_message.Message):
    __slots__ = ("group", "weight_sum", "survivors", "users")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    group: int
    weight_sum: float
    survivors: _containers.RepeatedScalarFieldContainer[str]
    users: int
    def __init__(self, group: _Optional[int] = ..., weight_sum: _Optional[float] = ..., survivors: _Optional[_Iterable[str]] = ..., users: _Optional[int] = ...) -> None: ...

class ModestGroupSumsAck(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ModestAggAck(_message.Message):
    __slots__ = ("round", "success", "reason", "round_estimate", "contributors", "sample")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUND_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    round: int
    success: bool
    reason: str
    round_estimate: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    sample: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., success: _Optional[bool] = ..., reason: _Optional[str] = ..., round_estimate: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., sample: _Optional[_Iterable[str]] = ...) -> None: ...

class ModestBaseRequest(_message.Message):
    __slots__ = ("run_id", "config_hash", "round", "digest", "outer_only")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OUTER_ONLY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    round: int
    digest: bytes
    outer_only: bool
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., round: _Optional[int] = ..., digest: _Optional[bytes] = ..., outer_only: _Optional[bool] = ...) -> None: ...

class ModestBaseResponse(_message.Message):
    __slots__ = ("found", "round")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    round: int
    def __init__(self, found: _Optional[bool] = ..., round: _Optional[int] = ...) -> None: ...

class DpsgdModel(_message.Message):
    __slots__ = ("run_id", "config_hash", "round", "degree")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    round: int
    degree: int
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., round: _Optional[int] = ..., degree: _Optional[int] = ...) -> None: ...

class DpsgdAck(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
