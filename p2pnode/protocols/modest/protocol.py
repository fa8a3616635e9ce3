"""`ModestProtocol`: composes the roles of one MoDeST node and hands each the callbacks it needs.

The roles never import each other: `TrainerRole` gets the aggregator's intake and model send as
callbacks, `AggregatorRole` the trainer's inbox, the secure wrappers the plain roles' steps, and all of
them the node's shared `Core`. This module only wires them, registers the wire handlers, and runs the
node's rounds (`ModestProtocol.run_round`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar, overload

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery import PeerDirectory
from p2pnode.errors import BadMessage
from p2pnode.proto import peer_pb2
from p2pnode.protocols.adversary import Attacker
from p2pnode.protocols.base import ProtocolHooks, ProtocolSnapshot, RoundReport, State
from p2pnode.protocols.compute import Compute
from p2pnode.protocols.membership import JOIN, LEAVE
from p2pnode.protocols.modest.aggregator import AggregatorRole
from p2pnode.protocols.modest.identity import IdentityKeys
from p2pnode.protocols.modest.membership import Membership
from p2pnode.protocols.modest.sampling import Sampler
from p2pnode.protocols.modest.secure import SecureAggregator
from p2pnode.protocols.modest.secure_trainer import SecureTrainer
from p2pnode.protocols.modest.settings import ModestSettings
from p2pnode.protocols.modest.spread import Spread
from p2pnode.protocols.modest.state import Core, Incoming, Result
from p2pnode.protocols.modest.trainer import TrainerRole
from p2pnode.protocols.modest.wire import (
    BASE,
    GROUP_SUMS,
    MAX_PEER_ID,
    MEMBERSHIP,
    MODEL,
    PING,
    UPDATE,
    check_aggregators,
    check_round,
    check_run,
    check_update_body,
    split_model,
)
from p2pnode.secagg import SecAggHost, SecAggResult, check_rule_compatible
from p2pnode.secagg.groups import check_groups
from p2pnode.secagg.randomness import Randomness, SystemRandomness
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Message, Transport

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Forward(Generic[T]):
    """An attribute of the protocol that lives on one of its parts (``owner``: the part's attribute name)."""

    def __init__(self, owner: str, name: str | None = None) -> None:
        self.owner, self.name = owner, name or ""

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = self.name or name

    @overload
    def __get__(self, obj: None, cls: type | None = None) -> _Forward[T]: ...

    @overload
    def __get__(self, obj: object, cls: type | None = None) -> T: ...

    def __get__(self, obj: object | None, cls: type | None = None) -> T | _Forward[T]:
        if obj is None:
            return self
        value: T = getattr(getattr(obj, self.owner), self.name)
        return value

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self.owner), self.name, value)


class ModestProtocol:
    """One node's MoDeST rounds over a `Transport` and a `PeerDirectory` (see `p2pnode.protocols.modest`).

    A `RoundProtocol`. `round` is the node's round estimate: the highest model version it has seen
    evidence of. `hooks` (`ProtocolHooks`) holds the attacker and the seams of the simulator and tests:
    ``hooks.on_aggregate``, when set, is called with an `AggregationEvent` after each aggregation this
    node completes (the simulator uses it to record rounds); ``hooks.secagg_silent_from``, when set, makes
    this node's next secure round go silent from that stage on (fault injection for the simulator and the
    tests). `counters` (exported by `snapshot`) counts protocol events:
    ``aggregations``, ``topups``, ``relaunches``, ``resends``, ``late``, ``aborted``, ``degraded_rounds``,
    ``base_pulls``, ``base_formed`` (version 0 formed from the initial model instead of pulled); with secure
    aggregation also ``secagg_rounds`` (completed), ``secagg_aborted`` (below
    the threshold: not applied), ``secagg_refused`` (claims of a sample that `candidate_order` does not
    support, or from a peer outside it), ``secagg_no_sample`` (a model without a sample naming this node),
    ``secagg_competing_claims`` (an instance opened beside another of the same group, from a claim with
    another member list), ``secagg_candidates_aborted`` (such an instance that aborted while another ran),
    and with groups spread over the aggregators ``secagg_remote_groups`` (group sums of other aggregators
    combined here).
    `secagg_randomness`: the secret randomness of
    this node's secagg users (default: the OS CSPRNG; the simulator passes a seeded stream).

    `secagg_identity`: this node's long-term Ed25519 key (default None). With it and an `authenticated`
    directory, the secure aggregation binds every member's ephemeral keys to its identity end to end:
    the node announces the public half in its directory record (`secagg_public_key`), learns the
    members' keys only from their own records, signs its advertised keys, and its users and its
    aggregator verify every member's signature, so an aggregator that relays keys cannot substitute
    them. A member whose key it does not know cannot take part (counter ``secagg_unknown_key``: one per
    such member each time this node sets up a sample as trainer or aggregator). Without the key or with
    unsigned records the binding is the transport's authenticated sender (`secagg_binding` says which).
    """

    settings = _Forward[ModestSettings]("core")
    transport = _Forward[Transport]("core")
    directory = _Forward[PeerDirectory]("core")
    trainer = _Forward[Trainer]("core")
    compute = _Forward[Compute]("core")
    rng = _Forward[random.Random]("core")
    round = _Forward[int]("core")
    me = _Forward[str]("core")
    server = _Forward[str | None]("core")
    view = _Forward[Any]("core")
    health = _Forward[Any]("core")
    counters = _Forward[Any]("core")
    suspicion = _Forward[Any]("core")
    keep_pre_merge = _Forward[bool]("core")

    def __init__(self, settings: ModestSettings, *, transport: Transport, directory: PeerDirectory,
                 trainer: Trainer, compute: Compute, rng: random.Random,
                 secagg_randomness: Randomness | None = None, attacker: Attacker | None = None,
                 secagg_identity: Ed25519PrivateKey | None = None) -> None:
        self.core = core = Core(settings, transport=transport, directory=directory, trainer=trainer,
                                compute=compute, rng=rng)
        self.hooks = hooks = ProtocolHooks(attacker=attacker)
        self.sampler = sampler = Sampler(core)
        # Secret randomness of this node's secagg users: the OS CSPRNG unless a seeded stream is given (the
        # simulator, for reproducible runs; never in a real run: the seed is public).
        randomness: Randomness = secagg_randomness if secagg_randomness is not None else SystemRandomness()
        self.identity_keys = identity = IdentityKeys(core, secagg_identity, read_directory=self._read_directory)
        self.membership = membership = Membership(core, offer=self._offer, learn_keys=identity.learn)
        self.trainer_role = TrainerRole(core, sampler, hooks, merge_view=membership.merge_view,
                                    receive_local=self._deliver_local, push_model=self._push_model,
                                    refresh_directory=self._read_directory)
        self.aggregator_role = AggregatorRole(core, sampler, hooks, offer=self._offer)
        self.spreader = Spread(core, send_sums=self._send_sums)
        self.secagg_host: SecAggHost | None = None
        self.secure_trainer: SecureTrainer | None = None
        self.secure_aggregator: SecureAggregator | None = None
        if settings.secagg is not None:
            if settings.secagg_groups > 1:
                check_groups(settings.rule, settings.rule_params, settings.secagg_groups, settings.sample_size,
                             settings.secagg.threshold, min_group=settings.secagg_min_group)
            else:
                check_rule_compatible(settings.rule)
            self.secagg_host = host = SecAggHost(transport)
            self.secure_trainer = SecureTrainer(core, sampler, hooks, host=host, identity=identity,
                                                 randomness=randomness, train=self.trainer_role.train,
                                                 deliver=self.trainer_role.deliver)
            self.secure_aggregator = SecureAggregator(core, host=host, identity=identity,
                                                      complete=self.aggregator_role.complete,
                                                      local_groups=self.spreader.local_groups,
                                                      exchange_groups=self.spreader.exchange)
            host.on_unopened = self.secure_aggregator.on_claim
            if identity.identity is None:
                logger.info("%s: secure aggregation binds keys to the transport's authenticated sender only (%s)",
                            core.me_short, "unsigned directory records" if secagg_identity is not None
                            else "no secagg identity key")
        transport.register(PING, peer_pb2.ModestPing, membership.on_ping)
        transport.register(MEMBERSHIP, peer_pb2.ModestAdvert, membership.on_membership)
        transport.register(MODEL, peer_pb2.ModestModel, self.trainer_role.on_model)
        transport.register(UPDATE, peer_pb2.ModestUpdate, self._on_update)
        transport.register(BASE, peer_pb2.ModestBaseRequest, self.aggregator_role.versions.on_base)
        transport.register(GROUP_SUMS, peer_pb2.ModestGroupSums, self._on_group_sums)

    # -- secagg identity keys --------------------------------------------------------------------------
    @property
    def secagg_binding(self) -> str:
        """How members' secagg keys are bound: ``identity`` (Ed25519, end to end), ``transport``, or ``off``."""
        return self.identity_keys.binding

    @property
    def secagg_public_key(self) -> bytes:
        """The raw Ed25519 public key this node announces in its record; empty without identity binding."""
        return self.identity_keys.public_key

    # -- the callbacks the roles are handed ------------------------------------------------------------
    def _offer(self, inc: Incoming) -> bool:
        """Take `inc` as the next model to train if it is newer than any accepted so far."""
        return self.trainer_role.offer(inc)

    async def _read_directory(self) -> None:
        await self.membership.refresh(force=True)

    async def _push_model(self, targets: Any, round_: int, state: State, outer: State, *, parent: bytes,
                          combined: int, sample_key: bytes = b"") -> list[str]:
        return await self.aggregator_role.push_model(targets, round_, state, outer, parent=parent, combined=combined,
                                                 sample_key=sample_key)

    async def _deliver_local(self, *args: Any, **kwargs: Any) -> peer_pb2.ModestAggAck:
        # Through `_receive_update`, looked up at each call: fault-injection tests wrap it on the instance.
        return await self._receive_update(*args, **kwargs)

    async def _receive_update(self, sender: str, round_: int, state: State, base_digest: bytes,
                              parent_digest: bytes, train_loss: float, *, secure: bool = False,
                              aggregators: tuple[str, ...] = (), base_sender: str = "") -> peer_pb2.ModestAggAck:
        """`AggregatorRole.receive_update`: add a trained model to aggregation ``round_ + 1`` and wait for it."""
        return await self.aggregator_role.receive_update(sender, round_, state, base_digest, parent_digest, train_loss,
                                                     secure=secure, aggregators=aggregators, base_sender=base_sender)

    async def _on_update(self, sender: str, msg: Message[Any]) -> Message[Any]:
        """A trained model (or, with secagg, its metadata) for this node as an aggregator."""
        c = self.core
        body: peer_pb2.ModestUpdate = msg.body
        check_run(c.settings, sender, body)
        check_round(body.round, body.round_estimate)
        secure = c.settings.secagg is not None
        check_update_body(body, msg.tensors, secure)
        model: State = {} if secure else split_model(msg.tensors, c.spec, c.settings, outer_allowed=False)[0]
        if not math.isfinite(body.train_loss):
            raise BadMessage("train_loss is not finite", code="non_finite")
        self.membership.merge_view(body.view, max(body.round_estimate, body.round))
        c.heard(sender, max(body.round_estimate, body.round))
        check_aggregators(body, c.settings)
        if len(body.base_sender) > MAX_PEER_ID:
            raise BadMessage("the update names an over-long base sender", code="oversized")
        result = await self._receive_update(sender, int(body.round), model, bytes(body.base_digest),
                                            bytes(body.parent_digest), float(body.train_loss), secure=secure,
                                            aggregators=tuple(body.aggregators), base_sender=body.base_sender)
        return Message(result)

    async def _send_sums(self, *args: Any) -> None:
        # Through `_send_group_sums`, looked up at each call: tests replace it to forge an aggregator's sums.
        await self._send_group_sums(*args)

    async def _send_group_sums(self, peer: str, index: int, base_digest: bytes, results: Mapping[int, SecAggResult],
                               left_out: Sequence[int]) -> None:
        """`Spread.send_group_sums`: send the sums of this aggregator's groups to the aggregator `peer`."""
        await self.spreader.send_group_sums(peer, index, base_digest, results, left_out)

    async def _on_group_sums(self, sender: str, msg: Message[Any]) -> Message[Any]:
        return await self.spreader.on_group_sums(sender, msg)

    # -- rounds -----------------------------------------------------------------------------------------
    async def run_round(self) -> RoundReport:
        """Wait for the next model (at most ``idle_timeout_s``), train it, upload it, and report.

        Returns after the aggregators acknowledged (or the uploads failed), after a newer model
        arrived, or, for a node that got no model, after the idle timeout. With `keep_pre_merge` the
        report carries the model that the round's first model load replaced (`RoundReport.pre_merge`).
        """
        c = self.core
        c.pre_merge, c.in_round = None, True
        try:
            report = await self._round()
        finally:
            c.in_round = False
        report.pre_merge, c.pre_merge = c.pre_merge, None
        return report

    async def _round(self) -> RoundReport:
        if not self.core.started:
            await self._start()
        inc = await self.trainer_role.next_model(self.core.settings.idle_timeout_s)
        if inc is None:
            await self.trainer_role.on_idle()
            return self.core.report("idle")
        return await self._train_and_upload(inc)

    async def _train_and_upload(self, inc: Incoming) -> RoundReport:
        if self.core.settings.secagg is not None:
            return await self._train_and_upload_secure(inc)
        return await self.trainer_role.train_and_upload(inc)

    async def _train_and_upload_secure(self, inc: Incoming) -> RoundReport:
        assert self.secure_trainer is not None
        return await self.secure_trainer.train_and_upload(inc)

    async def _start(self) -> None:
        """First round: bootstrap from the directory, or join a swarm already in progress."""
        await self.membership.start()

    async def rejoin(self) -> None:
        """Come back after being unresponsive: forget work in progress and announce a JOIN."""
        self.trainer_role.inbox = None
        self.core.watch = None
        if not self.core.started:
            await self._start()
            return
        await self.membership.advertise(JOIN)

    # -- the rest of RoundProtocol ----------------------------------------------------------------------
    @property
    def leave_on_close(self) -> bool:
        """Whether `close` announces a LEAVE (``ModestSettings.leave_on_close``)."""
        return self.core.settings.leave_on_close

    @leave_on_close.setter
    def leave_on_close(self, value: bool) -> None:
        self.core.settings.leave_on_close = value

    def snapshot(self) -> ProtocolSnapshot:
        """`counters` (see the class doc) and the suspicion scores of the trainers this node aggregated."""
        c = self.core
        return ProtocolSnapshot(counters=dict(c.counters), suspicion=c.suspicion.scores())

    def state_loaded(self) -> None:
        """Nothing to refresh: a MoDeST node serves the model versions it holds (`Core.bases`), not the trainer's
        model, and trains each round from the version it is sent."""

    async def close(self) -> None:
        """Answer waiting trainers with ``leaving``, stop background work, and announce a LEAVE."""
        c = self.core
        if c.closing:
            return
        c.closing = True
        for agg in c.aggregations.values():
            if agg.state != "done":
                agg.resolve(Result(False, "leaving"))
        tasks = [t for t in c.tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if c.settings.leave_on_close and c.started:
            try:
                await self.membership.advertise(LEAVE)
            except Exception as e:  # leaving must never fail a shutdown
                logger.warning("%s: could not announce the leave: %s", c.me_short, e)
        self.trainer_role.inbox = None
        c.bases.clear()


