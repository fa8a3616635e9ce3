"""Wire messages of secure aggregation (``protos/p2pnode/proto/secagg.proto``): types, session check, limits."""

from __future__ import annotations

from collections.abc import Sized

import torch
from google.protobuf.message import Message as ProtoMessage

from p2pnode.errors import BadMessage
from p2pnode.proto import secagg_pb2
from p2pnode.secagg.settings import Plan
from p2pnode.secagg.stages import Stage

#: The user's request and the aggregator's reply of each stage.
REQUEST_TYPES: dict[Stage, type[ProtoMessage]] = {
    Stage.ADVERTISE: secagg_pb2.SecAggAdvertise,
    Stage.SHARE: secagg_pb2.SecAggShare,
    Stage.MASKED: secagg_pb2.SecAggMasked,
    Stage.UNMASK: secagg_pb2.SecAggUnmask,
}
REPLY_TYPES: dict[Stage, type[ProtoMessage]] = {
    Stage.ADVERTISE: secagg_pb2.SecAggAdvertiseReply,
    Stage.SHARE: secagg_pb2.SecAggShareReply,
    Stage.MASKED: secagg_pb2.SecAggMaskedReply,
    Stage.UNMASK: secagg_pb2.SecAggUnmaskReply,
}
#: Name of the masked-input tensor.
MASKED_TENSOR = "masked"


def session_proto(plan: Plan) -> secagg_pb2.SecAggSession:
    """The session field every user message carries."""
    s = plan.session
    return secagg_pb2.SecAggSession(run_id=s.run_id, round=s.round, digest=plan.digest, group=s.group)


def check_session(plan: Plan, got: secagg_pb2.SecAggSession, sender: str) -> None:
    """Refuse a message of another instance (``wrong_run``)."""
    s = plan.session
    if got.run_id != s.run_id or got.round != s.round or got.group != s.group or got.digest != plan.digest:
        raise BadMessage(f"secagg message from {sender} belongs to another instance (run {got.run_id!r}, round "
                         f"{got.round}); this one is run {s.run_id!r}, round {s.round} with another sample, "
                         f"aggregator or parameters" if got.run_id == s.run_id and got.round == s.round else
                         f"secagg message from {sender} for run {got.run_id!r} round {got.round}, but this "
                         f"instance is run {s.run_id!r} round {s.round}", code="wrong_run")


def check_count(what: str, items: Sized, limit: int) -> None:
    """Refuse a repeated field with more than `limit` entries (``oversized``)."""
    if len(items) > limit:
        raise BadMessage(f"{what}: {len(items)} entries, at most {limit} allowed", code="oversized")


def check_bytes(what: str, value: bytes, size: int) -> None:
    """Refuse a bytes field whose length is not `size` (``oversized`` when longer, else ``malformed``)."""
    if len(value) != size:
        raise BadMessage(f"{what}: {len(value)} bytes, expected {size}",
                         code="oversized" if len(value) > size else "malformed")


def check_index(what: str, index: int, n: int) -> None:
    """Refuse a user index outside 1..n (``malformed``)."""
    if not 1 <= index <= n:
        raise BadMessage(f"{what}: user index {index} is not in 1..{n}", code="malformed")


def masked_dtype(word_bits: int) -> torch.dtype:
    """Dtype that carries masked words on the wire: their bits as int32 (2^32) or int64 (2^64)."""
    return torch.int32 if word_bits == 32 else torch.int64
