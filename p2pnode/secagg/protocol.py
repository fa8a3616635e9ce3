"""Secure aggregation over the Transport seam: the host that serves the aggregator side, and the entry points.

One `SecAggHost` per node registers the four methods (``secagg.advertise``, ``secagg.share``,
``secagg.masked``, ``secagg.unmask``) on the node's transport and routes each request to the open
instance of its (run, round). A node opens an instance when it aggregates a round
(`SecAggHost.aggregate`); a trainer of the round runs a `SecAggUser`, which only makes calls. So the
same node can aggregate one round while it trains in another, and several aggregators of one round
(MoDeST with a > 1) run independent instances with fresh keys, as they must: otherwise two colluding
aggregators that saw different survivor sets could together learn both secrets of one user.

Instances are keyed by (run, round, group, session digest): the digest covers the member list and the
layout, so two claims of one round with different member lists are two instances, and a member that
claims a forged list first cannot take the round from the others (their claim opens its own instance;
the forged one finds too few users and aborts). Requests for an instance that is not open are answered
``unavailable`` while it may still open (users retry for `SecAggSettings.open_timeout_s`) and ``stale``
once it has finished. An aggregator that learns of a round from its users (MoDeST's aggregators are
driven by what trainers send) sets `SecAggHost.on_unopened`: it is called with the user's
`SessionClaim` (the members and the layout that user's advertisement carries) for an instance that is
not open yet, and may then check the claim and open the instance with `SecAggHost.aggregate`, while the
user retries.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from p2pnode.errors import BadMessage, TransportError
from p2pnode.proto import secagg_pb2
from p2pnode.secagg.aggregator import MaskedObserver, SecAggAggregator
from p2pnode.secagg.errors import SecAggError
from p2pnode.secagg.settings import MAX_USERS, SecAggSettings, Session, plan
from p2pnode.secagg.stages import STAGES, Stage, Status
from p2pnode.secagg.state import SecAggResult
from p2pnode.secagg.wire import REQUEST_TYPES, check_count
from p2pnode.transport.base import Transport
from p2pnode.transport.codec import Message

#: Finished (run, round) pairs remembered per host, to answer late messages ``stale``.
_FINISHED_MEMORY = 256


@dataclass(frozen=True)
class SessionClaim:
    """What a user's advertisement says about an instance the aggregator has not opened yet.

    Not trusted: the aggregator must check it (is it the sample of this round, is the sender in it,
    is ``dim`` the model's size) before opening a `Session` from it. `digest` is the session digest the
    user computed from it; users whose view differs compute another one and claim another instance.
    """

    run_id: str
    round: int
    sender: str
    users: tuple[str, ...]
    dim: int
    extras: int
    #: Opaque bytes the user attached for the caller's check (MoDeST: the sample's ordering key).
    context: bytes = b""
    #: The group of the round's sample that the instance aggregates (`Session.group`; default 0).
    group: int = 0
    #: The session digest the user computed (`Plan.digest`): which instance the claim is for.
    digest: bytes = b""


#: Largest `SessionClaim.context`, in bytes.
MAX_CONTEXT_BYTES = 64

#: An instance at its aggregator: (run, round, group, session digest).
_Key = tuple[str, int, int, bytes]


class SecAggHost:
    """Serves the secagg methods on `transport` and routes them to this node's open instances.

    :param transport: this node's transport; the host registers the four ``secagg.*`` methods on it
        (so create one host per transport).
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._open: dict[_Key, SecAggAggregator] = {}
        #: Finished instances -> whether each produced a sum.
        self._finished: collections.OrderedDict[_Key, bool] = collections.OrderedDict()
        #: Called with a `SessionClaim` when an advertisement arrives for an instance (run, round, group,
        #: digest) that is not open (not for finished ones); it must not block (start a task to open it).
        self.on_unopened: Callable[[SessionClaim], None] | None = None
        for stage in STAGES:
            transport.register(stage.method, REQUEST_TYPES[stage], functools.partial(self._serve, stage))

    def open(self, session: Session, settings: SecAggSettings, *, identity_keys: Mapping[str, bytes] | None = None,
             on_masked_input: MaskedObserver | None = None) -> SecAggAggregator:
        """Open the instance `session` with this node as its aggregator; run it with `SecAggAggregator.run`.

        Prefer `aggregate`, which also closes it. Raises `SecAggError` when this node is not the
        session's aggregator or the instance is already open here, `ConfigError` for bad settings.
        """
        if session.aggregator != self.transport.peer_id:
            raise SecAggError(f"session names {session.aggregator!r} as aggregator, not this node "
                              f"({self.transport.peer_id!r})")
        p = plan(session, settings)
        key = (session.run_id, session.round, session.group, p.digest)
        if key in self._open:
            raise SecAggError(f"a secagg instance for run {session.run_id!r} round {session.round} group "
                              f"{session.group} with these members is already open")
        agg = SecAggAggregator(p, identity_keys=identity_keys, on_masked_input=on_masked_input)
        self._open[key] = agg
        self._finished.pop(key, None)
        return agg

    def close(self, session: Session) -> None:
        """Forget the instance of `session`; later messages for it are answered ``stale``.

        Exception: once an instance has produced its sum, the unmask stage may have closed early (every
        secret had enough shares); a late unmask message of that instance is answered with
        ``accepted=0`` rather than refused, since its sender did nothing wrong.
        """
        agg = next((a for a in self._open.values() if a.plan.session == session), None)
        if agg is None:
            return
        key = (session.run_id, session.round, session.group, agg.plan.digest)
        del self._open[key]
        self._finished[key] = agg.state.status is Status.DONE
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    async def aggregate(self, session: Session, settings: SecAggSettings, *,
                        identity_keys: Mapping[str, bytes] | None = None,
                        on_masked_input: MaskedObserver | None = None) -> SecAggResult:
        """Run the instance `session` as its aggregator and return the sum.

        Raises `SecAggAborted` when too few users remain at some stage (nothing about any single input
        is revealed then), `ConfigError` for unusable settings.
        """
        agg = self.open(session, settings, identity_keys=identity_keys, on_masked_input=on_masked_input)
        try:
            return await agg.run()
        finally:
            self.close(session)

    async def dispatch(self, stage: Stage, sender: str, msg: Message[Any]) -> Message[Any]:
        """Handle a user's message of `stage` from `sender` (also the in-process path when a node is both
        a user and the aggregator of one instance)."""
        session = msg.body.session
        key = (session.run_id, session.round, session.group, bytes(session.digest))
        agg = self._open.get(key)
        if agg is None:
            if key in self._finished:
                if stage is Stage.UNMASK and self._finished[key]:
                    return Message(secagg_pb2.SecAggUnmaskReply(accepted=0))
                raise BadMessage(f"secagg {stage.label} message for run {session.run_id!r} round {session.round}, "
                                 f"whose instance has finished", code="stale")
            if stage is Stage.ADVERTISE and self.on_unopened is not None:
                body = msg.body
                check_count("members", body.members, MAX_USERS)
                if len(body.context) > MAX_CONTEXT_BYTES:
                    raise BadMessage(f"secagg advertise context: {len(body.context)} bytes, at most "
                                     f"{MAX_CONTEXT_BYTES} allowed", code="oversized")
                self.on_unopened(SessionClaim(session.run_id, session.round, sender, tuple(body.members),
                                              int(body.dim), int(body.extras), bytes(body.context),
                                              int(session.group), bytes(session.digest)))
                agg = self._open.get(key)
                if agg is not None:  # the claim opened it: serve this advertisement now, not on the retry
                    return await agg.handle(stage, sender, msg)
            raise TransportError(f"no secagg instance open here for run {session.run_id!r} round {session.round} "
                                 f"group {session.group} with this session digest (not yet, another member "
                                 f"list or settings, or this node does not aggregate it)", code="unavailable")
        return await agg.handle(stage, sender, msg)

    async def _serve(self, stage: Stage, sender: str, msg: Message[Any]) -> Message[Any]:
        return await self.dispatch(stage, sender, msg)
