"""The aggregator role: collect trained models of a version, combine them, send the result on.

An aggregator of version ``k+1`` waits for ``floor(sf * s)`` models trained from version ``k`` (capped
by the trainers it knows of) or for a deadline ``aggregation_timeout_s`` after the first, combines them
with the run's rule (`p2pnode.protocols.modest.combine`), sends version ``k+1`` to the next sample and
acknowledges the trainers. A model that arrives after completion is ``late``.

*Top-up* (our addition): an aggregator whose deadline passes with fewer than ``liveness_min`` models
fetches the base model from a contributor and sends it to fresh live candidates, at most
``max_topups`` times; then it aggregates what it has rather than drop the round (a dropped round
leaves no one with a newer model, and training would stop for good). Fetching a base this node lacks,
and serving the versions it holds, is `p2pnode.protocols.modest.versions`.

With secure aggregation, `p2pnode.protocols.modest.secure` drives `AggregatorRole.complete` with the
secure result instead of the models in the clear.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from p2pnode.errors import AggregationError, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.base import ProtocolHooks, State
from p2pnode.protocols.modest.combine import combine, combine_groups, combine_secure
from p2pnode.protocols.modest.sampling import Sampler, model_digest
from p2pnode.protocols.modest.state import (
    Aggregation,
    AggregationEvent,
    Base,
    Core,
    Incoming,
    Result,
    Upload,
    Watch,
    decoded,
    short,
)
from p2pnode.protocols.modest.versions import Versions
from p2pnode.protocols.modest.wire import MODEL, OUTER_PREFIX, outer_tensors
from p2pnode.secagg import SecAggResult
from p2pnode.transport import Message
from p2pnode.transport.compression import CompressedTensor, compress_state, decompress

logger = logging.getLogger(__name__)


class AggregatorRole:
    """One node's aggregator role (it runs in the background, driven by the uploads it receives).

    Args:
        core: the node's shared state.
        sampler: pings and candidate selection (the next sample, top-up recruits).
        hooks: ``on_aggregate`` (read at each completion).
        offer: hands a model version to this node's trainer role (when it is in the next sample).
    """

    def __init__(self, core: Core, sampler: Sampler, hooks: ProtocolHooks, *,
                 offer: Callable[[Incoming], bool]) -> None:
        self.core = core
        self.sampler = sampler
        self.hooks = hooks
        self.offer = offer
        #: Serves held versions to other aggregators and pulls the bases this node lacks.
        self.versions = Versions(core)

    async def receive_update(self, sender: str, round_: int, state: State, base_digest: bytes,
                             parent_digest: bytes, train_loss: float, *, secure: bool = False,
                             aggregators: tuple[str, ...] = (), base_sender: str = "") -> peer_pb2.ModestAggAck:
        """Add a trained model to aggregation ``round_ + 1`` and wait until that aggregation ends.

        `secure`: the update's metadata only (its model travels masked in the secure instance of that
        aggregation, which a claim must have opened). `base_sender`: who sent the trainer its base (DiLoCo:
        the holder of the base's momentum).
        """
        c = self.core
        index = round_ + 1

        def ack(success: bool, reason: str, result: Result | None = None) -> peer_pb2.ModestAggAck:
            return peer_pb2.ModestAggAck(round=round_, success=success, reason=reason, round_estimate=c.round,
                                         contributors=result.contributors if result else [],
                                         sample=result.sample if result else [])

        if c.closing:
            return ack(False, "leaving")
        agg = c.aggregations.get(index)
        if index <= c.completed_index or (agg is not None and agg.state != "open"):
            c.counters["late"] += 1
            return ack(False, "late")  # the index is complete: late models are ignored
        if secure:
            if agg is None or sender not in agg.secure_users():
                return ack(False, "refused")  # no secure instance here that this trainer belongs to
            agg.models.setdefault(sender, Upload({}, base_digest, parent_digest, train_loss, aggregators,
                                                 base_sender))
            agg.arrived.set()
            result = await asyncio.shield(agg.future)
            ok = result.success and sender in result.contributors
            # Completed without this trainer's input (it came after the quorum): "late", as in plain rounds.
            late = result.success and not ok and result.reason != "aborted"
            return ack(ok, "late" if late else result.reason, result)
        if agg is None:
            agg = Aggregation(index)
            c.aggregations[index] = agg
            agg.timer = c.spawn(self.deadline(agg))
        if sender not in agg.models:  # one model per sender: the first one counts
            agg.models[sender] = Upload(state, base_digest, parent_digest, train_loss, base_sender=base_sender)
        if len(agg.models) >= c.threshold() and agg.state == "open":
            c.spawn(self.complete(agg))
        result = await asyncio.shield(agg.future)
        if result.success and sender in result.contributors:
            return ack(True, result.reason, result)
        return ack(False, result.reason if not result.success else "late", result)

    async def deadline(self, agg: Aggregation) -> None:
        """At each deadline: complete with what came (at least ``liveness_min``), else top up, else degrade."""
        c = self.core
        s = c.settings
        while agg.state == "open":
            await asyncio.sleep(s.aggregation_timeout_s)
            if agg.state != "open":
                return
            n = len(agg.models)
            if n >= min(s.liveness_min, c.threshold()):
                await self.complete(agg)
                return
            if agg.topups < s.max_topups and await self.topup(agg):
                continue
            if agg.state == "open":
                logger.warning("%s: aggregation %d ends with %d model(s), below liveness_min=%d",
                               c.me_short, agg.index, n, s.liveness_min)
                await self.complete(agg, degraded=True)
            return

    async def next_aggregators(self, index: int, parent: bytes) -> list[str]:
        """The aggregators of ``index + 1``, as its trainers will find them, to put first in version `index`'s
        sample (`parent`: the digest of version ``index - 1``, which keys round ``index + 1``).

        Where the aggregators need the base (`Core.needs_base`: uploads of ``model - base`` under a lossy
        format, an outer optimizer, rules on updates), one that was not sent version `index` pulls it
        (``modest.base``, a whole model). Sent the version as trainers, they hold it; the rest of the sample
        is drawn as before. Trainers find the aggregators of ``index + 1`` by the same rule as always (the
        first responsive peers of round ``index + 1``'s order), so nothing on the wire changes, and a peer
        that finds other ones (another view, a peer that stopped answering) still gets the base by a pull.
        Not with secure aggregation (its sample is checked against the candidate order, `WRONG_SAMPLE`) nor
        with a fixed aggregator. Empty where not applied.
        """
        c = self.core
        s = c.settings
        if not c.needs_base or s.secagg is not None or c.server is not None:
            return []
        return await self.sampler.available(index + 1, min(s.aggregators, s.sample_size), c.key(index + 1, parent),
                                            exclude=c.exclude())

    async def sample_with_next_aggregators(self, index: int, parent: bytes, key: bytes) -> list[str]:
        """Version `index`'s sample: the aggregators of ``index + 1`` first (`next_aggregators`), then the
        first responsive candidates of round `index` under `key`, ``sample_size`` peers in all.

        Both lookups ping at once, so that finding the next aggregators adds no ping round trip to the
        version's critical path; the sample's lookup asks for a whole sample and the next aggregators are
        taken out of it. Spread groups: every aggregator of the version sends the sample in candidate order,
        so that its members derive the same groups whichever aggregator's copy reaches them first.
        """
        c = self.core
        s = c.settings
        holders, candidates = await asyncio.gather(
            self.next_aggregators(index, parent),
            self.sampler.available(index, s.sample_size, key, exclude=c.exclude(), ordered=c.spread))
        taken = set(holders)
        return holders + [p for p in candidates if p not in taken][:s.sample_size - len(holders)]

    async def topup(self, agg: Aggregation) -> bool:
        """Send the base model to fresh live candidates so that more trained models arrive."""
        c = self.core
        agg.topups += 1
        c.counters["topups"] += 1
        base = await self.versions.get_base(agg)
        if base is None or agg.state != "open":
            return False
        need = c.threshold() - len(agg.models)
        recruits = await self.sampler.available(agg.index, need, c.key(agg.index, agg.parent_digest()),
                                                exclude=c.exclude(agg.models))
        accepted = await self.push_model(recruits, base.round, base.state, base.outer,
                                         parent=agg.parent_digest(), combined=base.combined)
        logger.info("%s: aggregation %d had %d model(s) at its deadline; sent version %d to %d more peers",
                    c.me_short, agg.index, len(agg.models), base.round, len(accepted))
        return bool(accepted)

    async def complete(self, agg: Aggregation, *, degraded: bool = False, secure: SecAggResult | None = None,
                       aborted: str | None = None, groups: Mapping[int, SecAggResult] | None = None) -> None:
        """Aggregate, send the new model to the next sample, acknowledge the trainers: once per index.

        `secure`: the result of the secure aggregation (its survivors are the contributors). `aborted`:
        the secure aggregation was aborted for this reason; the new version is the base unchanged (no
        update is applied), so that the swarm goes on. `groups`: the results of the secure groups that
        completed, by group (their survivors are the contributors; the rule combines the group means).
        """
        c = self.core
        if agg.state != "open":
            return
        agg.state = "completing"
        s = c.settings
        received = sorted(agg.models) if secure is None and aborted is None and groups is None else []
        ignored: list[str] = []
        if secure is not None:
            contributors = list(secure.survivors)
        elif groups is not None:
            contributors = sorted({u for r in groups.values() for u in r.survivors})
        elif aborted is not None:
            contributors = []
        else:
            contributors = received
            if s.exclude_suspects:
                # Samples must stay the same on every node, so suspects are not dropped from them: this
                # aggregator only leaves their models out (and keeps scoring them, so a peer can recover).
                suspects = c.suspicion.suspects(s.suspect_threshold)
                kept = [p for p in received if p not in suspects]
                if kept:
                    contributors, ignored = kept, [p for p in received if p in suspects]
        try:
            base = await self.versions.get_base(agg) if c.needs_base else None
            if c.needs_base and base is None:
                raise AggregationError(f"no contributor could send the base model of round {agg.index - 1}")
            if secure is not None:
                assert base is not None
                sec, base_ = secure, base
                new_state, outer_state, rule = await c.compute.run(
                    lambda: combine_secure(sec, base_, c.settings, c.layout))
            elif groups is not None:
                assert base is not None
                parts, base_ = list(groups.values()), base
                new_state, outer_state, rule = await c.compute.run(
                    lambda: combine_groups(parts, base_, c.settings, c.layout))
            elif aborted is not None:
                assert base is not None
                new_state, outer_state, rule = base.state, base.outer, "none"
            else:
                if c.upload_updates:
                    assert base is not None
                    contributors, received = self.models_from_updates(agg, base, contributors, received)
                states = [agg.models[p].state for p in contributors]
                new_state, outer_state, rule = await c.compute.run(
                    lambda: combine(states, base, c.settings, label=c.me_short))
                self.score(agg, received, new_state, base)
        except Exception as e:
            logger.error("%s: aggregation %d failed: %s", c.me_short, agg.index, e)
            agg.resolve(Result(False, "dropped"))
            return
        wire: dict[str, CompressedTensor] | None = None
        if c.model_compression.lossy and aborted is None:
            # Every holder of the version keeps it as decoded, so that its digest (the sample key, base pulls
            # and the trainers' updates relative to it) is the same everywhere. The outer optimizer's momentum
            # stays here (the next aggregators pull it), kept as decoded from the same format, so that a pull
            # carries it compressed and every puller holds these very bits (`Versions.message`).
            wire = compress_state(new_state, c.model_compression)
            new_state = decoded(wire)
            if outer_state:
                outer_wire = compress_state(outer_tensors(outer_state), c.model_compression)
                outer_state = {k: decompress(outer_wire[OUTER_PREFIX + k]).reshape(v.shape)
                               for k, v in outer_state.items()}
        index = agg.index
        parent = agg.base_digest()
        grandparent = agg.parent_digest()
        c.completed_index = max(c.completed_index, index)
        c.note_round(index)
        c.bases[index] = Base(index, model_digest(new_state), new_state, outer_state, parent, len(contributors))
        c.know(index, c.bases[index].digest)
        c.know(index - 1, parent)
        for other in list(c.aggregations.values()):
            if other.index < index and other.state == "open":
                other.resolve(Result(False, "late"))
        c.view.flush_pending()  # a model send: pending joins enter the view
        key = c.key(index, grandparent)
        sample = await self.sample_with_next_aggregators(index, parent, key)
        accepted = await self.push_model(sample, index, new_state, outer_state, parent=parent,
                                         combined=max(1, len(contributors)), sample_key=key, wire=wire)
        result = Result(True, "aborted" if aborted is not None else "aggregated", contributors, accepted)
        agg.resolve(result)
        for i in [i for i in c.aggregations if i <= index - 2]:
            del c.aggregations[i]
        c.prune_bases()
        if c.server == c.me:
            # The server watches its own sample: if all of it disappears, it sends the model again.
            c.watch = Watch(index=index, base_round=index, sample=accepted, contributors=[c.me], since=c.now())
        accuracy = test_loss = None
        if s.eval_every and index % s.eval_every == 0:
            def evaluate() -> tuple[float, float]:
                c.load_model(new_state)
                return c.trainer.evaluate()

            test_loss, accuracy = await c.compute.run(evaluate)
            c.model_round = max(c.model_round, index)
        losses = [agg.models[p].train_loss for p in contributors if p in agg.models]
        if degraded:
            c.counters["degraded_rounds"] += 1
        event = AggregationEvent(index=index, aggregator=c.me, contributors=contributors, sample=accepted,
                                 train_loss=sum(losses) / len(losses) if losses else None, accuracy=accuracy,
                                 test_loss=test_loss, time_s=c.now(), degraded=degraded, topups=agg.topups,
                                 rule=rule, secure=c.settings.secagg is not None,
                                 dropped=sorted(agg.secure_users() - set(contributors)), aborted=aborted,
                                 state=new_state,
                                 ignored=ignored)
        if aborted is None:
            c.counters["aggregations"] += 1
        c.events.append(event)
        # `accuracy` holds the task's metric (Trainer.metric): accuracy, or perplexity for a language model.
        metric = getattr(c.trainer, "metric", "accuracy")
        label = "acc" if metric == "accuracy" else metric
        shown = "-" if accuracy is None else f"{accuracy:.3f}" if metric == "accuracy" else f"{accuracy:.4g}"
        logger.info("%s: aggregated version %d from %d model(s) by %s; %s=%s; sent to %d peers", c.me_short,
                    index, len(contributors), rule, label, shown, len(accepted))
        if self.hooks.on_aggregate is not None:
            self.hooks.on_aggregate(event)

    def models_from_updates(self, agg: Aggregation, base: Base, contributors: list[str], received: list[str]
                            ) -> tuple[list[str], list[str]]:
        """Turn the uploaded updates of `agg` into models ``base + update`` (under a lossy compression trainers
        upload updates); return (contributors, received) without the uploads made against another base,
        whose update does not apply to this one."""
        c = self.core
        stale = [p for p in agg.models if agg.models[p].base_digest != base.digest]
        for p in stale:
            del agg.models[p]
        if stale:
            c.counters["stale_updates"] += len(stale)
            logger.info("%s: aggregation %d leaves out %d update(s) against another base", c.me_short, agg.index,
                        len(stale))
        for up in agg.models.values():
            if up.state:
                up.state = {n: base.state[n] + up.state[n].to(base.state[n].dtype) for n in base.state}
        return [p for p in contributors if p in agg.models], [p for p in received if p in agg.models]

    def score(self, agg: Aggregation, received: Sequence[str], new_state: State, base: Base | None) -> None:
        """Update the suspicion of the trainers of `agg` by their distance to the new model (all received
        models, ignored suspects included; this node's own model counts for the median only).

        With an outer optimizer the new model is the outer step's result rather than the rule's output: it
        moves every distance alike, so the scores stay comparable but are less sharp.
        """
        c = self.core
        peers = {p: agg.models[p].state for p in received if p != c.me}
        own = [agg.models[c.me].state] if c.me in agg.models else []
        if base is None:  # without a base (mean, median...), the one this node trained from, if it matches
            held = c.bases.get(agg.index - 1)
            base = held if held is not None and held.digest == agg.base_digest() else None
        if peers:
            c.suspicion.observe_states(peers, new_state, others=own,
                                       reference=base.state if base is not None else None)

    async def push_model(self, targets: Sequence[str], round_: int, state: State, outer: State, *,
                         parent: bytes, combined: int, sample_key: bytes = b"",
                         wire: Mapping[str, CompressedTensor] | None = None) -> list[str]:
        """Send version `round_` (and the view) to `targets`; return those that accepted it, in order.

        The model travels without the outer momentum `outer` (trainers do not need it; the aggregators of
        the next version pull it from the peer that sent their trainers the version, `Versions.get_base`); this
        node's own trainer role gets it with the model. `wire`: `state` compressed, its decoded tensors
        `state`; None: a version held (top-up, relaunch), which travels as `Versions.message` encodes it, so
        that what arrives is bit for bit what this node holds and its digest never changes.

        With secure aggregation the message also names `targets` as the sample of `round_`, and
        `sample_key` as the key that ordered its candidates: the users and the checkable claim of the
        secure aggregation of ``round_ + 1``.
        """
        c = self.core
        if not targets:
            return []
        s = c.settings
        sample = tuple(targets) if c.settings.secagg is not None else ()
        key = sample_key if c.settings.secagg is not None else b""
        body = peer_pb2.ModestModel(run_id=s.run_id, config_hash=s.config_hash, round=round_,
                                    round_estimate=c.round, view=c.view.to_proto(), parent_digest=parent,
                                    combined=combined, sample=sample, sample_key=key)
        msg = Message(body, compressed=dict(wire)) if wire is not None else self.versions.message(body, state, {})

        async def one(peer: str) -> bool:
            if peer == c.me:
                return self.offer(Incoming(round_, state, outer, c.me, parent, combined, sample, key))
            try:
                resp = await c.transport.call(peer, MODEL, msg, peer_pb2.ModestModelAck,
                                              timeout=s.exchange_timeout_s)
            except TransportError as e:
                logger.info("%s: sending version %d to %s failed: %s", c.me_short, round_, short(peer), e)
                c.health.failed(peer, round_)
                return False
            c.heard(peer, resp.body.round_estimate)
            return bool(resp.body.accepted)

        results = await asyncio.gather(*(one(p) for p in targets))
        return [p for p, ok in zip(targets, results, strict=True) if ok]
