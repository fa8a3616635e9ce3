from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggSession(_message.Message):
    __slots__ = ("run_id", "round", "digest", "group")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    digest: bytes
    group: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., digest: _Optional[bytes] = ..., group: _Optional[int] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("index", "cipher_public_key", "mask_public_key", "self_mask_commitment", "signature")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    cipher_public_key: bytes
    mask_public_key: bytes
    self_mask_commitment: bytes
    signature: bytes
    def __init__(self, index: _Optional[int] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., self_mask_commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggAdvertise(_message.Message):
    __slots__ = ("session", "keys", "members", "dim", "extras", "context")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    session: SecAggSession
    keys: SecAggKeys
    members: _containers.RepeatedScalarFieldContainer[str]
    dim: int
    extras: int
    context: bytes
    def __init__(self, session: _Optional[_Union[SecAggSession, _Mapping]] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ..., members: _Optional[_Iterable[str]] = ..., dim: _Optional[int] = ..., extras: _Optional[int] = ..., context: _Optional[bytes] = ...) -> None: ...

class SecAggAdvertiseReply(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[SecAggKeys]
    def __init__(self, keys: _Optional[_Iterable[_Union[SecAggKeys, _Mapping]]] = ...) -> None: ...

class SecAggCiphertext(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    recipient: int
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., recipient: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("session", "ciphertexts")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    session: SecAggSession
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, session: _Optional[_Union[SecAggSession, _Mapping]] = ..., ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggShareReply(_message.Message):
    __slots__ = ("ciphertexts",)
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggMasked(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SecAggSession
    def __init__(self, session: _Optional[_Union[SecAggSession, _Mapping]] = ...) -> None: ...

class SecAggMaskedReply(_message.Message):
    __slots__ = ("survivors",)
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggRevealed(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmask(_message.Message):
    __slots__ = ("session", "self_mask_shares", "mask_key_shares")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    session: SecAggSession
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[SecAggRevealed]
    def __init__(self, session: _Optional[_Union[SecAggSession, _Mapping]] = ..., self_mask_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[SecAggRevealed, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...
