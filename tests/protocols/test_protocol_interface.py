"""The protocol interface: every protocol is a `RoundProtocol` with one `ProtocolHooks` object, and the merge
quorum is the node's decision over a round's report (`partial_reason`, `RoundReport.pre_merge`)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import torch

from p2pnode.daemon.build import build_protocol, build_trainer, seeded_secagg_identity
from p2pnode.daemon.node import Node
from p2pnode.daemon.quorum import partial_reason
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.discovery.memory import MemoryDirectory, MemoryRegistry
from p2pnode.protocols import (
    DpsgdProtocol,
    FLProtocol,
    GossipProtocol,
    ModestProtocol,
    ProtocolHooks,
    ProtocolSnapshot,
    RoundExtra,
    RoundProtocol,
    RoundReport,
)
from p2pnode.protocols.compute import VirtualCompute
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import MemoryNetwork
from simutil import make_config, make_group, running_group

#: (topology, config overrides, class built): every protocol `build_protocol` makes.
PROTOCOLS: list[tuple[str, dict[str, Any], type]] = [
    ("gossip", {}, GossipProtocol),
    ("gossip", {"rule": "median"}, GossipProtocol),
    ("dpsgd", {}, DpsgdProtocol),
    ("modest", {"sample_size": 2}, ModestProtocol),
    ("modest", {"sample_size": 2, "secagg": True}, ModestProtocol),
    ("fl", {"sample_size": 2}, FLProtocol),
]
#: Hooks that used to be attributes of the protocols; they live in `ProtocolHooks` only.
OLD_ATTRIBUTE_HOOKS = ("on_aggregate", "on_trained", "on_secagg_report", "on_secagg_input", "secagg_silent_from")


def _build(topology: str, overrides: dict[str, Any], *, attack: str | None = None) -> RoundProtocol:
    config = make_config(0, 2, topology=topology, **({"attack": attack} if attack else {}), **overrides)
    network, registry = MemoryNetwork(seed=0), MemoryRegistry()
    transport = network.transport("node-0", max_message_bytes=config.max_message_bytes)
    directory = MemoryDirectory(registry, peer_id="node-0", run_id=config.run_id, config_hash=config.config_hash)
    return build_protocol(config, trainer=build_trainer(config), transport=transport, directory=directory,
                          compute=VirtualCompute(), rng=random.Random(0),
                          secagg_identity=seeded_secagg_identity(0, "node-0") if config.secagg else None)


@pytest.mark.parametrize("topology,overrides,cls", PROTOCOLS,
                         ids=[f"{t}-{'-'.join(map(str, o.values())) or 'default'}" for t, o, _ in PROTOCOLS])
def test_every_protocol_satisfies_the_round_protocol_interface(topology: str, overrides: dict[str, Any],
                                                               cls: type) -> None:
    async def main() -> None:
        p = _build(topology, overrides)
        assert type(p) is cls and isinstance(p, RoundProtocol)
        assert p.round == 0 and p.keep_pre_merge is False
        assert isinstance(p.hooks, ProtocolHooks) and p.hooks == ProtocolHooks()
        for name in OLD_ATTRIBUTE_HOOKS:
            assert not hasattr(p, name), f"{cls.__name__}.{name}: hooks live in ProtocolHooks"
        snap = p.snapshot()
        assert isinstance(snap, ProtocolSnapshot) and snap.counters == {} and snap.suspicion == {}
        key = p.secagg_public_key
        assert isinstance(key, bytes) and (len(key) == 32) == bool(overrides.get("secagg"))
        membership = topology in ("modest", "fl")
        assert p.leave_on_close is membership  # only modest and fl announce leaves
        p.leave_on_close = False
        assert p.leave_on_close is False
        p.state_loaded()
        p.round = 7  # the node sets it on resume and sync
        assert p.round == 7
        await p.rejoin()
        await p.close()

    run_virtual(main())


@pytest.mark.parametrize("topology", ["gossip", "dpsgd", "modest"])
def test_the_attacker_is_in_the_hooks(topology: str) -> None:
    async def main() -> None:
        p = _build(topology, {"sample_size": 2} if topology == "modest" else {}, attack="sign_flip")
        assert p.hooks.attacker is not None and p.hooks.attacker.attack == "sign_flip"
        await p.close()

    run_virtual(main())


def test_snapshot_is_a_copy_of_the_counters() -> None:
    async def main() -> None:
        p = _build("modest", {"sample_size": 2})
        assert isinstance(p, ModestProtocol)
        p.counters["aggregations"] += 2
        snap = p.snapshot()
        assert snap.counters == {"aggregations": 2}
        p.counters["aggregations"] += 1
        assert snap.counters == {"aggregations": 2} and p.snapshot().counters == {"aggregations": 3}
        await p.close()

    run_virtual(main())


# ------------------------------------------------------------------------------------------ quorum decision
def _report(combined: int, fraction: float, **extra: Any) -> RoundReport:
    return RoundReport(round=1, train_loss=0.5, test_loss=None, accuracy=None, peers=3, combined=combined,
                       fraction=fraction, extra=RoundExtra(**extra))  # type: ignore[typeddict-item]


@pytest.mark.parametrize("combined,fraction,min_merge,extra,want", [
    (3, 1.0, 1, {}, None),            # merged, no quorum asked
    (3, 1.0, 3, {}, None),            # exactly the quorum
    (2, 1.0, 3, {}, "quorum"),        # a merge below the quorum: undone by the node
    (1, 0.0, 2, {}, "quorum"),        # trained alone: nothing to undo, still partial
    (0, 0.0, 1, {}, "quorum"),        # an aborted secure aggregation combined none
    (1, 0.0, 1, {}, None),            # trained alone without a quorum: not partial
    (4, 0.5, 2, {}, "fraction"),      # several models but only half of the model
    (4, 0.5, 5, {}, "quorum"),        # the quorum decides first
    (1, 0.0, 1, {"partial": "secagg"}, "secagg"),  # a reason the protocol gave
])
def test_partial_reason_is_the_quorum_decision(combined: int, fraction: float, min_merge: int,
                                               extra: dict[str, Any], want: str | None) -> None:
    assert partial_reason(_report(combined, fraction, **extra), min_merge) == want


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("topology", ["gossip", "dpsgd"])
@pytest.mark.parametrize("keep", [True, False])
def test_lockstep_reports_carry_the_model_before_the_merge_only_when_asked(topology: str, keep: bool) -> None:
    """fraction 1.0 and, when asked, pre_merge = the model just trained (the merge's own input)."""

    async def main() -> None:
        async with running_group(2, topology=topology) as group:
            for n in group.nodes:
                n.protocol.keep_pre_merge = keep
            reports = await asyncio.gather(*(n.protocol.run_round() for n in group.nodes))
            for r in reports:
                assert (r.combined, r.fraction) == (2, 1.0)
                assert (r.pre_merge is not None) is keep
            if keep:  # the two pre-merge models are what the two merged: their mean is each node's model now
                a, b = (r.pre_merge for r in reports)
                assert a is not None and b is not None
                mean = {k: (a[k] + b[k]) / 2 for k in a}
                for n in group.nodes:
                    got = n.trainer.state()
                    assert max(float((got[k] - mean[k]).abs().max()) for k in mean) < 1e-6

    run_virtual(main())


def test_a_node_alone_reports_no_merge() -> None:
    async def main() -> None:
        group = await make_group(1, topology="gossip")
        group.nodes[0].protocol.keep_pre_merge = True
        r = await group.nodes[0].protocol.run_round()
        assert (r.combined, r.fraction, r.pre_merge) == (1, 0.0, None)
        await group.nodes[0].shutdown()

    run_virtual(main())


def test_modest_pre_merge_is_the_model_the_rounds_first_load_replaced() -> None:
    """MoDeST loads a model version to train it (and, as an aggregator, to evaluate it): with
    keep_pre_merge the report carries the model the node had when its round started."""

    async def main() -> None:
        group = await make_group(3, topology="modest", sample_size=3, aggregation_timeout_s=5.0, idle_timeout_s=5.0)
        seen: list[tuple[dict[str, torch.Tensor], RoundReport]] = []

        async def loop(node: Any) -> None:
            node.protocol.keep_pre_merge = True
            while True:
                before = node.trainer.state()
                seen.append((before, await node.protocol.run_round()))

        tasks = [asyncio.get_running_loop().create_task(loop(n)) for n in group.nodes]
        while sum(r.pre_merge is not None for _, r in seen) < 6:
            await asyncio.sleep(1.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        merged = [(before, r) for before, r in seen if r.pre_merge is not None]
        # Version 0 is the common initial model: loading it merges nothing (fraction 0); later versions do.
        assert any(r.fraction == 1.0 and r.combined > 1 for _, r in merged)
        assert all(r.pre_merge is not None and _equal(r.pre_merge, before) for before, r in merged)
        for n in group.nodes:
            n.protocol.leave_on_close = False
            await n.shutdown()

    run_virtual(main())


def test_modest_round_below_the_quorum_keeps_the_model_it_had() -> None:
    """A MoDeST node with --min-merge above the sample size: each round that adopted an aggregated version
    is partial (``quorum``) and the node is left with the model it had when the round started."""

    async def main() -> None:
        group = await make_group(3, topology="modest", sample_size=3, aggregation_timeout_s=5.0, idle_timeout_s=5.0,
                                 settings=DaemonSettings.in_memory(min_merge=5))
        undone: list[tuple[str, int]] = []

        async def loop(node: Node) -> None:
            assert node.protocol.keep_pre_merge
            while True:
                before = node.trainer.state()
                r = await node.run_round()
                assert r.pre_merge is None  # the node keeps no model copy in its reports
                if r.extra.get("offered", 0) > 1:  # an aggregated version was loaded: its merge is undone
                    assert r.extra.get("partial") == "quorum" and r.extra.get("merge_applied") is False
                    assert (r.combined, r.fraction) == (1, 0.0)
                    assert _equal(node.trainer.state(), before)
                    undone.append((node.peer_id, r.round))

        tasks = [asyncio.get_running_loop().create_task(loop(n)) for n in group.nodes]
        while len(undone) < 4 and not any(t.done() for t in tasks):
            await asyncio.sleep(1.0)
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert not [e for e in done if not isinstance(e, asyncio.CancelledError)]  # no failed assertion
        assert len(undone) >= 4
        for n in group.nodes:
            assert n.partial_rounds >= 1 and n.metrics.partial_by_reason == {"quorum": n.partial_rounds}
            n.protocol.leave_on_close = False
            await n.shutdown()

    run_virtual(main())
