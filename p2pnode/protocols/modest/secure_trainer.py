"""Secure aggregation around the trainer role: a trainer's update goes masked into a SecAgg+ instance.

The trainer of version ``k`` runs one `SecAggUser` per aggregator of ``k + 1`` (whose server is that
aggregator), started before training so that the key stages overlap it; the trained update
``model - base`` is the user's input, and the `ModestUpdate` (view, digests, loss) travels without
tensors. Training and delivery are the plain trainer role's (`TrainerRole.train`, `TrainerRole.deliver`),
handed in as callbacks. See docs/secagg.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import torch

from p2pnode.errors import ConfigError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.base import ProtocolHooks, RoundReport, State
from p2pnode.protocols.modest.identity import IdentityKeys
from p2pnode.protocols.modest.sampling import Sampler, model_digest
from p2pnode.protocols.modest.state import Base, Core, Incoming, Watch, short
from p2pnode.secagg import Contribution, SecAggError, SecAggHost, SecAggUser, Session, layer_variances
from p2pnode.secagg.groups import group_of, split_groups
from p2pnode.secagg.randomness import Randomness
from p2pnode.secagg.state import UserReport
from p2pnode.transport import Message

logger = logging.getLogger(__name__)


class Deliver(Protocol):
    """`TrainerRole.deliver`."""

    def __call__(self, agg: str, msg: Message[peer_pb2.ModestUpdate], k: int, key: bytes, tried: set[str], *,
                 resend: bool = True) -> Awaitable[tuple[str, peer_pb2.ModestAggAck] | None]: ...


class SecureTrainer:
    """The trainer role of a node whose run uses secure aggregation.

    Args:
        core: the node's shared state.
        sampler: pings and candidate selection (the aggregators of the next version).
        hooks: attacker, ``on_trained``, ``on_secagg_input``, ``on_secagg_report``, ``secagg_silent_from``.
        host: the node's secagg endpoint (users' local dispatch).
        identity: identity keys of the members.
        randomness: the secret randomness of this node's users.
        train: trains a model version (`TrainerRole.train`).
        deliver: sends an update and waits for its acknowledgement (`TrainerRole.deliver`).
    """

    def __init__(self, core: Core, sampler: Sampler, hooks: ProtocolHooks, *, host: SecAggHost,
                 identity: IdentityKeys,
                 randomness: Randomness, train: Callable[[Incoming], Awaitable[tuple[float, State]]],
                 deliver: Deliver) -> None:
        self.core = core
        self.sampler = sampler
        self.hooks = hooks
        self.host = host
        self.identity = identity
        self.randomness = randomness
        self.train = train
        self.deliver = deliver

    async def train_and_upload(self, inc: Incoming) -> RoundReport:
        """Train version ``k = inc.round`` and contribute ``model - base`` masked to each aggregator of ``k + 1``.

        One `SecAggUser` per aggregator (independent instances), started before training: the advertise
        and share stages and the masks run while the model trains; the update then goes into the masked
        stage, and the metadata (view, digests, loss) goes as a `ModestUpdate` without tensors, whose
        acknowledgement says whether the update is in the mean. No resend to another aggregator: a new
        instance would need the whole sample again.
        """
        c = self.core
        s = c.settings
        assert c.settings.secagg is not None
        k = inc.round
        sample = tuple(dict.fromkeys(inc.sample))
        if c.me not in sample or len(sample) < 2:
            c.counters["secagg_no_sample"] += 1
            logger.warning("%s: version %d came without a sample naming this node; not training it", c.me_short, k)
            return c.report("no_sample")
        index = k + 1
        # With groups, this node's instance holds only its group of the sample (every member derives the
        # same groups from the sample's order); with one group it is the whole sample, as always.
        group, members = 0, sample
        if s.secagg_groups > 1:
            group = group_of(sample, c.me, s.secagg_groups)
            members = split_groups(sample, s.secagg_groups)[group]
            if len(members) < s.secagg_min_group:
                # A sample smaller than G * min_group (peers missing): the group's mean would say too much
                # about each member.
                c.counters["secagg_small_group"] += 1
                logger.warning("%s: group %d of version %d's sample has %d member(s), below secagg_min_group=%d; "
                               "not training it", c.me_short, group, k, len(members), s.secagg_min_group)
                return c.report("no_sample")
        c.view.flush_pending()  # a model send follows: pending joins enter the view that travels with it
        key = c.key(index, inc.parent)
        aggregators = [c.server] if c.server is not None else await self.sampler.available(
            index, s.aggregators, key, ordered=c.spread)
        targets = aggregators
        if c.spread and aggregators:
            # Groups spread over the aggregators: this node's group goes to one of them only (the others
            # receive its group's sum from that one), so each trainer uploads once instead of a times.
            targets = [aggregators[group % len(aggregators)]]
        if self.identity.identity is not None and self.identity.stale(members):
            await self.identity.read_now()  # a member that joined since the last read: its record has its key
        identity_keys = self.identity.keys_for(members, index=index, role="trainer")
        loop = asyncio.get_running_loop()
        training: asyncio.Future[Contribution] = loop.create_future()
        silent, self.hooks.secagg_silent_from = self.hooks.secagg_silent_from, None
        runs = []
        for a in targets:
            session = Session(s.run_id, index, a, members, dim=c.layout.dim, extras=c.layout.extras, group=group)
            try:
                user = SecAggUser(session, c.settings.secagg, c.transport, local=self.host.dispatch,
                                  randomness=self.randomness, context=inc.sample_key, stop_before=silent,
                                  identity=self.identity.identity, identity_keys=identity_keys)
            except (ConfigError, SecAggError) as e:
                logger.warning("%s: cannot take part in the secure aggregation of version %d at %s: %s",
                               c.me_short, index, short(a), e)
                continue
            runs.append(c.spawn(self.run_user(k, user, training)))

        loss, trained = await self.train(inc)
        base_digest = model_digest(inc.state)
        c.know(k, base_digest)
        sender = inc.sender if inc.sender != c.me else ""
        c.bases[k] = Base(k, base_digest, inc.state, inc.outer, inc.parent, inc.combined, sender)
        c.prune_bases()
        stale = c.accepted_round > k or c.closing
        if stale or not math.isfinite(loss):
            # No input: the users stop before the masked stage and count as dropped there.
            if runs:
                training.set_exception(SecAggError("no input: training was superseded" if stale
                                                   else "training diverged"))
            else:
                training.cancel()  # nobody awaits it
            await asyncio.gather(*runs, return_exceptions=True)
            if stale:
                c.counters["aborted"] += 1
                return c.report("aborted", train_loss=loss)
            logger.warning("%s: training diverged in round %d (loss %s); not uploading", c.me_short, k, loss)
            return c.report("diverged", train_loss=loss)
        if self.hooks.on_trained is not None:
            self.hooks.on_trained(k, inc.state, trained)
        if self.hooks.attacker is not None and self.hooks.attacker.model_attack:
            trained = await self.hooks.attacker.forge(k, inc.state, trained)  # masked like an honest update
        # float32 (4 bytes per coordinate): its rounding, below 1e-7 of an update, is far below the fixed-point
        # step (2 clip / 2^22); half and bfloat16 models widen exactly.
        vector = torch.cat([(trained[n].detach().cpu().float() - inc.state[n].detach().cpu().float()).reshape(-1)
                            for n in c.layout.float_names])
        extras = layer_variances([trained[n] for n in c.layout.float_names]) if c.layout.extras else None
        body = peer_pb2.ModestUpdate(run_id=s.run_id, config_hash=s.config_hash, round=k, round_estimate=c.round,
                                     view=c.view.to_proto(), base_digest=base_digest, train_loss=loss,
                                     examples=c.trainer.num_examples, parent_digest=inc.parent, secure=True,
                                     aggregators=aggregators if c.spread else [],
                                     base_sender=sender if s.outer_lr is not None else "")
        msg: Message[peer_pb2.ModestUpdate] = Message(body, {})
        tried = set(targets)
        acks_task = asyncio.gather(*(self.deliver(a, msg, k, key, tried, resend=False) for a in targets))
        contribution = Contribution(vector=vector, extras=extras)
        if self.hooks.on_secagg_input is not None:
            self.hooks.on_secagg_input(k, contribution)
        training.set_result(contribution)
        acks = list(await acks_task)
        await asyncio.gather(*runs, return_exceptions=True)
        ok = [a for a in acks if a is not None and a[1].success]
        completed = [a[1] for a in acks if a is not None and a[1].reason in ("late", "aborted")]
        known = [list(a.sample) for a in completed if a.sample]
        if completed and not known:
            pass  # the aggregator had already finished version k + 1 (without this input): the swarm moved on
        elif not ok and c.server is None and c.accepted_round <= k and not c.closing:
            # No aggregator took the update (it crashed, refused the claim, or aborted) and there is no
            # resend under secagg: watch version k + 1 like a contributor. When no member of its sample
            # (named by an aggregator that aborted or completed without this input; none after a crash or
            # a refusal) answers after the idle timeout, this node sends version k again as k + 1. Every
            # such trainer does, not only the lowest live one: it cannot tell which members trained, and a
            # live one that did not would never relaunch. The copies are identical (same base, same
            # order), so trainers keep the first.
            c.watch = Watch(index=index, base_round=k, sample=known[0] if known else [], contributors=[c.me],
                            since=c.now())
            c.prune_bases()
        return c.report("trainer", train_loss=loss, failures=len(acks) - len(ok), partner=ok[0][0] if ok else None)

    async def run_user(self, k: int, user: SecAggUser, training: asyncio.Future[Contribution]) -> UserReport:
        """Run one secagg user of version `k` and hand its report to `on_secagg_report`."""
        report = await user.run(training)
        if self.hooks.on_secagg_report is not None:
            self.hooks.on_secagg_report(k, report)
        return report
