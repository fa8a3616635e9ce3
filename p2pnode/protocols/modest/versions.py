"""Model versions between aggregators: serve the versions a node holds, pull the base it lacks.

An aggregator of version ``k+1`` combines models trained from version ``k`` (its *base*). When it does
not hold that version (it was not in sample ``k``), or holds another one, it pulls it (`ModestBaseRequest`
on `wire.BASE`) from the peers its trainers name as the version's sender, then from the contributors,
and checks the model against the digest the trainers trained from. With an outer optimizer the base's
momentum is held only where the version was built and where it was pulled to, so a base without it gets
it from those senders (``outer_only``); when none answers the outer step starts it afresh (counted
``outer_momentum_lost``). `Versions.message` encodes a held version so that the receiver gets exactly
the sender's tensors (same digest, same momentum).
"""

from __future__ import annotations

import logging
from typing import Any

from p2pnode.errors import BadMessage, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.base import State
from p2pnode.protocols.modest.sampling import model_digest
from p2pnode.protocols.modest.state import Aggregation, Base, Core, initial_version, short
from p2pnode.protocols.modest.wire import BASE, check_run, outer_tensors, split_model
from p2pnode.transport import Message
from p2pnode.transport.compression import compress_state_exact

logger = logging.getLogger(__name__)


class Versions:
    """Serves this node's model versions and pulls the ones it lacks.

    Args:
        core: the node's shared state (its held versions ``core.bases``, transport, counters).
    """

    def __init__(self, core: Core) -> None:
        self.core = core

    async def on_base(self, sender: str, msg: Message[Any]) -> Message[Any]:
        """Serve a model version this node holds (`ModestBaseRequest`) to an aggregator that lacks it."""
        c = self.core
        body: peer_pb2.ModestBaseRequest = msg.body
        check_run(c.settings, sender, body)
        base = c.bases.get(int(body.round))
        if base is None or (body.digest and bytes(body.digest) != base.digest) or (body.outer_only and not base.outer):
            return Message(peer_pb2.ModestBaseResponse(found=False, round=body.round))
        reply = peer_pb2.ModestBaseResponse(found=True, round=body.round)
        if body.outer_only:  # the puller holds the model: the momentum alone
            return self.message(reply, {}, base.outer)
        return self.message(reply, base.state, base.outer)

    def message(self, body: Any, state: State, outer: State) -> Message[Any]:
        """A message that carries a version this node holds (`state`) and its outer optimizer state, in the run's
        format for models where that decodes to the held tensors bit for bit (`compress_state_exact`).

        Every version of a lossy run is held as decoded (`complete`; version 0 from the start), so it
        re-encodes to the same values: a base pull, a top-up or a relaunch then travels compressed, the
        receiver holds exactly the sender's tensors (same digest, same momentum), and whatever would not
        survive the round trip travels raw.
        """
        c = self.core
        tensors = {**state, **outer_tensors(outer)}
        if not c.model_compression.lossy:
            return Message(body, tensors)
        return Message(body, compressed=compress_state_exact(tensors, c.model_compression))

    async def get_base(self, agg: Aggregation) -> Base | None:
        """Model ``index - 1`` (the contributors' start), from this node or pulled from a peer that holds it.

        With an outer optimizer the base's momentum is held only where the version was built (its
        aggregators) and where it was pulled to; trainers hold the model alone. So the pull asks the
        peers the trainers name as their version's sender first (model and momentum), then the
        contributors (model); a base held or pulled without its momentum gets it from those senders
        (`outer_only`). When none of them answers, the outer step starts its momentum afresh from this
        version (counted ``outer_momentum_lost``).
        """
        c = self.core
        k = agg.index - 1
        digest = agg.base_digest()
        base = c.bases.get(k)
        if base is not None and (base.digest == digest or not agg.models):
            # (no models: an aborted secure aggregation whose trainers all vanished)
            await self.ensure_outer(agg, base)
            return base
        if k == 0 and base is None:
            # Version 0 is the run's common initial model: this node may form it as the first sample did
            # (`initial_version`), if its own model is still that one. Taken only when its digest is the one the
            # trainers name, so a node that has trained since (or started from another model) pulls it.
            local = {n: t.detach().clone() for n, t in initial_version(c).items()}
            if model_digest(local) == digest:
                base = Base(0, digest, local, {}, b"", 1)
                c.bases[0] = base
                c.counters["base_formed"] += 1
                return base
        senders = [p for p in agg.base_senders(digest) if p != c.me]
        contributors = [p for p in sorted(agg.models)
                        if p != c.me and agg.models[p].base_digest == digest and p not in senders]
        for peer in senders + contributors:
            got = await self.pull(peer, k, digest)
            if got is None:
                continue
            model, outer = got
            base = Base(k, digest, model, outer, agg.parent_digest(), 1, sender=peer)
            c.bases[k] = base
            c.counters["base_pulls"] += 1
            await self.ensure_outer(agg, base)
            return base
        return None

    def needs_outer(self, base: Base) -> bool:
        """Whether the outer step from `base` lacks the momentum it should have (version 0 has none yet)."""
        return self.core.settings.outer_lr is not None and base.round >= 1 and not base.outer

    async def ensure_outer(self, agg: Aggregation, base: Base) -> None:
        """Give `base` its outer momentum (pulled from the peers that sent the version), if it lacks it."""
        c = self.core
        if not self.needs_outer(base):
            return
        for peer in [p for p in agg.base_senders(base.digest) if p != c.me]:
            got = await self.pull(peer, base.round, base.digest, outer_only=True)
            if got is not None:
                base.outer = got[1]
                c.counters["outer_pulls"] += 1
                return
        c.counters["outer_momentum_lost"] += 1
        logger.warning("%s: no peer sent the outer momentum of version %d; aggregation %d starts it afresh",
                       c.me_short, base.round, agg.index)

    async def pull(self, peer: str, k: int, digest: bytes, *, outer_only: bool = False) -> tuple[State, State] | None:
        """Ask `peer` for version `k` (`digest`), or only its momentum (`outer_only`); None when it has not
        got it, does not answer or sends something malformed (refused and counted)."""
        c = self.core
        s = c.settings
        req = peer_pb2.ModestBaseRequest(run_id=s.run_id, config_hash=s.config_hash, round=k, digest=digest,
                                         outer_only=outer_only)
        try:
            resp = await c.transport.call(peer, BASE, Message(req), peer_pb2.ModestBaseResponse,
                                          timeout=s.exchange_timeout_s)
        except BadMessage as e:  # a response that does not decode: `call` counted it under its reason
            logger.info("%s: base pull from %s refused: %s", c.me_short, short(peer), e)
            return None
        except TransportError as e:
            logger.info("%s: base pull from %s failed: %s", c.me_short, short(peer), e)
            return None
        if not resp.body.found:
            return None
        try:
            model, outer = split_model(resp.tensors, c.spec, c.settings, outer_allowed=True, outer_only=outer_only)
            if not outer_only and model_digest(model) != digest:
                raise BadMessage(f"base model of round {k} does not match its digest", code="bad_shape")
        except BadMessage as e:
            c.transport.reject(peer, e.code, str(e))
            return None
        return model, outer
