"""Who is in the run: the membership view, JOIN/LEAVE advertisements, pings, and the directory.

Short-term membership travels with models and updates (each carries the sender's view,
`p2pnode.protocols.membership.View`); joins and leaves are advertised to ``join_fanout`` random peers
(the node's only RNG draws); the `PeerDirectory` holds the long-term membership that a newcomer
bootstraps from, and that an idle node reads again (`Membership.refresh`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from p2pnode.discovery import PeerInfo
from p2pnode.errors import BadMessage, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.membership import JOIN, LEAVE, Entry, from_proto, initial_view
from p2pnode.protocols.modest.sampling import candidate_order
from p2pnode.protocols.modest.state import Core, Incoming, initial_version, short
from p2pnode.protocols.modest.wire import MEMBERSHIP, check_round, check_run
from p2pnode.transport import Message

logger = logging.getLogger(__name__)


class Membership:
    """The node's membership work over its `Core`.

    Args:
        core: the node's shared state.
        offer: hands a model to the trainer role (the bootstrap sample's version 0); returns whether taken.
        learn_keys: takes the secagg identity keys of the directory records read.
    """

    def __init__(self, core: Core, *, offer: Callable[[Incoming], bool],
                 learn_keys: Callable[[Iterable[PeerInfo]], None]) -> None:
        self.core = core
        self.offer = offer
        self.learn_keys = learn_keys
        #: Loop time of the last directory read (rate-limits `refresh`).
        self.last_refresh = -float("inf")

    def merge_view(self, msg: peer_pb2.MembershipView, claimed_round: int) -> None:
        """Merge a view a peer sent (entries above `claimed_round` are refused); refute a forged entry of ours."""
        c = self.core
        entries = from_proto(msg, max_round=claimed_round)
        mine = entries.pop(c.me, None)
        if mine is not None and not c.closing and (
                mine.index > c.own_index or (mine.index == c.own_index and mine.status == LEAVE)):
            # Someone holds a newer entry for us (a forged or outdated LEAVE): refute it with a larger index.
            c.own_index = mine.index + 1
            c.view.set(c.me, Entry(c.round, c.own_index, JOIN))
        c.view.merge(entries)
        c.note_round(c.view.max_active_round())

    async def on_ping(self, sender: str, msg: Message[Any]) -> Message[Any]:
        c = self.core
        body: peer_pb2.ModestPing = msg.body
        check_run(c.settings, sender, body)
        check_round(body.round_estimate)
        c.heard(sender, body.round_estimate)
        return Message(peer_pb2.ModestPong(round_estimate=c.round, index=c.own_index, model_round=c.model_round))

    async def on_membership(self, sender: str, msg: Message[Any]) -> Message[Any]:
        c = self.core
        body: peer_pb2.ModestAdvert = msg.body
        check_run(c.settings, sender, body)
        check_round(body.round_estimate, body.index)
        if body.status == JOIN:
            c.note_round(body.round_estimate)
            c.view.receive_join(sender, Entry(c.round, body.index, JOIN))
            c.health.heard_from(sender, c.round)
            return Message(peer_pb2.ModestAdvertAck(round_estimate=c.round, view=c.view.to_proto()))
        if body.status == LEAVE:
            c.view.receive_leave(sender, Entry(c.round, body.index, LEAVE))
            return Message(peer_pb2.ModestAdvertAck(round_estimate=c.round))
        raise BadMessage(f"unknown membership status {body.status}", code="malformed")

    def fanout(self, population: int) -> int:
        """Peers told about a join or leave, out of `population`."""
        c = self.core
        if c.settings.join_fanout is not None:
            return min(c.settings.join_fanout, population)
        return min(10 * c.settings.sample_size, population)

    async def advertise(self, status: int) -> None:
        """Tell a random subset of the view about our join or leave; merge the views that come back."""
        c = self.core
        c.own_index += 1
        c.view.set(c.me, Entry(c.round, c.own_index, status))
        others = [p for p in c.view.joined() if p != c.me]
        targets = c.rng.sample(others, self.fanout(len(others)))
        body = peer_pb2.ModestAdvert(run_id=c.settings.run_id, config_hash=c.settings.config_hash,
                                     status=status, index=c.own_index,  # type: ignore[arg-type]
                                     round_estimate=c.round)

        async def tell(peer: str) -> None:
            try:
                resp = await c.transport.call(peer, MEMBERSHIP, Message(body), peer_pb2.ModestAdvertAck,
                                              timeout=c.settings.ping_timeout_s)
            except TransportError as e:
                logger.debug("%s: advert to %s failed: %s", c.me_short, short(peer), e)
                return
            if status == JOIN:
                try:
                    self.merge_view(resp.body.view, resp.body.round_estimate)
                except BadMessage as e:
                    c.transport.reject(peer, e.code, str(e))
                    return
                c.heard(peer, resp.body.round_estimate)

        await asyncio.gather(*(tell(p) for p in targets))

    async def refresh(self, *, force: bool = False) -> None:
        """Long-term membership: peers listed in the directory are alive; unknown ones join (pending)."""
        c = self.core
        now = c.now()
        if not force and now - self.last_refresh < c.settings.idle_timeout_s / 2:
            return
        self.last_refresh = now
        try:
            peers = await c.directory.peers()
        except Exception as e:  # a slow or stale directory must not stop the protocol: views carry on
            logger.warning("%s: peer directory unavailable: %s", c.me_short, e)
            return
        self.learn_keys(peers)
        for info in peers:
            if info.peer_id in c.view:
                c.view.heard_from(info.peer_id, c.round)
            else:
                c.view.receive_join(info.peer_id, Entry(c.round, 0, JOIN))

    async def start(self) -> None:
        """First round: bootstrap from the directory, or join a swarm already in progress."""
        c = self.core
        c.started = True
        try:
            peers = await c.directory.peers()
        except Exception as e:
            logger.warning("%s: peer directory unavailable at start: %s", c.me_short, e)
            peers = []
        self.learn_keys(peers)
        self.last_refresh = c.now()
        progress = max((p.round for p in peers), default=0)
        if progress > 0:
            c.note_round(progress)
            for p in peers:
                c.view.set(p.peer_id, Entry(p.round, 0, JOIN))
            await self.advertise(JOIN)
            if c.server is None and c.settings.fixed_aggregator_auto:
                c.server = min(c.view)
            logger.info("%s: joined a run at round %d with %d peers in view", c.me_short, c.round, len(c.view))
            return
        # Merge (not replace): handlers may have run before this node's first round.
        c.view.merge(initial_view(c.me, [p.peer_id for p in peers], round_=0,
                                  inactivity_threshold=c.settings.inactivity_threshold))
        if c.server is None and c.settings.fixed_aggregator_auto:
            c.server = min(c.view)
        # Bootstrap: the first s of the initial ordering train version 0, without pings.
        first = [p for p in candidate_order(c.view.active(0), 0) if p != c.server][:c.settings.sample_size]
        if c.me in first:
            # parent b"", combined 1; the bootstrap sample is the first s candidates, keyed by b"".
            self.offer(Incoming(0, initial_version(c), {}, c.me, sample=tuple(first)))
