"""The trainer role: receive a model version, train it, send it to the aggregators of the next one.

Nodes are reactive: a node only works when a model reaches it (`TrainerRole.on_model` puts it in the
inbox, newest wins). It trains ``local_steps``, uploads the trained model to the aggregators of the next
version (resending to the next live candidate after a failure, at most ``max_resends`` times), and
waits for an acknowledgement while the aggregator answers pings.

*Relaunch* (our addition, where the spec leaves the swarm stuck): a trainer whose update went into
version ``k+1`` watches the sample of ``k+1``; if none of its members answers pings, the first live
contributor (lowest peer id) sends version ``k`` again, as version ``k+1``, to a fresh sample.

With secure aggregation the upload is wrapped by `p2pnode.protocols.modest.secure`, which reuses
`TrainerRole.train` and `TrainerRole.deliver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from p2pnode.errors import TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.base import ProtocolHooks, RoundReport, State
from p2pnode.protocols.modest.sampling import Sampler, model_digest
from p2pnode.protocols.modest.state import Base, Core, Incoming, Watch, decoded, short
from p2pnode.protocols.modest.wire import UPDATE, check_round, check_run, check_sample, split_model
from p2pnode.transport import Message

logger = logging.getLogger(__name__)


class ReceiveUpdate(Protocol):
    """The aggregator's intake of an update (`AggregatorRole.receive_update`)."""

    def __call__(self, sender: str, round_: int, state: State, base_digest: bytes, parent_digest: bytes,
                 train_loss: float, *, secure: bool = False, aggregators: tuple[str, ...] = (),
                 base_sender: str = "") -> Awaitable[peer_pb2.ModestAggAck]: ...


class PushModel(Protocol):
    """The model send of `AggregatorRole.push_model`."""

    def __call__(self, targets: Sequence[str], round_: int, state: State, outer: State, *, parent: bytes,
                 combined: int, sample_key: bytes = b"") -> Awaitable[list[str]]: ...


class TrainerRole:
    """One node's trainer role.

    Args:
        core: the node's shared state.
        sampler: pings and candidate selection.
        hooks: the attacker and the ``on_trained`` hook (read at each use).
        merge_view: merges the view a message carries (`Membership.merge_view`).
        receive_local: hands an update to this node's own aggregator role (when it aggregates its own round).
        push_model: sends a model version to a sample (relaunch).
        refresh_directory: reads the directory now (idle rounds).
    """

    def __init__(self, core: Core, sampler: Sampler, hooks: ProtocolHooks, *,
                 merge_view: Callable[[peer_pb2.MembershipView, int], None], receive_local: ReceiveUpdate,
                 push_model: PushModel, refresh_directory: Callable[[], Awaitable[None]]) -> None:
        self.core = core
        self.sampler = sampler
        self.hooks = hooks
        self.merge_view = merge_view
        self.receive_local = receive_local
        self.push_model = push_model
        self.refresh_directory = refresh_directory
        #: The next model to train (the newest accepted), and its signal.
        self.inbox: Incoming | None = None
        self.wake = asyncio.Event()

    def offer(self, inc: Incoming) -> bool:
        """Take `inc` as the next model to train if it is newer than any accepted so far."""
        c = self.core
        if c.closing or inc.round <= c.accepted_round:
            return False
        c.accepted_round = inc.round
        self.inbox = inc
        c.note_round(inc.round)
        if c.watch is not None and inc.round >= c.watch.index:
            c.watch = None
        self.wake.set()
        return True

    async def next_model(self, timeout: float) -> Incoming | None:
        """The model to train next, waiting at most `timeout` seconds for one (None: none came)."""
        if self.inbox is None:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                return None
        inc, self.inbox = self.inbox, None
        return inc

    async def on_model(self, sender: str, msg: Message[Any]) -> Message[Any]:
        """A model version (`ModestModel`) sent to this node, as a member of its sample."""
        c = self.core
        body: peer_pb2.ModestModel = msg.body
        check_run(c.settings, sender, body)
        check_round(body.round, body.round_estimate)
        model, outer = split_model(msg.tensors, c.spec, c.settings, outer_allowed=True)
        check_sample(body)
        self.merge_view(body.view, max(body.round_estimate, body.round))
        c.heard(sender, max(body.round_estimate, body.round))
        c.know(int(body.round) - 1, bytes(body.parent_digest))
        accepted = self.offer(Incoming(int(body.round), model, outer, sender, bytes(body.parent_digest),
                                       max(1, int(body.combined)), tuple(body.sample), bytes(body.sample_key)))
        return Message(peer_pb2.ModestModelAck(accepted=accepted, round_estimate=c.round))

    async def train(self, inc: Incoming) -> tuple[float, State]:
        """Train version ``k = inc.round`` for its local steps (``local_steps``, or the warm-up's during the
        synchronisation warm-up); return (mean loss, trained state)."""
        c = self.core
        s = c.settings
        schedule = s.schedule
        steps = schedule.steps(inc.round)

        def work() -> tuple[float, State]:
            # Load and train in one job: nothing (an aggregator's evaluation) may swap the model between.
            c.load_model(inc.state)
            # Version k starts at the swarm's local step `start_step(k)` (k * H without a warm-up), whatever
            # this node trained before: the inner learning-rate schedule follows the versions, not the node's
            # own (lagging) step count.
            c.trainer.align_schedule(schedule.start_step(inc.round))
            loss = c.trainer.train(steps)
            return loss, c.trainer.state()

        result = await c.compute.run(work, cost_s=s.step_cost_s * steps)
        c.model_round = max(c.model_round, inc.round)
        c.held_combined = inc.combined
        return result

    async def train_and_upload(self, inc: Incoming) -> RoundReport:
        """Train version ``k = inc.round`` and send the trained model to the aggregators of ``k + 1``."""
        c = self.core
        k = inc.round
        loss, trained = await self.train(inc)
        base_digest = model_digest(inc.state)
        sender = inc.sender if inc.sender != c.me else ""
        c.bases[k] = Base(k, base_digest, inc.state, inc.outer, inc.parent, inc.combined, sender)
        c.prune_bases()
        if c.accepted_round > k or c.closing:
            c.counters["aborted"] += 1  # a newer model arrived while training: this work is stale
            return c.report("aborted", train_loss=loss)
        if not math.isfinite(loss):
            logger.warning("%s: training diverged in round %d (loss %s); not uploading", c.me_short, k, loss)
            return c.report("diverged", train_loss=loss)
        if self.hooks.on_trained is not None:
            self.hooks.on_trained(k, inc.state, trained)
        if self.hooks.attacker is not None and self.hooks.attacker.model_attack:
            trained = await self.hooks.attacker.forge(k, inc.state, trained)
        acks = await self.upload(k, trained, loss, base_digest, inc.parent, base=inc.state, base_sender=sender)
        ok = [a for a in acks if a is not None and a[1].success]
        return c.report("trainer", train_loss=loss, failures=len(acks) - len(ok), partner=ok[0][0] if ok else None)

    async def upload(self, k: int, state: State, loss: float, base_digest: bytes, parent_digest: bytes, *,
                     base: State | None = None, base_sender: str = ""
                     ) -> list[tuple[str, peer_pb2.ModestAggAck] | None]:
        """Send the model trained from version `k` to the aggregators of ``k + 1``; resend on failure.

        Under a lossy run compression (`Core.upload_updates`) what travels is the update ``state - base``
        (`base`: version `k` as this node holds it, the bytes the aggregator holds too), compressed with
        this node's error feedback: what this round's compression leaves out goes into the next upload.
        `base_sender`: the peer that sent version `k` (with an outer optimizer the aggregators pull the
        version's momentum from it).
        """
        c = self.core
        s = c.settings
        c.view.flush_pending()  # a model send: pending joins enter the view that travels with it
        index = k + 1
        key = c.key(index, parent_digest)
        body = peer_pb2.ModestUpdate(run_id=s.run_id, config_hash=s.config_hash, round=k, round_estimate=c.round,
                                     view=c.view.to_proto(), base_digest=base_digest, train_loss=loss,
                                     examples=c.trainer.num_examples, parent_digest=parent_digest,
                                     base_sender=base_sender if s.outer_lr is not None else "")
        if c.upload_updates and base is not None:
            update = {n: state[n] - base[n] for n in state}
            msg = Message(body, compressed=c.feedback.compress(update))
        else:
            msg = Message(body, state)
        if c.server is not None:
            first = [c.server]
        else:
            first = await self.sampler.available(index, s.aggregators, key)
        tried = set(first)
        return list(await asyncio.gather(*(self.deliver(agg, msg, k, key, tried) for agg in first)))

    async def deliver(self, agg: str, msg: Message[peer_pb2.ModestUpdate], k: int, key: bytes, tried: set[str],
                      *, resend: bool = True) -> tuple[str, peer_pb2.ModestAggAck] | None:
        """Send the update `msg` to `agg` and, on failure (with `resend`), to the next live candidates.

        Returns:
            (aggregator, acknowledgement), or None when no aggregator took it (or this node moved on).
        """
        c = self.core
        resends = 0
        while True:
            ack = await self.send_update(agg, msg, k)
            if ack is not None and (ack.success or ack.reason == "late"):
                c.note_round(int(ack.round) + (1 if ack.success else 0))
                if ack.success and c.server is None:  # in fl the server watches its own samples
                    c.watch = Watch(index=k + 1, base_round=k, sample=list(ack.sample),
                                    contributors=list(ack.contributors), since=c.now())
                    c.prune_bases()
                return agg, ack
            if c.accepted_round > k or c.closing:
                return None  # a newer model is here: stop waiting (this aggregator is not at fault)
            if ack is None:
                c.health.failed(agg, k + 1)
            if c.server is not None:
                return None
            if not resend:
                return (agg, ack) if ack is not None else None
            if resends >= c.settings.max_resends:
                return None
            resends += 1
            c.counters["resends"] += 1
            nxt = await self.sampler.available(k + 1, 1, key, exclude=tried)
            if not nxt:
                return None
            agg = nxt[0]
            tried.add(agg)

    async def send_update(self, agg: str, msg: Message[peer_pb2.ModestUpdate], k: int
                          ) -> peer_pb2.ModestAggAck | None:
        """Upload to one aggregator and wait for its acknowledgement; None when it is gone or we moved on."""
        c = self.core
        body = msg.body
        if agg == c.me:
            # What a remote aggregator would decode (a compressed upload carries no plain tensors).
            tensors = {**msg.tensors, **decoded(msg.compressed)}
            return await self.receive_local(c.me, k, tensors, bytes(body.base_digest),
                                            bytes(body.parent_digest), body.train_loss, secure=body.secure,
                                            aggregators=tuple(body.aggregators), base_sender=body.base_sender)
        call = asyncio.get_running_loop().create_task(
            c.transport.call(agg, UPDATE, msg, peer_pb2.ModestAggAck, timeout=c.settings.ack_timeout_s))
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=c.settings.ping_timeout_s)
                if call in done:
                    try:
                        resp = call.result()
                    except TransportError as e:
                        logger.info("%s: upload of round %d to %s failed: %s", c.me_short, k, short(agg), e)
                        return None
                    c.heard(agg, resp.body.round_estimate)
                    return resp.body
                if c.accepted_round > k or c.closing:
                    return None
                # Liveness: an aggregator that stops answering pings has crashed; do not wait it out.
                if await self.sampler.ping(agg, k + 1) is None:
                    logger.info("%s: aggregator %s stopped answering during round %d", c.me_short, short(agg), k)
                    return None
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await call

    # -- idle work: watching for a lost sample, directory refresh ------------------------------------
    async def on_idle(self) -> None:
        """A round without a model: read the directory, and check the watched sample."""
        c = self.core
        await self.refresh_directory()
        if c.watch is not None:
            await self.check_watch()

    async def check_watch(self) -> None:
        """Relaunch the watched version when its whole sample stopped answering (see `Watch`)."""
        c = self.core
        w = c.watch
        if w is None:
            return
        if c.round > w.index or c.accepted_round >= w.index:
            c.watch = None  # the swarm moved on
            c.prune_bases()
            return
        if c.now() - w.since < c.settings.idle_timeout_s:
            return
        # One answer is enough (alive, or already further): ping the sample one member at a time.
        for peer in [p for p in w.sample if p != c.me]:
            pong = await self.sampler.ping(peer, w.index)
            if c.watch is not w:
                return
            if c.round > w.index:
                c.watch = None
                c.prune_bases()
                return
            if pong is not None:
                w.since = c.now()  # the sample is alive and working
                return
        # Nobody of the sample answers: the first live contributor (lowest peer id) relaunches.
        earlier = [q for q in sorted(w.contributors) if q < c.me and q != c.server]
        if earlier and any(p is not None for p in await asyncio.gather(*(self.sampler.ping(q, w.index)
                                                                         for q in earlier))):
            w.since = c.now()
            return
        if c.watch is w:
            await self.relaunch(w)

    async def relaunch(self, w: Watch) -> None:
        """Send the watched base version again, as version ``w.index``, to a fresh sample."""
        c = self.core
        base = c.bases.get(w.base_round)
        if base is None:
            c.watch = None
            return
        c.counters["relaunches"] += 1
        c.view.flush_pending()
        key = c.key(w.index, base.parent)
        sample = await self.sampler.available(w.index, c.settings.sample_size, key, exclude=c.exclude(w.sample))
        accepted = await self.push_model(sample, w.index, base.state, base.outer, parent=base.digest,
                                         combined=base.combined, sample_key=key)
        logger.warning("%s: the sample of version %d stopped answering; sent version %d again as %d to %d peers",
                       c.me_short, w.index, w.base_round, w.index, len(accepted))
        w.sample, w.since = accepted, c.now()
