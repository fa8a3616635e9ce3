from p2pnode.proto import peer_pb2 as _peer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SyncManifestRequest(_message.Message):
    __slots__ = ("run_id", "config_hash")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ...) -> None: ...

class SyncManifest(_message.Message):
    __slots__ = ("run_id", "config_hash", "round", "tensors", "total_bytes", "chunk_bytes", "chunk_sha256", "model_sha256")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[_peer_pb2.TensorSpec]
    total_bytes: int
    chunk_bytes: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    model_sha256: bytes
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_peer_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[bytes]] = ..., model_sha256: _Optional[bytes] = ...) -> None: ...

class SyncChunkRequest(_message.Message):
    __slots__ = ("run_id", "config_hash", "model_sha256", "index")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_hash: str
    model_sha256: bytes
    index: int
    def __init__(self, run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., model_sha256: _Optional[bytes] = ..., index: _Optional[int] = ...) -> None: ...

class SyncChunk(_message.Message):
    __slots__ = ("model_sha256", "index")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    model_sha256: bytes
    index: int
    def __init__(self, model_sha256: _Optional[bytes] = ..., index: _Optional[int] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("format", "round", "run_id", "config_hash", "task", "created", "peer_id", "steps_done")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    format: int
    round: int
    run_id: str
    config_hash: str
    task: str
    created: float
    peer_id: str
    steps_done: int
    def __init__(self, format: _Optional[int] = ..., round: _Optional[int] = ..., run_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., task: _Optional[str] = ..., created: _Optional[float] = ..., peer_id: _Optional[str] = ..., steps_done: _Optional[int] = ...) -> None: ...
