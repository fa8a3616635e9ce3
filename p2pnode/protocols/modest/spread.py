"""Secure groups spread over the aggregators of a version, and the exchange of their sums.

With ``secagg_groups = G > 1`` and ``aggregators = a > 1`` (modest, not fl), group ``g`` of a sample is
aggregated by the aggregator at position ``g mod a`` of the trainers' list only, so that each trainer
uploads once instead of ``a`` times. Each aggregator then sends the sums of its groups
(`ModestGroupSums`: a group's float32 mean and weight) to the others, and every aggregator combines
all groups into the same next version, bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import torch

from p2pnode.errors import BadMessage, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.modest.state import Aggregation, Core, short
from p2pnode.protocols.modest.wire import GROUP_SUMS, as_sent, check_round, check_run, parse_group_sums
from p2pnode.secagg import SecAggResult
from p2pnode.transport import Message

logger = logging.getLogger(__name__)

#: Versions whose group sums from other aggregators a node keeps (spread secure groups), the newest.
REMOTE_VERSIONS = 8


class Spread:
    """One node's share of spread secure groups (inactive unless `Core.spread`).

    Args:
        core: the node's shared state.
        send_sums: sends group sums to another aggregator (`Spread.send_group_sums` unless a test wraps it);
            called as ``send_sums(peer, index, base digest, sums by group, groups left out)``.
    """

    def __init__(self, core: Core, *, send_sums: Callable[..., Coroutine[Any, Any, None]] | None = None) -> None:
        self.core = core
        self.send_sums = send_sums if send_sums is not None else self.send_group_sums
        #: Group sums from the other aggregators of a version, by version and (group, sender): the base digest
        #: they apply to and the sum (None: the sender left the group out).
        self.remote_groups: dict[int, dict[tuple[int, str], tuple[bytes, SecAggResult | None]]] = {}
        self.arrived = asyncio.Event()

    def local_groups(self, agg: Aggregation) -> set[int]:
        """The groups `agg` runs here: all of them, or with spread groups those of its position (`home`) and
        any other that trainers opened here."""
        c = self.core
        s = c.settings
        if not c.spread or agg.home is None:
            return set(range(s.secagg_groups))
        return {g for g in range(s.secagg_groups) if g % s.aggregators == agg.home} | set(agg.candidates)

    async def exchange(self, agg: Aggregation, local: dict[int, SecAggResult]) -> dict[int, SecAggResult]:
        """Send the sums of this aggregator's groups to the other aggregators of `agg` and add theirs.

        The aggregators and their order are the majority list in the trainers' updates (group ``g`` belongs
        to ``order[g mod a]``); a sum counts only from the aggregator its group belongs to and only for the
        same base version. Waits at most ``aggregation_timeout_s`` (the longest a slow group's masked stage
        runs) for the others' groups; missing ones are left out. Returns every group sum, by group.
        """
        c = self.core
        s = c.settings
        survivors = sorted({u for r in local.values() for u in r.survivors})
        await agg.wait_metadata(survivors, timeout=s.exchange_timeout_s)
        lists = Counter(u.aggregators for u in agg.models.values() if u.aggregators)
        order = max(sorted(lists), key=lambda o: lists[o]) if lists else ()
        if c.me not in order:
            logger.warning("%s: version %d: the trainers' aggregator lists do not name this node; its %d group(s) "
                           "are not exchanged", c.me_short, agg.index, len(local))
            return local
        groups = s.secagg_groups
        owner = {g: order[g % len(order)] for g in range(groups)}
        base_digest = agg.base_digest()
        left_out = sorted(g for g in range(groups) if owner[g] == c.me and g not in local)
        for peer in dict.fromkeys(order):
            if peer != c.me:
                c.spawn(self.send_sums(peer, agg.index, base_digest, local, left_out))
        foreign = [g for g in range(groups) if owner[g] != c.me and g not in local]

        def collected() -> dict[int, SecAggResult | None]:
            entries = self.remote_groups.get(agg.index, {})
            found: dict[int, SecAggResult | None] = {}
            for g in foreign:
                entry = entries.get((g, owner[g]))
                if entry is not None and entry[0] == base_digest:
                    found[g] = entry[1]
            return found

        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.aggregation_timeout_s
        while True:
            self.arrived.clear()
            got = collected()
            remaining = deadline - loop.time()
            if len(got) == len(foreign) or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)
        # Own groups in the form they travel in (mean rounded to float32), so that every aggregator with the
        # same groups builds the same model bit for bit (same digest: trainers' sample keys agree).
        merged = {g: as_sent(r) for g, r in local.items()}
        merged.update({g: r for g, r in got.items() if r is not None})
        others = sum(1 for r in got.values() if r is not None)
        c.counters["secagg_remote_groups"] += others
        logger.info("%s: version %d: %d own secure group(s), %d from the other %d aggregator(s), %d left out",
                    c.me_short, agg.index, len(local), others, len(set(order)) - 1, groups - len(merged))
        return dict(sorted(merged.items()))

    async def send_group_sums(self, peer: str, index: int, base_digest: bytes, results: Mapping[int, SecAggResult],
                              left_out: Sequence[int]) -> None:
        """Send each group sum of `results` (one message per group: a model's size each) and the groups left
        out to the aggregator `peer`. A group travels as its mean (float32, as models do) and its weight."""
        c = self.core
        s = c.settings
        messages: list[Message[peer_pb2.ModestGroupSums]] = []
        for g, r in results.items():
            body = peer_pb2.ModestGroupSums(run_id=s.run_id, config_hash=s.config_hash, index=index,
                                            base_digest=base_digest)
            body.groups.add(group=g, weight_sum=r.weight_sum, survivors=r.survivors, users=r.users)
            tensors = {f"mean.{g}": r.mean().to(torch.float32)}
            if c.layout.extras:
                tensors[f"extras.{g}"] = r.extras_mean().to(torch.float32)
            messages.append(Message(body, tensors))
        if left_out or not messages:
            messages.append(Message(peer_pb2.ModestGroupSums(run_id=s.run_id, config_hash=s.config_hash, index=index,
                                                             base_digest=base_digest, left_out=left_out)))
        for msg in messages:
            try:
                await c.transport.call(peer, GROUP_SUMS, msg, peer_pb2.ModestGroupSumsAck, timeout=s.exchange_timeout_s)
            except TransportError as e:
                logger.info("%s: group sums of version %d to %s failed: %s", c.me_short, index, short(peer), e)
                return

    async def on_group_sums(self, sender: str, msg: Message[Any]) -> Message[Any]:
        """Keep the group sums another aggregator of a version sent (checked here; their owner and base are
        checked when the version combines its groups, `exchange`)."""
        c = self.core
        body: peer_pb2.ModestGroupSums = msg.body
        check_run(c.settings, sender, body)
        check_round(body.index)
        s = c.settings
        if not c.spread:
            raise BadMessage("group sums, but this run does not spread secure groups over aggregators",
                             code="malformed")
        index = int(body.index)
        if index <= c.completed_index:
            return Message(peer_pb2.ModestGroupSumsAck(accepted=False, reason="late"))
        named, parsed = parse_group_sums(body, msg.tensors, s, dim=c.layout.dim, extras=c.layout.extras)
        # Memory stays bounded: one entry per (group, sender), from the aggregators the trainers named once
        # this node knows their list, and from at most 2 a senders per version before.
        agg = c.aggregations.get(index)
        lists = {u.aggregators for u in agg.models.values() if u.aggregators} if agg is not None else set()
        entries = self.remote_groups.get(index, {})
        senders = {snd for _, snd in entries}
        if lists and not any(sender in order for order in lists):
            return Message(peer_pb2.ModestGroupSumsAck(accepted=False, reason="not_aggregating"))
        if sender not in senders and len(senders) >= 2 * s.aggregators:
            return Message(peer_pb2.ModestGroupSumsAck(accepted=False, reason="not_aggregating"))
        entries = self.remote_groups.setdefault(index, entries)
        digest = bytes(body.base_digest)
        for g in named:
            entries.setdefault((g, sender), (digest, parsed.get(g)))
        while len(self.remote_groups) > REMOTE_VERSIONS:
            del self.remote_groups[min(self.remote_groups)]
        self.arrived.set()
        return Message(peer_pb2.ModestGroupSumsAck(accepted=True))
