"""Secure aggregation around the aggregator role, the way Flower wraps a strategy.

With ``secagg`` an aggregator never sees a model in the clear: a trainer's claim (`SessionClaim`, the
first message of its `SecAggUser`) asks this node to open a SecAgg+ instance for the sample it names.
`SecureAggregator.check_claim` checks that sample against `candidate_order` (members in the view,
among the first ``2 s`` candidates, the right ordering key); the instance then runs as the server, and
its outcome (the sum of the survivors' updates, or an abort) drives `AggregatorRole.complete`, handed
in as a callback. With ``secagg_groups > 1`` each group of the sample is its own instance and
`SecureAggregator.groups` combines the decided groups (spread over the aggregators:
`p2pnode.protocols.modest.spread`). See docs/secagg.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from p2pnode.errors import ConfigError
from p2pnode.protocols.membership import MAX_WIRE_NUMBER
from p2pnode.protocols.modest.identity import IdentityKeys
from p2pnode.protocols.modest.sampling import candidate_order
from p2pnode.protocols.modest.state import Aggregation, Core, short
from p2pnode.protocols.modest.wire import WRONG_SAMPLE
from p2pnode.secagg import SecAggError, SecAggHost, SecAggResult, SecAggSettings, Session, SessionClaim, plan
from p2pnode.secagg.aggregator import SecAggAggregator
from p2pnode.secagg.groups import groups_needed

logger = logging.getLogger(__name__)


class Complete(Protocol):
    """`AggregatorRole.complete`."""

    def __call__(self, agg: Aggregation, *, degraded: bool = False, secure: SecAggResult | None = None,
                 aborted: str | None = None, groups: Mapping[int, SecAggResult] | None = None) -> Awaitable[None]: ...


class SecureAggregator:
    """The aggregator role's secure side: claims, instances, groups.

    Args:
        core: the node's shared state.
        host: the node's secagg endpoint (opens and closes instances).
        identity: identity keys of the members (and directory reads for members not yet known).
        complete: completes an aggregation (`AggregatorRole.complete`).
        local_groups: the groups an aggregation runs here (`Spread.local_groups`).
        exchange_groups: swaps group sums with the other aggregators (`Spread.exchange`).
    """

    def __init__(self, core: Core, *, host: SecAggHost, identity: IdentityKeys, complete: Complete,
                 local_groups: Callable[[Aggregation], set[int]],
                 exchange_groups: Callable[[Aggregation, dict[int, SecAggResult]],
                                           Awaitable[dict[int, SecAggResult]]]) -> None:
        self.core = core
        self.host = host
        self.identity = identity
        self.complete = complete
        self.local_groups = local_groups
        self.exchange_groups = exchange_groups
        #: (round, claimant) pairs refused already (counted once: users retry).
        self._refused: set[tuple[int, str]] = set()

    def secagg_settings(self, n: int, threshold: int, *, grouped: bool = False) -> SecAggSettings:
        """The run's secagg settings with the masked-stage quorum of this aggregator.

        The masked stage closes once ``max(t, floor(sf * s))`` inputs are in (capped by the sample): MoDeST's
        wait for ``sf * s`` models, but never below the secagg threshold, which could only abort. With
        `grouped` (one of several groups of n members) the same fraction applies to the group:
        ``max(t, floor(sf * n))``.
        """
        c = self.core
        assert c.settings.secagg is not None
        if grouped:
            share = math.floor(c.settings.success_fraction * n + 1e-9)
            return dataclasses.replace(c.settings.secagg, masked_quorum=min(n, max(threshold, share)))
        return dataclasses.replace(c.settings.secagg, masked_quorum=min(n, max(threshold, c.threshold())))

    def check_claim(self, claim: SessionClaim) -> str | None:
        """Why the claimed sample of a secure aggregation is refused, or None when `candidate_order` supports it.

        The sample of version ``k = claim.round - 1`` is the first responsive candidates of
        ``candidate_order(active peers, k, key)``. Every member must be in this node's view and among the
        first ``2 s`` candidates (room for ``s`` unresponsive ones skipped and for small view differences);
        the key must be the one the run uses for round ``k`` (the digest of version ``k - 2`` with
        ``sample_key=model``: when this node knows that version's digest, the key must be one of them).
        """
        c = self.core
        s = c.settings
        index, k, users = claim.round, claim.round - 1, set(claim.users)
        if claim.run_id != s.run_id:
            return f"run {claim.run_id!r} is not this node's run {s.run_id!r}"
        if index < 1 or index >= MAX_WIRE_NUMBER:
            return f"round {index} is never aggregated"
        existing = c.aggregations.get(index)
        if index <= c.completed_index or (existing is not None and existing.state != "open"):
            return f"version {index} is already complete here"
        if c.server is not None and c.server != c.me:
            return "this node is not the run's aggregator"
        if claim.sender not in users:
            return "the sender is not in the sample it claims"
        groups = s.secagg_groups
        if claim.group >= groups:
            return f"group {claim.group} does not exist: this run splits a sample into {groups} group(s)"
        if groups > 1 and existing is not None and existing.groups_closed:
            return f"the groups of version {index} are already combined here"
        # A group holds at most ceil(s / G) members of the sample (all s with one group).
        largest = -(-s.sample_size // groups)
        if len(users) > largest or (c.server is not None and c.server in users):
            return (f"the sample lists {len(users)} peers, more than s = {s.sample_size} trainers" if groups == 1
                    else f"group {claim.group} lists {len(users)} peers, more than ceil(s / G) = {largest}")
        if groups > 1 and len(users) < s.secagg_min_group:
            return f"group {claim.group} lists {len(users)} peers, fewer than secagg_min_group = {s.secagg_min_group}"
        if claim.dim != c.layout.dim or claim.extras != c.layout.extras:
            return (f"layout dim={claim.dim} extras={claim.extras}; this model needs {c.layout.dim} and "
                    f"{c.layout.extras}")
        key = claim.context
        if s.sample_key == "model" and k >= 3:
            known = c.digests.get(k - 2)
            if len(key) != 32 or (known and key not in known):
                return f"the ordering key is not the digest of model version {k - 2}"
        elif key:
            return f"round {k} is ordered without a key"
        # A pending join is a known member too: it is only held out of the view so that it cannot change the
        # sample of the round in progress, and the claimed sample is ordered below with the claimants included.
        unknown = sorted(u for u in users if not c.view.knows(u))
        if unknown:
            return f"{len(unknown)} member(s) of the claimed sample are not in this node's view, e.g. {unknown[0]!r}"
        pool = (set(c.view.active(k)) | users) - c.exclude()
        order = candidate_order(sorted(pool), k, key=key)
        window = set(order[:2 * s.sample_size])
        outside = sorted(users - window)
        if outside:
            return (f"{len(outside)} member(s), e.g. {outside[0]!r}, are not among the first {2 * s.sample_size} "
                    f"candidates of round {k}")
        return None

    def on_claim(self, claim: SessionClaim) -> None:
        """`SecAggHost.on_unopened`: open the secure aggregation of ``claim.round`` when the claim checks out."""
        c = self.core
        assert c.settings.secagg is not None
        if c.closing:
            return
        reason = self.check_claim(claim)
        missing = [not c.view.knows(u) for u in claim.users]
        if reason is not None and any(missing) and (self.identity.directory_stale(missing)
                                                    or self.identity.reading()):
            # Members missing from this node's view may only be newer than its last directory read (a stale
            # view at start): read it in the background and let the claimant retry before refusing.
            self.identity.read_soon()
            return
        if reason is not None:
            self.refuse(claim, reason)
            return
        if self.identity.identity is not None and (self.identity.stale(claim.users) or self.identity.reading()):
            # on_unopened must not block: read the directory in the background; the claimant retries
            # (users retry for open_timeout_s while the instance is not open) and finds it open then.
            self.identity.read_soon()
            return
        index = claim.round
        agg = c.aggregations.get(index)
        if agg is None:
            agg = Aggregation(index)
            c.aggregations[index] = agg
        group = claim.group
        if group in agg.group_results or any(i.plan.digest == claim.digest for i in agg.candidates.get(group, [])):
            return
        if (group, claim.sender) in agg.openers:
            # One instance per member and group: a member cannot open a new one for each member list it forges.
            self.refuse(claim, f"{short(claim.sender)} already opened another instance of group {group} of "
                                f"version {index} here, with another member list")
            return
        grouped = c.settings.secagg_groups > 1
        session = Session(c.settings.run_id, index, c.me, claim.users, dim=c.layout.dim, extras=c.layout.extras,
                          group=group)
        try:
            p = plan(session, c.settings.secagg)
            if p.digest != claim.digest:
                raise SecAggError("the claimed session digest differs from this node's for the same members "
                                  "(different secagg settings?)")
            instance = self.host.open(session, self.secagg_settings(p.n, p.threshold, grouped=grouped),
                                      identity_keys=self.identity.keys_for(claim.users, index=index,
                                                                           role="aggregator"))
        except (ConfigError, SecAggError) as e:  # e.g. a sample too small for the configured threshold
            c.counters["secagg_refused"] += 1
            c.transport.reject(claim.sender, WRONG_SAMPLE, f"secure aggregation of version {index}: {e}")
            return
        first = not agg.opened
        if c.spread and agg.home is None:
            agg.home = group % c.settings.aggregators
        agg.openers.add((group, claim.sender))
        agg.candidates.setdefault(group, []).append(instance)
        agg.opened.append(instance)
        if len(agg.candidates[group]) > 1:
            c.counters["secagg_competing_claims"] += 1
            logger.warning("%s: %s claims group %d of version %d with another member list than an instance "
                           "already open; both run, the first to produce a sum counts", c.me_short,
                           short(claim.sender), group, index)
        agg.group_changed.set()
        c.spawn(self.instance(agg, group, instance))
        if grouped and first:
            c.spawn(self.groups(agg))

    def refuse(self, claim: SessionClaim, reason: str) -> None:
        """Refuse `claim` (counted once per claimant and round: users retry) and tell the claimant why."""
        c = self.core
        if (claim.round, claim.sender) in self._refused:
            return
        if len(self._refused) > 4096:
            self._refused.clear()
        self._refused.add((claim.round, claim.sender))
        c.counters["secagg_refused"] += 1
        c.transport.reject(claim.sender, WRONG_SAMPLE, f"secure aggregation of version {claim.round} refused: "
                                                       f"{reason}")

    async def instance(self, agg: Aggregation, group: int, instance: SecAggAggregator) -> None:
        """Run one instance of `group` of `agg` as its server and decide the group when it is the one that counts.

        The first candidate of the group to produce a sum decides it; one that aborts while another
        candidate of the group still runs is dropped (``secagg_candidates_aborted``); the last one to
        abort decides the group as left out. Without groups the decision completes the round (or aborts
        it, loudly: the model goes on unchanged); with groups `groups` combines the decided groups.
        """
        c = self.core
        try:
            try:
                outcome: SecAggResult | str = await instance.run()
            finally:
                self.host.close(instance.plan.session)
        except SecAggError as e:  # SecAggAborted: too few trainers left at some stage
            outcome = str(e)
        others = [i for i in agg.candidates.get(group, []) if i is not instance]
        agg.candidates[group] = others
        if group in agg.group_results or agg.state != "open":
            return  # another instance decided the group first
        if isinstance(outcome, str) and others:
            c.counters["secagg_candidates_aborted"] += 1
            logger.warning("%s: an instance of group %d of version %d aborted (%s); %d other instance(s) of the "
                           "group still run", c.me_short, group, agg.index, outcome, len(others))
            return
        agg.decided[group] = instance
        agg.group_results[group] = outcome
        agg.group_changed.set()
        if c.settings.secagg_groups > 1:
            if isinstance(outcome, str):
                logger.warning("%s: secure group %d of version %d left out (%s)", c.me_short, group, agg.index,
                               outcome)
            return
        s = c.settings
        if isinstance(outcome, str):
            await self.abort(agg, outcome)
            return
        c.counters["secagg_rounds"] += 1
        await agg.wait_metadata(outcome.survivors, timeout=s.exchange_timeout_s)
        logger.info("%s: secure aggregation of version %d: %d of %d trainers in the sum (t=%d)", c.me_short,
                    agg.index, len(outcome.survivors), outcome.users, outcome.threshold)
        await self.complete(agg, secure=outcome)

    async def groups(self, agg: Aggregation) -> None:
        """Wait for the groups of `agg`, then combine the group means with the run's rule (or abort).

        A group whose trainers never open an instance here is given the trainers' open timeout (they
        retry that long), counted from the first group's opening; after that, once every opened group
        has finished, the missing ones are left out. Every group left out counts in
        ``secagg_groups_left_out``. With fewer groups than `groups_needed` left, the round aborts like a
        secure aggregation below its threshold.
        """
        c = self.core
        s = c.settings
        assert c.settings.secagg is not None
        loop = asyncio.get_running_loop()
        open_until = loop.time() + c.settings.secagg.open_timeout_s
        while not self.local_groups(agg) <= set(agg.group_results):
            running = agg.running()
            remaining = open_until - loop.time()
            if not running and remaining <= 0:
                break
            agg.group_changed.clear()
            with contextlib.suppress(TimeoutError):
                # Instances end by their own stage timeouts; without one running, wait for the open timeout.
                await asyncio.wait_for(agg.group_changed.wait(), None if running else remaining)
        agg.groups_closed = True
        results = {g: r for g, r in sorted(agg.group_results.items()) if isinstance(r, SecAggResult)}
        if c.spread:
            results = await self.exchange_groups(agg, results)
        if len(results) < s.secagg_groups:
            c.counters["secagg_groups_left_out"] += s.secagg_groups - len(results)
        needed = groups_needed(s.rule, s.rule_params, s.secagg_groups)
        if len(results) < needed:
            await self.abort(agg, f"{len(results)} of {s.secagg_groups} secure groups completed; rule "
                                  f"{s.rule} needs {needed}")
            return
        c.counters["secagg_rounds"] += 1
        survivors = sorted({u for r in results.values() for u in r.survivors})
        if not c.spread:  # (spread: `exchange_groups` waited for its own trainers'; the others' go elsewhere)
            await agg.wait_metadata(survivors, timeout=s.exchange_timeout_s)
        logger.info("%s: secure aggregation of version %d: %d of %d groups, %d trainers in the group sums",
                    c.me_short, agg.index, len(results), s.secagg_groups, len(survivors))
        await self.complete(agg, groups=results)

    async def abort(self, agg: Aggregation, reason: str) -> None:
        """Complete `agg` as aborted (loudly: counted and logged): the new version is the base unchanged."""
        c = self.core
        c.counters["secagg_aborted"] += 1
        logger.warning("%s: secure aggregation of version %d aborted (%s); the model goes on unchanged",
                       c.me_short, agg.index, reason)
        # The trainers' metadata names the base version; wait for one of them at least.
        await agg.wait_metadata(agg.secure_users(), timeout=c.settings.aggregation_timeout_s, any_one=True)
        await self.complete(agg, aborted=reason)
