from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_CREATED: _ClassVar[NodeState]
    NODE_STATE_STARTING: _ClassVar[NodeState]
    NODE_STATE_SYNCING: _ClassVar[NodeState]
    NODE_STATE_TRAINING: _ClassVar[NodeState]
    NODE_STATE_STOPPING: _ClassVar[NodeState]
    NODE_STATE_STOPPED: _ClassVar[NodeState]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_CREATED: NodeState
NODE_STATE_STARTING: NodeState
NODE_STATE_SYNCING: NodeState
NODE_STATE_TRAINING: NodeState
NODE_STATE_STOPPING: NodeState
NODE_STATE_STOPPED: NodeState

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("peer_id", "run_id", "task", "round", "peers", "accuracy", "loss", "bytes_sent", "bytes_received", "rejected", "maddrs", "state", "topology", "rule", "pid", "uptime_s", "version", "partial_rounds", "last_checkpoint_round", "resumed_from", "node_state", "dht_state", "dht_events", "round_bytes_sent", "round_bytes_received", "tensor_wire_bytes_sent", "tensor_raw_bytes_sent", "tensor_wire_bytes_received", "tensor_raw_bytes_received", "partial_by_reason", "metric", "metric_value")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DhtEventsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PartialByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    NODE_STATE_FIELD_NUMBER: _ClassVar[int]
    DHT_STATE_FIELD_NUMBER: _ClassVar[int]
    DHT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_WIRE_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_RAW_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_WIRE_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_RAW_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    run_id: str
    task: str
    round: int
    peers: int
    accuracy: float
    loss: float
    bytes_sent: int
    bytes_received: int
    rejected: _containers.ScalarMap[str, int]
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    state: str
    topology: str
    rule: str
    pid: int
    uptime_s: float
    version: str
    partial_rounds: int
    last_checkpoint_round: int
    resumed_from: str
    node_state: NodeState
    dht_state: str
    dht_events: _containers.ScalarMap[str, int]
    round_bytes_sent: int
    round_bytes_received: int
    tensor_wire_bytes_sent: int
    tensor_raw_bytes_sent: int
    tensor_wire_bytes_received: int
    tensor_raw_bytes_received: int
    partial_by_reason: _containers.ScalarMap[str, int]
    metric: str
    metric_value: float
    def __init__(self, peer_id: _Optional[str] = ..., run_id: _Optional[str] = ..., task: _Optional[str] = ..., round: _Optional[int] = ..., peers: _Optional[int] = ..., accuracy: _Optional[float] = ..., loss: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., rejected: _Optional[_Mapping[str, int]] = ..., maddrs: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., topology: _Optional[str] = ..., rule: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_s: _Optional[float] = ..., version: _Optional[str] = ..., partial_rounds: _Optional[int] = ..., last_checkpoint_round: _Optional[int] = ..., resumed_from: _Optional[str] = ..., node_state: _Optional[_Union[NodeState, str]] = ..., dht_state: _Optional[str] = ..., dht_events: _Optional[_Mapping[str, int]] = ..., round_bytes_sent: _Optional[int] = ..., round_bytes_received: _Optional[int] = ..., tensor_wire_bytes_sent: _Optional[int] = ..., tensor_raw_bytes_sent: _Optional[int] = ..., tensor_wire_bytes_received: _Optional[int] = ..., tensor_raw_bytes_received: _Optional[int] = ..., partial_by_reason: _Optional[_Mapping[str, int]] = ..., metric: _Optional[str] = ..., metric_value: _Optional[float] = ...) -> None: ...

class ListPeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerEntry(_message.Message):
    __slots__ = ("peer_id", "maddrs", "round", "last_seen", "age_s", "task", "capabilities")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    round: int
    last_seen: float
    age_s: float
    task: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., last_seen: _Optional[float] = ..., age_s: _Optional[float] = ..., task: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPeersReply(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerEntry]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerEntry, _Mapping]]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsReply(_message.Message):
    __slots__ = ("round", "loss", "test_loss", "accuracy", "calls", "failed_calls", "bytes_sent", "bytes_received", "rejected", "directory_mismatched", "directory_invalid", "peers", "combined", "fraction", "failures", "round_bytes_sent", "round_bytes_received", "tensor_wire_bytes_sent", "tensor_raw_bytes_sent", "metric", "metric_value")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILED_CALLS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_MISMATCHED_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_INVALID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    ROUND_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_WIRE_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_RAW_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    round: int
    loss: float
    test_loss: float
    accuracy: float
    calls: int
    failed_calls: int
    bytes_sent: int
    bytes_received: int
    rejected: _containers.ScalarMap[str, int]
    directory_mismatched: int
    directory_invalid: int
    peers: int
    combined: int
    fraction: float
    failures: int
    round_bytes_sent: int
    round_bytes_received: int
    tensor_wire_bytes_sent: int
    tensor_raw_bytes_sent: int
    metric: str
    metric_value: float
    def __init__(self, round: _Optional[int] = ..., loss: _Optional[float] = ..., test_loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., calls: _Optional[int] = ..., failed_calls: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., rejected: _Optional[_Mapping[str, int]] = ..., directory_mismatched: _Optional[int] = ..., directory_invalid: _Optional[int] = ..., peers: _Optional[int] = ..., combined: _Optional[int] = ..., fraction: _Optional[float] = ..., failures: _Optional[int] = ..., round_bytes_sent: _Optional[int] = ..., round_bytes_received: _Optional[int] = ..., tensor_wire_bytes_sent: _Optional[int] = ..., tensor_raw_bytes_sent: _Optional[int] = ..., metric: _Optional[str] = ..., metric_value: _Optional[float] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("round", "train_loss", "test_loss", "accuracy", "peers", "combined", "fraction", "partner", "failures", "extra_json", "peer_id", "time", "bytes_sent", "bytes_received", "metric", "metric_value")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    PARTNER_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    round: int
    train_loss: float
    test_loss: float
    accuracy: float
    peers: int
    combined: int
    fraction: float
    partner: str
    failures: int
    extra_json: str
    peer_id: str
    time: float
    bytes_sent: int
    bytes_received: int
    metric: str
    metric_value: float
    def __init__(self, round: _Optional[int] = ..., train_loss: _Optional[float] = ..., test_loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., peers: _Optional[int] = ..., combined: _Optional[int] = ..., fraction: _Optional[float] = ..., partner: _Optional[str] = ..., failures: _Optional[int] = ..., extra_json: _Optional[str] = ..., peer_id: _Optional[str] = ..., time: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., metric: _Optional[str] = ..., metric_value: _Optional[float] = ...) -> None: ...
