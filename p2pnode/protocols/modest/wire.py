"""MoDeST on the wire: method names, limits, and the checks of what peers send.

Every check raises `BadMessage` with a reason code (``wrong_run``, ``malformed``, ``oversized``,
``bad_shape``, ``non_finite``); the transport counts it and answers the sender with the reason. The
messages themselves are protobuf (`p2pnode.proto.peer_pb2`, ``Modest*``); tensors travel beside them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from p2pnode.errors import BadMessage
from p2pnode.proto import peer_pb2
from p2pnode.protocols.base import State
from p2pnode.protocols.membership import MAX_WIRE_NUMBER
from p2pnode.protocols.modest.settings import ModestSettings
from p2pnode.secagg import SecAggResult
from p2pnode.transport.codec import check_tensors

PING = "modest.ping"
MEMBERSHIP = "modest.membership"
MODEL = "modest.model"
UPDATE = "modest.update"
BASE = "modest.base"
GROUP_SUMS = "modest.group_sums"
#: Prefix of the outer optimizer's state tensors, which travel with a model.
OUTER_PREFIX = "outer/"
#: Largest sample a model message may list, and longest peer id in it (characters).
MAX_SAMPLE = 4096
MAX_PEER_ID = 256
#: Longest ordering key a model message may carry (bytes).
MAX_SAMPLE_KEY = 64
#: Transport refusal code of a secure-aggregation claim that the sample order does not support.
WRONG_SAMPLE = "wrong_sample"

Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def check_run(settings: ModestSettings, sender: str, body: Any) -> None:
    """Refuse a message of another run or of another run-wide config (``wrong_run``)."""
    if body.run_id != settings.run_id or body.config_hash != settings.config_hash:
        raise BadMessage(f"{sender} is in run {body.run_id!r} with config {body.config_hash!r}; this node is "
                         f"in run {settings.run_id!r} with config {settings.config_hash!r}",
                         code="wrong_run")


def check_round(*values: int) -> None:
    """Refuse round numbers beyond what a view entry can hold (``malformed``)."""
    if any(v >= MAX_WIRE_NUMBER for v in values):
        raise BadMessage("round number out of range", code="malformed")


def outer_tensors(outer: Mapping[str, torch.Tensor]) -> State:
    """The outer optimizer's state as it travels beside a model (names under `OUTER_PREFIX`)."""
    # 0-d tensors (the step counter) travel as shape (1,): the wire codec cannot view a 0-d int64 as bytes.
    return {OUTER_PREFIX + k: (v.reshape(1) if v.dim() == 0 else v) for k, v in outer.items()}


def split_model(tensors: Mapping[str, torch.Tensor], spec: Spec, settings: ModestSettings, *,
                outer_allowed: bool, outer_only: bool = False) -> tuple[State, State]:
    """Check a received model (and its outer optimizer state); raise `BadMessage` when malformed.

    `outer_only`: the reply to a momentum pull (`ModestBaseRequest.outer_only`): no model, an outer state
    with its ``steps`` counter.

    Returns:
        (model, outer optimizer state), the latter with its names unprefixed.
    """
    model = {k: v for k, v in tensors.items() if not k.startswith(OUTER_PREFIX)}
    outer = {k[len(OUTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(OUTER_PREFIX)}
    if outer_only:
        if model or "steps" not in outer:
            raise BadMessage("a reply with the outer momentum only must carry it, with its steps, and no model",
                             code="bad_shape")
    else:
        check_tensors(model, spec)
    if outer and not (outer_allowed and settings.outer_lr is not None):
        raise BadMessage("unexpected outer optimizer state in this message", code="bad_shape")
    for name, t in outer.items():
        if name == "steps":
            if t.dtype != torch.int64 or t.numel() != 1 or t.dim() > 1 or int(t.reshape(())) < 0:
                raise BadMessage("outer optimizer 'steps' must be a non-negative int64 scalar", code="bad_shape")
            continue
        param = name[len("momentum/"):] if name.startswith("momentum/") else None
        if param is None or param not in spec:
            raise BadMessage(f"unknown outer optimizer entry {name[:60]!r}", code="bad_shape")
        if tuple(t.shape) != spec[param][0] or not t.is_floating_point():
            raise BadMessage(f"outer optimizer entry {name[:60]!r} has the wrong shape or dtype", code="bad_shape")
        if not bool(torch.isfinite(t).all()):
            raise BadMessage(f"outer optimizer entry {name[:60]!r} holds NaN or Inf", code="non_finite")
    return model, outer


def check_sample(body: peer_pb2.ModestModel) -> None:
    """Refuse a model message whose sample or ordering key is oversized."""
    if len(body.sample) > MAX_SAMPLE or any(len(p) > MAX_PEER_ID for p in body.sample):
        raise BadMessage(f"the sample of version {body.round} lists {len(body.sample)} peers (at most "
                         f"{MAX_SAMPLE}) or an over-long peer id", code="oversized")
    if len(body.sample_key) > MAX_SAMPLE_KEY:
        raise BadMessage(f"sample_key: {len(body.sample_key)} bytes, at most {MAX_SAMPLE_KEY}", code="oversized")


def check_update_body(body: peer_pb2.ModestUpdate, tensors: Mapping[str, torch.Tensor], secure: bool) -> None:
    """Refuse an update in the clear in a secure run, and a secure one in a clear run."""
    if secure or body.secure:
        # With secagg an update travels only masked: refuse one in the clear (and the converse).
        if not secure:
            raise BadMessage("secure update, but this run does not use secure aggregation", code="malformed")
        if not body.secure or tensors:
            raise BadMessage("update in the clear, but this run uses secure aggregation: the trained model "
                             "must travel masked (secagg)", code="malformed")


def check_aggregators(body: peer_pb2.ModestUpdate, settings: ModestSettings) -> None:
    """Refuse an update that lists more aggregators than the run has, or an over-long peer id."""
    if len(body.aggregators) > settings.aggregators or any(len(a) > MAX_PEER_ID for a in body.aggregators):
        raise BadMessage(f"the update lists {len(body.aggregators)} aggregators (at most "
                         f"{settings.aggregators}) or an over-long peer id", code="oversized")


def group_result(mean: torch.Tensor, extras: torch.Tensor, weight_sum: float, survivors: tuple[str, ...],
                 users: int) -> SecAggResult:
    """A secure group's result as another aggregator receives it (`ModestGroupSums`): the mean in float32."""
    mean64, extras64 = mean.to(torch.float32).to(torch.float64), extras.to(torch.float32).to(torch.float64)
    return SecAggResult(weighted_sum=mean64 * weight_sum, extras_sum=extras64 * weight_sum, weight_sum=weight_sum,
                        survivors=survivors, dropped={}, users=users, neighbours=0, threshold=0, word_bits=0)


def as_sent(result: SecAggResult) -> SecAggResult:
    """`result` as the other aggregators receive it (`group_result` of its float32 mean)."""
    return group_result(result.mean(), result.extras_mean(), result.weight_sum, tuple(sorted(result.survivors)),
                        result.users)


def parse_group_sums(body: peer_pb2.ModestGroupSums, tensors: Mapping[str, torch.Tensor], settings: ModestSettings,
                     *, dim: int, extras: int) -> tuple[list[int], dict[int, SecAggResult]]:
    """Check the group sums another aggregator sent; raise `BadMessage` when malformed.

    Args:
        body: the message.
        tensors: its tensors (``mean.<g>``, and ``extras.<g>`` with ``vca``).
        settings: the run's settings (groups, sample size).
        dim: coordinates of a group mean (`Layout.dim`).
        extras: coordinates of a group's extras (`Layout.extras`; 0 without ``vca``).

    Returns:
        (every group named, sums included and left out; the sums by group, as `group_result` builds them).
    """
    s = settings
    groups = [(int(g.group), g) for g in body.groups]
    named = [g for g, _ in groups] + [int(g) for g in body.left_out]
    if len(named) != len(set(named)) or any(g >= s.secagg_groups for g in named):
        raise BadMessage(f"group sums name groups {named[:8]}: duplicates or beyond secagg_groups="
                         f"{s.secagg_groups}", code="malformed")
    if len(body.base_digest) != 32:
        raise BadMessage("group sums: base_digest must be 32 bytes", code="malformed")
    largest = -(-s.sample_size // s.secagg_groups)
    expected = {f"mean.{g}" for g, _ in groups}
    if extras:
        expected |= {f"extras.{g}" for g, _ in groups}
    if set(tensors) != expected:
        raise BadMessage(f"group sums carry tensors {sorted(tensors)[:4]}, expected {sorted(expected)[:4]}",
                         code="bad_shape")
    parsed: dict[int, SecAggResult] = {}
    for g, part in groups:
        if not (len(part.survivors) <= part.users <= largest and part.survivors) or any(
                len(p) > MAX_PEER_ID for p in part.survivors):
            raise BadMessage(f"group {g}: {len(part.survivors)} survivors of {part.users} members (a group has "
                             f"at most {largest})", code="malformed")
        if not (math.isfinite(part.weight_sum) and part.weight_sum > 0):
            raise BadMessage(f"group {g}: weight_sum {part.weight_sum} must be finite and > 0", code="non_finite")
        mean = tensors[f"mean.{g}"]
        extra = tensors.get(f"extras.{g}", torch.zeros(0))
        for name, t, n in ((f"mean.{g}", mean, dim), (f"extras.{g}", extra, extras)):
            if tuple(t.shape) != (n,) or not t.is_floating_point():
                raise BadMessage(f"group sums: {name} has shape {tuple(t.shape)} {t.dtype}, expected ({n},) "
                                 f"floating", code="bad_shape")
            if not bool(torch.isfinite(t).all()):
                raise BadMessage(f"group sums: {name} holds NaN or Inf", code="non_finite")
        parsed[g] = group_result(mean, extra, float(part.weight_sum), tuple(sorted(part.survivors)),
                                 int(part.users))
    return named, parsed
