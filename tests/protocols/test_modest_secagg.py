"""MoDeST with secure aggregation (--secagg): the same model as the plain mean, dropouts, aborts, claims.

Simulator runs (in-memory network, virtual clock) with the real protocol code on both sides; the
checks compare the model an aggregator produced with and without secure aggregation, coordinate by
coordinate, within the fixed-point bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import seeded_secagg_identity
from p2pnode.daemon.metrics import parse_exposition
from p2pnode.errors import ConfigError
from p2pnode.protocols import candidate_order
from p2pnode.protocols.modest import WRONG_SAMPLE, AggregationEvent, ModestProtocol
from p2pnode.secagg import SecAggSettings, SecAggUser, Session, SessionClaim, Stage, Status, keys
from p2pnode.secagg.aggregator import UNKNOWN_IDENTITY
from p2pnode.secagg.settings import plan
from p2pnode.secagg.state import UserReport
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.codec import Message
from simulator import SimConfig, run_simulation
from simutil import (
    SECAGG_TOLERANCE,
    Group,
    make_group,
    max_state_diff,
    run_until,
    running_group,
)

TOLERANCE = SECAGG_TOLERANCE


def claim_for(agg: ModestProtocol, index: int, sender: str, users: tuple[str, ...], *, group: int = 0) -> SessionClaim:
    """The claim a user of `users` sends to `agg` for version `index` (with the session digest it computes)."""
    assert agg.core.settings.secagg is not None
    session = Session("test", index, agg.me, users, dim=agg.core.layout.dim, group=group)
    return SessionClaim("test", index, sender, users, agg.core.layout.dim, 0, b"", group,
                        plan(session, agg.core.settings.secagg).digest)


def _run(cfg: SimConfig) -> tuple[dict[str, object], dict[int, AggregationEvent]]:
    events: dict[int, AggregationEvent] = {}

    def keep(ev: AggregationEvent) -> None:
        events.setdefault(ev.index, ev)

    return run_simulation(cfg, on_event=keep), events


_max_diff = max_state_diff


def test_secure_modest_gives_the_plain_mean_and_learns_digits() -> None:
    base = {"nodes": 20, "topology": "modest", "sample_size": 10, "seed": 1}
    _, plain_events = _run(SimConfig.of(rounds=1, **base))
    secure, events = _run(SimConfig.of(rounds=10, secagg=True, **base))
    # Round 1: the same sample and the same updates, so the same model up to the fixed-point error.
    assert events[1].secure and events[1].aborted is None and events[1].dropped == []
    assert events[1].contributors == plain_events[1].contributors and len(events[1].contributors) == 10
    diff = _max_diff(events[1].state, plain_events[1].state)
    assert 0 < diff <= TOLERANCE
    assert secure["stalled"] is False
    assert secure["protocol_events"]["secagg_rounds"] >= 10  # type: ignore[index]
    # Honest claims are never refused, also from round 3 on, where the ordering key is a model digest.
    assert "secagg_aborted" not in secure["protocol_events"]  # type: ignore[operator]
    assert "secagg_refused" not in secure["protocol_events"]  # type: ignore[operator]
    rounds = secure["rounds"]
    assert isinstance(rounds, list) and len(rounds) == 10
    assert all(r["participants"] == 10 and not r["secagg"]["aborted"] for r in rounds)
    assert secure["final_accuracy"] is not None and secure["final_accuracy"] >= 0.85  # type: ignore[operator]


@pytest.mark.parametrize(("overrides", "tolerance"), [
    # VCA: each trainer appends its layers' variances; the rescaling is smooth, so a looser bound.
    ({"rule": "vca"}, 1e-4),
    ({"outer_lr": 0.7}, TOLERANCE),  # the outer optimizer steps on the secure mean update
    ({"topology": "fl"}, TOLERANCE),  # the fixed server plays the secagg server
    ({"aggregators": 2}, TOLERANCE),  # two independent instances, one per aggregator
], ids=["vca", "outer", "fl", "two-aggregators"])
def test_secure_aggregation_composes(overrides: dict[str, object], tolerance: float) -> None:
    base: dict[str, object] = {"nodes": 12, "topology": "modest", "sample_size": 6, "seed": 3, "rounds": 2}
    base.update(overrides)
    _, plain_events = _run(SimConfig.of(**base))
    secure, events = _run(SimConfig.of(secagg=True, **base))
    assert events[1].secure and events[1].aborted is None
    assert events[1].contributors == plain_events[1].contributors and len(events[1].contributors) == 6
    assert events[1].rule == plain_events[1].rule
    assert _max_diff(events[1].state, plain_events[1].state) <= tolerance
    assert events[2].secure and events[2].aborted is None and secure["stalled"] is False


def test_a_trainer_that_vanishes_after_its_masked_input_is_still_in_the_exact_mean() -> None:
    # Plain reference: one node (chosen by the seed) is down from the start, so version 1 is the mean of
    # the other nine trainers (sf = 0.9).
    base = {"nodes": 10, "topology": "modest", "sample_size": 10, "success_fraction": 0.9, "seed": 4, "rounds": 1}
    plain, plain_events = _run(SimConfig.of(crash_fraction=0.1, **base))
    crashed = plain["crashed"]
    assert isinstance(crashed, list) and len(crashed) == 1
    gone = crashed[0]
    assert gone not in plain_events[1].contributors and len(plain_events[1].contributors) == 9
    # Secure: `gone` is in the sample but never sends its masked input; `late` sends it and then vanishes
    # (it reveals no shares), so its self mask must be rebuilt from the others' shares.
    late = next(p for p in plain_events[1].contributors if p != plain_events[1].aggregator)
    secure, events = _run(SimConfig.of(secagg=True, secagg_silent={gone: "masked", late: "unmask"},
                                       **base))
    ev = events[1]
    assert ev.secure and ev.aborted is None
    assert ev.dropped == [gone] and late in ev.contributors
    assert ev.contributors == plain_events[1].contributors
    diff = _max_diff(ev.state, plain_events[1].state)
    assert diff <= TOLERANCE
    assert secure["protocol_events"]["secagg_rounds"] == 1  # type: ignore[index]


def test_below_the_threshold_the_round_is_aborted_counted_and_not_applied() -> None:
    # s = 10, t = 7: four trainers go silent before sharing their keys, so six remain: abort.
    silent = {f"node-{i:04d}": "share" for i in range(4)}
    cfg = SimConfig.of(nodes=10, topology="modest", sample_size=10, seed=2, rounds=2, secagg=True, secagg_silent=silent)
    result, events = _run(cfg)
    first = events[1]
    assert first.aborted is not None and "share" in first.aborted
    assert first.contributors == [] and first.rule == "none"
    initial = NodeConfig(run_id=cfg.node_config(0).run_id, seed=2, shard=(0, 10), device="cpu")
    from p2pnode.daemon.build import build_trainer

    assert _max_diff(first.state, build_trainer(initial).state()) == 0.0  # nothing applied
    assert result["protocol_events"]["secagg_aborted"] == 1  # type: ignore[index]
    rounds = result["rounds"]
    assert isinstance(rounds, list)
    assert rounds[0]["secagg"]["aborted"] is True and rounds[0]["participants"] == 0
    # The swarm goes on from the unchanged model: the next round is a normal secure one.
    assert events[2].aborted is None and len(events[2].contributors) == 10


@contextlib.asynccontextmanager
async def _started(count: int) -> AsyncIterator[tuple[Group, ModestProtocol]]:
    """`count` secure MoDeST nodes (s = 3), started, and the first node's protocol (the aggregator under test);
    the nodes are shut down on the way out."""
    async with running_group(count, topology="modest", sample_size=3, aggregation_timeout_s=5.0,
                             idle_timeout_s=5.0, secagg=True) as group:
        for node in group.nodes:
            assert isinstance(node.protocol, ModestProtocol)
            await node.protocol._start()
        agg = group.nodes[0].protocol
        assert isinstance(agg, ModestProtocol)
        yield group, agg


def test_a_claim_from_outside_the_sample_is_refused_and_counted() -> None:
    async def main() -> None:
        async with _started(12) as (group, agg):
            order = candidate_order(agg.view.active(0), 0)
            outsider = order[-1]  # ranked 12th: outside the first 2 s = 6 candidates of round 0
            assert outsider != agg.me
            forged = (outsider, *order[:2])
            user_node = next(n for n in group.nodes if n.peer_id == outsider)
            settings = SecAggSettings(open_timeout_s=1.0, retry_interval_s=0.25)
            user = SecAggUser(Session("test", 1, agg.me, forged, dim=agg.core.layout.dim), settings,
                              user_node.transport)
            report = await user.run(asyncio.sleep(0))  # type: ignore[arg-type]
            assert report.status is Status.ABORTED
            assert agg.counters["secagg_refused"] == 1  # once per claimant, not once per retry
            assert agg.transport.stats.rejected[WRONG_SAMPLE] == 1
            assert 1 not in agg.core.aggregations or not agg.core.aggregations[1].opened
            # Further refusals: a sample that does not name its sender, the wrong layout, a made-up key.
            honest = tuple(order[:3])
            sender = next(p for p in honest if p != agg.me)
            for claim in (SessionClaim("test", 1, outsider, honest, agg.core.layout.dim, 0),
                          SessionClaim("test", 1, sender, honest, agg.core.layout.dim + 1, 0),
                          SessionClaim("test", 1, sender, honest, agg.core.layout.dim, 0, b"\x01" * 32),
                          # No group 1 with G = 1:
                          SessionClaim("test", 1, sender, honest, agg.core.layout.dim, 0, b"", 1)):
                assert agg.secure_aggregator.check_claim(claim) is not None
            # The real sample of round 0 (its first s candidates) is accepted and opens the instance.
            agg.secure_aggregator.on_claim(claim_for(agg, 1, sender, honest))
            assert agg.core.aggregations[1].opened
            assert agg.counters["secagg_refused"] == 1
            # Operators see the refusals in the node's metrics.
            scraped = parse_exposition(group.nodes[0].metrics.exposition().decode())
            assert scraped['p2pnode_protocol_events_total{event="secagg_refused"}'] == 1
            assert scraped['p2pnode_rejected_messages_total{reason="wrong_sample"}'] == 1

    run_virtual(main())


def test_a_claim_naming_members_this_aggregator_has_not_seen_yet_waits_for_a_directory_read() -> None:
    """A stale view (members missing since the last directory read, or joins still pending) is no reason to
    refuse an honest sample: a pending join counts as known, and a missing member makes the aggregator read
    the directory before it decides; the claimant retries meanwhile."""
    async def main() -> None:
        async with _started(8) as (_group, agg):
            honest = tuple(candidate_order(agg.view.active(0), 0)[:3])
            sender = next(p for p in honest if p != agg.me)
            member = next(p for p in honest if p not in (agg.me, sender))
            claim = claim_for(agg, 1, sender, honest)
            # A join held pending (not yet in the view) is a known member.
            entry = agg.view._entries.pop(member)
            agg.view.receive_join(member, entry)
            assert agg.secure_aggregator.check_claim(claim) is None
            # A member missing altogether: no refusal while the directory has not been read lately ...
            agg.view._pending.pop(member)
            agg.identity_keys.read_at = -math.inf
            assert agg.secure_aggregator.check_claim(claim) is not None
            agg.secure_aggregator.on_claim(claim)
            assert agg.counters["secagg_refused"] == 0 and 1 not in agg.core.aggregations
            await asyncio.sleep(1.0)  # the background read finds the member's record
            assert agg.view.knows(member)
            agg.secure_aggregator.on_claim(claim)
            assert agg.core.aggregations[1].opened and agg.counters["secagg_refused"] == 0
            # ... but a member that the fresh directory does not list either is refused.
            stranger = (sender, agg.me, "QmNotAPeerOfThisRun")
            agg.secure_aggregator.on_claim(claim_for(agg, 2, sender, stranger))
            assert agg.counters["secagg_refused"] == 1

    run_virtual(main())

@pytest.mark.parametrize(("overrides", "needle"), [
    ({"topology": "modest", "rule": "flag"}, "allowed rules with secagg: mean, vca"),
    ({"topology": "modest", "rule": "median"}, "allowed rules with secagg: mean, vca"),
    ({"topology": "modest", "rule": "krum"}, "allowed rules with secagg: mean, vca"),
    ({"topology": "gossip"}, "secagg needs topology modest or fl"),
    ({"topology": "dpsgd"}, "secagg needs topology modest or fl"),
    ({"topology": "modest", "secagg_threshold": 11}, "secagg_threshold=11"),
    ({"topology": "modest", "success_fraction": 0.5, "secagg_threshold": 6}, "must be in 2..5"),
    ({"topology": "modest", "secagg_clip": 0.0}, "secagg_clip"),
    ({"topology": "modest", "secagg_neighbours": 0}, "secagg_neighbours"),
    ({"topology": "modest", "sample_size": 1}, "sample_size >= 2"),
])
def test_config_refuses_what_secure_aggregation_cannot_do(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        NodeConfig(secagg=True, **overrides).validate()  # type: ignore[arg-type]


def test_config_accepts_mean_and_vca_and_hashes_secagg_only_when_on() -> None:
    for topology in ("modest", "fl"):
        for rule in ("mean", "vca"):
            NodeConfig(topology=topology, rule=rule, secagg=True).validate()
    plain = NodeConfig(topology="modest")
    assert NodeConfig(topology="modest", secagg_clip=1.0).config_hash == plain.config_hash
    assert NodeConfig(topology="modest", secagg=True).config_hash != plain.config_hash
    assert NodeConfig(topology="modest", secagg=True, secagg_threshold=8).config_hash != \
        NodeConfig(topology="modest", secagg=True).config_hash


def test_secure_simulations_are_reproducible() -> None:
    # The simulator seeds each node's secagg randomness from the run's seed: same seed, same results.
    cfg = SimConfig.of(nodes=12, topology="modest", sample_size=6, seed=5, rounds=3, secagg=True)
    first, second = run_simulation(cfg), run_simulation(cfg)
    assert first == second
    assert first["protocol_events"]["secagg_rounds"] >= 3  # type: ignore[index]


def test_swarm_passes_the_secagg_options_to_every_daemon() -> None:
    from p2pnode.cli.swarm import _args

    kw = {"state_root": "/tmp/s", "run_id": "r", "task": "digits-mlp", "rule": "mean", "seed": 0, "nodes": 3,
          "init": "shared", "device": "cpu", "min_round_time": 1.0, "topology": "modest", "secagg": True,
          "secagg_threshold": 3, "secagg_neighbours": None, "secagg_clip": 2.0}
    args = _args(kw, 0, [])
    assert "--secagg" in args
    assert args[args.index("--secagg-threshold") + 1] == "3" and args[args.index("--secagg-clip") + 1] == "2.0"
    assert "--secagg-neighbours" not in args
    assert "--secagg" not in _args({**kw, "secagg": False}, 0, [])


# -- identity binding: members' keys are signed end to end ----------------------------------------------

def _substitute_relayed_keys(protocol: ModestProtocol, *, sign: bool) -> None:
    """Make `protocol`'s node an aggregator-in-the-middle: in every advertise reply it relays, it replaces the
    other members' keys with fresh ones of its own, signed with its own identity key (`sign`) or unsigned.
    With those keys it could read the shares that members encrypt for each other."""
    host = protocol.secagg_host
    assert host is not None
    real = host.dispatch

    async def dispatch(stage: Stage, sender: str, msg: Message[Any]) -> Message[Any]:
        reply = await real(stage, sender, msg)
        if stage is Stage.ADVERTISE:
            members, digest = list(msg.body.members), msg.body.session.digest
            for k in reply.body.keys:
                if k.index == msg.body.keys.index:
                    continue  # its own keys go back unchanged, or it would stop at once
                k.cipher_public_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
                k.mask_public_key = X25519PrivateKey.generate().public_key().public_bytes_raw()
                k.signature = b""
                if sign and protocol.identity_keys.identity is not None:
                    k.signature = keys.sign(protocol.identity_keys.identity, keys.advertise_payload(
                        digest, k.index, members[k.index - 1], k.cipher_public_key, k.mask_public_key,
                        k.self_mask_commitment))
        return reply

    host.dispatch = dispatch  # type: ignore[method-assign]


async def _first_version(group: Any, *, timeout_s: float = 120.0) -> tuple[AggregationEvent | None,
                                                                             list[UserReport]]:
    """Run every node's rounds until some node completes version 1 (or `timeout_s` virtual seconds)."""
    events: list[AggregationEvent] = []
    reports: list[UserReport] = []
    first = asyncio.Event()

    def on_aggregate(ev: AggregationEvent) -> None:
        if ev.index == 1:
            events.append(ev)
            first.set()

    def on_report(k: int, report: UserReport) -> None:
        if k == 0:  # the members of version 1's sample trained version 0
            reports.append(report)

    for node in group.nodes:
        node.protocol.hooks.on_aggregate = on_aggregate
        node.protocol.hooks.on_secagg_report = on_report

    await run_until(group, first, timeout_s=timeout_s)  # then 1 s more: the users of version 1 end
    return (events[0] if events else None), reports


def test_members_keys_are_bound_to_their_signed_records() -> None:
    async def main() -> None:
        group = await make_group(4, topology="modest", sample_size=4, secagg=True)
        protocols = [n.protocol for n in group.nodes]
        for node, p in zip(group.nodes, protocols, strict=True):
            assert isinstance(p, ModestProtocol) and p.secagg_binding == "identity"
            # The public key travels in the node's own record, derived from the run's seed and the peer id.
            expected = keys.public_identity_key(seeded_secagg_identity(3, node.peer_id))
            assert node.info().secagg_key == p.secagg_public_key == expected
            await p._start()
        assert all(set(p.identity_keys.keys) == {n.peer_id for n in group.nodes} for p in protocols)  # type: ignore[attr-defined]
        event, reports = await _first_version(group)
        assert event is not None and event.secure and event.aborted is None and len(event.contributors) == 4
        assert reports and all(r.status is Status.DONE for r in reports)
        assert not any(p.counters["secagg_unknown_key"] for p in protocols)  # type: ignore[attr-defined]

    run_virtual(main())


@pytest.mark.parametrize("sign", [True, False], ids=["signed-by-the-aggregator", "unsigned"])
def test_keys_substituted_by_the_aggregator_are_refused_and_the_round_aborts(sign: bool) -> None:
    async def main() -> None:
        group = await make_group(6, topology="modest", sample_size=4, secagg=True, aggregation_timeout_s=5.0,
                                 idle_timeout_s=5.0)
        for node in group.nodes:
            assert isinstance(node.protocol, ModestProtocol)
            _substitute_relayed_keys(node.protocol, sign=sign)
        event, reports = await _first_version(group)
        # Every member that got another member's substituted keys stopped before sharing anything.
        assert reports and all(r.status is Status.ABORTED for r in reports)
        refused = [r for r in reports if r.reason and "fail their identity signature" in r.reason]
        assert len(refused) >= len(reports) - 1 and all(r.completed is None for r in refused)
        # Below the threshold: the version is reported as aborted, nothing is applied.
        assert event is not None and event.aborted is not None and event.contributors == []
        assert sum(n.protocol.snapshot().counters.get("secagg_aborted", 0) for n in group.nodes) >= 1

    run_virtual(main())


def test_with_unsigned_records_keys_fall_back_to_the_transport_binding() -> None:
    # What the signatures prevent: without them the same substitution passes the members' checks, and they
    # encrypt their shares under the aggregator's keys (they only notice later, when shares fail to decrypt).
    async def main() -> None:
        group = await make_group(6, topology="modest", sample_size=4, secagg=True, aggregation_timeout_s=5.0,
                                 idle_timeout_s=5.0, signed_records=False)
        for node in group.nodes:
            assert isinstance(node.protocol, ModestProtocol)
            assert node.protocol.secagg_binding == "transport" and node.info().secagg_key == b""
            _substitute_relayed_keys(node.protocol, sign=False)
        _, reports = await _first_version(group)
        fooled = [r for r in reports if r.completed is Stage.ADVERTISE]
        assert fooled and all("identity" not in (r.reason or "") for r in reports)

    run_virtual(main())


def test_a_member_without_a_known_key_cannot_take_part_and_is_counted() -> None:
    async def main() -> None:
        options: dict[str, Any] = {"topology": "modest", "sample_size": 4, "secagg": True, "secagg_threshold": 3}
        # The sample and the aggregator of version 1 depend on the peer ids only: find them with every key known.
        reference, _ = await _first_version(await make_group(4, **options))
        assert reference is not None and len(reference.contributors) == 4
        index = next(i for i in range(4) if f"node-{i}" != reference.aggregator)
        # That trainer runs without a secagg key: its record announces none, so no member can verify its keys.
        group = await make_group(4, unkeyed=[index], **options)
        keyless = group.nodes[index].peer_id
        assert group.nodes[index].info().secagg_key == b""
        event, _ = await _first_version(group)
        assert event is not None and event.aggregator == reference.aggregator
        assert event is not None and event.secure and event.aborted is None
        assert keyless in event.dropped and keyless not in event.contributors and len(event.contributors) == 3
        counted = {n.peer_id: n.protocol.snapshot().counters.get("secagg_unknown_key", 0) for n in group.nodes}
        assert counted[event.aggregator] >= 1
        aggregator = next(n for n in group.nodes if n.peer_id == event.aggregator)
        assert aggregator.transport.stats.rejected[UNKNOWN_IDENTITY] >= 1  # later versions may add theirs

    run_virtual(main())


def test_too_many_members_without_a_known_key_abort_the_round() -> None:
    async def main() -> None:
        group = await make_group(4, topology="modest", sample_size=4, secagg=True, secagg_threshold=3,
                                 unkeyed=[1, 2])
        event, _ = await _first_version(group)
        assert event is not None and event.aborted is not None and event.contributors == []

    run_virtual(main())


# -- secure within a group, robust across groups (--secagg-groups) ------------------------------------------

def _forge_first_claim(protocols: list[ModestProtocol]) -> dict[str, Any]:
    """Make the first member of version 1's sample to receive version 0 claim version 1 first with a forged
    member list (one member of the real sample swapped for another candidate of the window the aggregator
    accepts), before it trains honestly; the other members start 0.5 s later, so the forged claim is the
    aggregator's first. Returns ``{"forger": peer id, "members": forged list}`` once it has been sent."""
    forged: dict[str, Any] = {}

    def hook(p: ModestProtocol) -> None:
        real = p._train_and_upload_secure

        async def train(inc: Any) -> Any:
            if inc.round != 0 or p.core.settings.secagg is None:
                return await real(inc)
            if forged:
                await asyncio.sleep(0.5)
                return await real(inc)
            forged["forger"] = p.me
            index = inc.round + 1
            aggregator = (await p.sampler.available(index, 1, p.core.key(index, inc.parent)))[0]
            window = candidate_order(sorted(p.view.active(0)), 0, key=inc.sample_key)
            stranger = next(q for q in window if q not in inc.sample and q != aggregator)
            victim = next(q for q in inc.sample if q not in (p.me, aggregator))
            members = tuple(stranger if q == victim else q for q in inc.sample)
            forged["members"] = members
            user = SecAggUser(Session("test", index, aggregator, members, dim=p.core.layout.dim),
                              p.core.settings.secagg, p.transport,
                              context=inc.sample_key, identity=p.identity_keys.identity,
                              identity_keys=p.identity_keys.keys_for(members, index=index, role="trainer"))
            never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            p.core.spawn(user.run(never))
            await asyncio.sleep(0.1)  # the forged advertisement reaches the aggregator and opens its instance
            return await real(inc)

        p._train_and_upload_secure = train  # type: ignore[method-assign]

    for p in protocols:
        hook(p)
    return forged


def test_a_member_claiming_a_forged_member_list_first_cannot_abort_the_round() -> None:
    # A member of the sample opens an instance first with another member list. Its instance only gets its own
    # advertisement and aborts; the others' claim opens their own instance, which completes with the exact
    # mean of the honest members' updates (the forger, which backs one instance per group only, is left out).
    async def main() -> None:
        group = await make_group(8, topology="modest", sample_size=4, secagg=True)
        protocols = [n.protocol for n in group.nodes]
        assert all(isinstance(p, ModestProtocol) for p in protocols)
        forged = _forge_first_claim(protocols)  # type: ignore[arg-type]
        inputs: dict[str, torch.Tensor] = {}
        bases: dict[str, torch.Tensor] = {}
        for p in protocols:
            assert isinstance(p, ModestProtocol)

            def on_input(k: int, c: Any, me: str = p.me) -> None:
                if k == 0:
                    inputs[me] = c.vector.clone()

            def on_trained(k: int, base: Any, trained: Any, me: str = p.me, proto: Any = p) -> None:
                if k == 0:
                    names = proto.core.layout.float_names
                    bases[me] = torch.cat([base[n].detach().reshape(-1).double() for n in names])

            p.hooks.on_secagg_input = on_input
            p.hooks.on_trained = on_trained
            await p._start()
        event, _ = await _first_version(group)
        assert forged, "no member of version 1's sample trained version 0"
        assert event is not None and event.secure and event.aborted is None
        agg = next(n.protocol for n in group.nodes if n.peer_id == event.aggregator)
        assert isinstance(agg, ModestProtocol)
        assert agg.counters["secagg_competing_claims"] == 1
        # The forger's honest advertisement reaches the honest instance (open by then): it is in the sum too.
        assert sorted(event.contributors) == sorted(inputs) and len(inputs) == 4
        assert event.state is not None
        new = torch.cat([event.state[n].detach().reshape(-1).double() for n in agg.core.layout.float_names])
        expected = bases[event.contributors[0]] + torch.stack([inputs[c] for c in event.contributors]).mean(dim=0)
        assert float((new - expected).abs().max()) <= TOLERANCE

    run_virtual(main())


def test_groups_split_the_sample_by_position() -> None:
    from p2pnode.secagg.groups import group_of, groups_needed, split_groups

    sample = ["e", "b", "a", "d", "c", "f", "g"]
    assert split_groups(sample, 3) == [("e", "d", "g"), ("b", "c"), ("a", "f")]
    assert [group_of(sample, m, 3) for m in sample] == [0, 1, 2, 0, 1, 2, 0]
    assert split_groups(sample, 1) == [tuple(sample)]
    assert groups_needed("mean", {}, 4) == 1
    assert groups_needed("median", {}, 4) == 3  # f = 1 needs 2f + 1 group means
    assert groups_needed("krum", {}, 6) == 5  # f = 1 needs 2f + 3
    assert groups_needed("median", {"f": 2}, 4) == 5  # more than there are: every round would abort


def test_a_group_is_its_own_instance_and_group_zero_keeps_the_digest() -> None:
    from p2pnode.secagg import plan

    settings = SecAggSettings()
    users = ("u1", "u2", "u3")
    whole = plan(Session("run", 4, "agg", users, dim=5), settings)
    assert plan(Session("run", 4, "agg", users, dim=5, group=0), settings).digest == whole.digest
    assert plan(Session("run", 4, "agg", users, dim=5, group=1), settings).digest != whole.digest
    with pytest.raises(ConfigError, match="group >= 0"):
        Session("run", 4, "agg", users, dim=5, group=-1)


def test_two_groups_with_mean_give_the_plain_mean() -> None:
    # The aggregator pools the group sums: the weighted mean of the two group means is the mean of all
    # inputs that arrived, as without secure aggregation (within the fixed-point bound).
    base: dict[str, object] = {"nodes": 12, "topology": "modest", "sample_size": 6, "seed": 3, "rounds": 2}
    plain, plain_events = _run(SimConfig.of(**base))
    secure, events = _run(SimConfig.of(secagg=True, secagg_groups=2, secagg_min_group=3, **base))
    # The results name the setting only when it is not the default (files of older runs stay the same).
    assert "secagg_groups" not in plain["config"] and secure["config"]["secagg_groups"] == 2  # type: ignore[index,operator]
    ev = events[1]
    assert ev.secure and ev.aborted is None and ev.dropped == [] and ev.rule == "mean"
    assert ev.contributors == plain_events[1].contributors and len(ev.contributors) == 6
    assert _max_diff(ev.state, plain_events[1].state) <= TOLERANCE
    counters = secure["protocol_events"]
    assert counters["secagg_rounds"] == 2 and "secagg_groups_left_out" not in counters  # type: ignore[index,operator]


def test_median_across_four_groups_resists_a_scaled_update_that_spoils_the_mean() -> None:
    # Seed 1: the attacker (node-0002) trains in the first sample. Alone in one secure sum it spoils the
    # mean; across four group means the median leaves its group out.
    base: dict[str, object] = {"nodes": 12, "topology": "modest", "sample_size": 8, "seed": 1, "rounds": 3}
    attack: dict[str, object] = {"byzantine": 1, "attack": "scaled"}
    grouped: dict[str, object] = {"secagg": True, "secagg_groups": 4, "secagg_min_group": 2, "rule": "median"}
    clean_g, clean_g_events = _run(SimConfig.of(**grouped, **base))
    attacked_g, attacked_g_events = _run(SimConfig.of(**grouped, **attack, **base))
    clean_m, clean_m_events = _run(SimConfig.of(secagg=True, **base))
    attacked_m, attacked_m_events = _run(SimConfig.of(secagg=True, **attack, **base))
    attacker = SimConfig.of(**attack, **base).byzantine_indices_ids()[0]
    assert attacker in attacked_g_events[1].contributors and attacker in attacked_m_events[1].contributors
    assert attacked_g_events[1].rule == "median" and attacked_g_events[1].aborted is None
    assert _max_diff(attacked_g_events[1].state, clean_g_events[1].state) < 0.2
    assert _max_diff(attacked_m_events[1].state, clean_m_events[1].state) > 0.5
    acc = {name: float(r["final_accuracy"])  # type: ignore[arg-type]
           for name, r in (("clean_g", clean_g), ("attacked_g", attacked_g), ("clean_m", clean_m),
                           ("attacked_m", attacked_m))}
    assert abs(acc["attacked_g"] - acc["clean_g"]) < 0.05
    assert acc["clean_m"] - acc["attacked_m"] > 0.2


def test_a_group_below_its_threshold_is_left_out_and_counted() -> None:
    # t = 3 in groups of 3: one silent member sinks its group; the other group's mean is applied.
    base: dict[str, object] = {"nodes": 12, "topology": "modest", "sample_size": 6, "seed": 3, "rounds": 1,
                               "secagg": True, "secagg_groups": 2, "secagg_threshold": 3, "secagg_min_group": 3}
    _, clean = _run(SimConfig.of(**base))
    silent = next(p for p in clean[1].contributors if p != clean[1].aggregator)
    run, events = _run(SimConfig.of(secagg_silent={silent: "advertise"}, **base))
    ev = events[1]
    assert ev.secure and ev.aborted is None
    assert silent not in ev.contributors and len(ev.contributors) == 3
    assert silent in ev.dropped or silent not in ev.sample
    counters = run["protocol_events"]
    assert counters["secagg_groups_left_out"] == 1 and counters["secagg_rounds"] == 1  # type: ignore[index]
    assert "secagg_aborted" not in counters  # type: ignore[operator]


def test_a_group_smaller_than_the_minimum_does_not_train_and_is_counted() -> None:
    # s = 10 in 2 groups of at least 5, but only 9 nodes: each sample has 9 members, so its group 1 has 4.
    # Its members do not train (their group mean would say more than the run allows); group 0 still counts.
    run = run_simulation(SimConfig.of(nodes=9, topology="modest", sample_size=10, seed=3, rounds=2, secagg=True,
                                      secagg_groups=2))
    counters = run["protocol_events"]
    assert counters["secagg_small_group"] >= 8  # 4 members x 2 versions (and those of the next sample)  # type: ignore[index]
    assert counters["secagg_rounds"] == 2 and counters["secagg_groups_left_out"] == 2  # type: ignore[index]
    assert [row["participants"] for row in run["rounds"]] == [5, 5]  # type: ignore[index,union-attr]
    assert run["config"]["secagg_groups"] == 2 and "secagg_min_group" not in run["config"]  # type: ignore[index,operator]


def test_with_fewer_groups_than_the_rule_needs_the_round_aborts() -> None:
    # median across 3 groups needs all 3 (f = 1 among 2f + 1): losing one aborts the round, counted.
    base: dict[str, object] = {"nodes": 12, "topology": "modest", "sample_size": 6, "seed": 3, "rounds": 1,
                               "secagg": True, "secagg_groups": 3, "rule": "median", "secagg_min_group": 2}
    _, clean = _run(SimConfig.of(**base))
    silent = next(p for p in clean[1].contributors if p != clean[1].aggregator)
    run, events = _run(SimConfig.of(secagg_silent={silent: "advertise"}, **base))
    ev = events[1]
    assert ev.aborted is not None and "2 of 3 secure groups" in ev.aborted and "needs 3" in ev.aborted
    assert ev.contributors == []
    counters = run["protocol_events"]
    assert counters["secagg_groups_left_out"] == 1 and counters["secagg_aborted"] == 1  # type: ignore[index]


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"rule": "median", "secagg_groups": 2}, r"at most 0 Byzantine group\(s\).*needs secagg_groups >= 3"),
    ({"rule": "krum", "secagg_groups": 4}, r"needs secagg_groups >= 5"),
    ({"rule": "median", "secagg_groups": 3, "rule_params": {"f": 2}}, r"f=2 is needed.*>= 5"),
    ({"secagg_groups": 4, "sample_size": 6, "secagg_min_group": 2}, r"smallest group would have 1 member"),
    ({"secagg_groups": 3, "sample_size": 12}, r"4 member\(s\), below secagg_min_group=5.*sample_size >= 15, at "
                                              r"most 2 group"),
    ({"secagg_groups": 2, "secagg_min_group": 1}, r"secagg_min_group=1: must be >= 2"),
    ({"secagg_groups": 2, "sample_size": 6, "secagg_threshold": 4, "secagg_min_group": 3},
     r"secagg_threshold=4 cannot be reached"),
    ({"secagg_groups": 0}, r"secagg_groups=0: must be >= 1"),
    ({"secagg": False, "secagg_groups": 2}, r"secagg is off"),
    ({"rule": "median"}, "allowed rules with secagg: mean, vca"),  # one group: still only sums
])
def test_config_refuses_groups_where_the_rule_cannot_hold(overrides: dict[str, object], needle: str) -> None:
    kw: dict[str, object] = {"topology": "modest", "secagg": True, "sample_size": 12}
    kw.update(overrides)
    with pytest.raises(ConfigError, match=needle):
        NodeConfig(**kw).validate()  # type: ignore[arg-type]


def test_config_accepts_robust_rules_across_enough_groups_and_hashes_groups_only_when_split() -> None:
    NodeConfig(topology="modest", secagg=True, rule="median", secagg_groups=3, sample_size=15).validate()
    NodeConfig(topology="modest", secagg=True, rule="median", secagg_groups=3, sample_size=6,
               secagg_min_group=2).validate()
    NodeConfig(topology="fl", secagg=True, rule="krum", secagg_groups=5, sample_size=25).validate()
    NodeConfig(topology="modest", secagg=True, rule="mean", secagg_groups=2).validate()
    one = NodeConfig(topology="modest", secagg=True)
    assert NodeConfig(topology="modest", secagg=True, secagg_groups=1).config_hash == one.config_hash
    assert NodeConfig(topology="modest", secagg=True, secagg_min_group=3).config_hash == one.config_hash
    two = NodeConfig(topology="modest", secagg=True, secagg_groups=2)
    assert two.config_hash != one.config_hash
    four = NodeConfig(topology="modest", secagg=True, secagg_groups=2, secagg_min_group=4)
    assert four.config_hash != two.config_hash
