"""Whole MoDeST (and fl) runs on small in-memory swarms: rules, outer optimizer, failures and recovery."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from p2pnode.daemon.build import build_protocol, build_trainer
from p2pnode.daemon.node import Node
from p2pnode.discovery import PeerDirectory, PeerInfo
from p2pnode.discovery.memory import MemoryDirectory
from p2pnode.protocols.compute import VirtualCompute
from p2pnode.protocols.modest import AggregationEvent, ModestProtocol
from p2pnode.transport.clock import run_virtual
from simutil import (
    Group,
    make_config,
    make_group,
)


def _p(node: Node) -> ModestProtocol:
    assert isinstance(node.protocol, ModestProtocol)
    return node.protocol


class Swarm:
    """Runs every node's round loop (as the daemon does) and records the aggregations."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.events: list[AggregationEvent] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._progress = asyncio.Event()
        self._crashed: set[str] = set()
        for node in group.nodes:
            self.watch(node)

    def watch(self, node: Node) -> None:
        _p(node).hooks.on_aggregate = self._on_aggregate

    def _on_aggregate(self, ev: AggregationEvent) -> None:
        # A crashed machine's tasks may still finish in this process, but nothing they make leaves it.
        if ev.aggregator in self._crashed:
            return
        self.events.append(ev)
        self._progress.set()

    @property
    def version(self) -> int:
        return max((e.index for e in self.events), default=0)

    def start(self, node: Node, first: Any = None) -> None:
        async def loop() -> None:
            if first is not None:
                await first
            while True:
                await node.run_round()

        self._tasks[node.peer_id] = asyncio.get_running_loop().create_task(loop())

    def crash(self, node: Node) -> None:
        self.group.network.crash(node.peer_id)
        self._crashed.add(node.peer_id)
        task = self._tasks.pop(node.peer_id, None)
        if task is not None:
            task.cancel()

    async def until(self, version: int, timeout: float = 3000.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.version < version:
            self._progress.clear()
            await asyncio.wait_for(self._progress.wait(), deadline - loop.time())

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for node in self.group.nodes:
            _p(node).settings.leave_on_close = False
            if node.peer_id in self.group.network.peer_ids() and not self.group.network.is_alive(node.peer_id):
                self.group.network.revive(node.peer_id)
            await node.shutdown()


BASE = {"topology": "modest", "sample_size": 4, "aggregation_timeout_s": 5.0, "idle_timeout_s": 5.0,
        "ping_timeout_s": 2.0, "local_steps": 5}


def _run(count: int, versions: int, **overrides: Any) -> tuple[list[AggregationEvent], Group]:
    out: dict[str, Any] = {}

    async def main() -> None:
        group = await make_group(count, **{**BASE, **overrides})
        swarm = Swarm(group)
        for node in group.nodes:
            swarm.start(node)
        await swarm.until(versions)
        await swarm.stop()
        out["events"], out["group"] = swarm.events, group

    run_virtual(main())
    return out["events"], out["group"]


@pytest.mark.parametrize("rule,extra", [
    ("mean", {}),
    ("vca", {}),
    ("flag", {}),
    ("mean", {"outer_lr": 0.7}),
])
def test_rounds_complete_and_learn_with_each_rule(rule: str, extra: dict[str, Any]) -> None:
    events, group = _run(10, 8, rule=rule, **extra)
    by_version = {e.index: e for e in events}
    assert sorted(by_version) == list(range(1, max(by_version) + 1))  # no version skipped
    assert all(e.rule == rule and len(e.contributors) == 4 and not e.degraded for e in events)
    first, last = by_version[1].accuracy, by_version[8].accuracy
    assert first is not None and last is not None and last > first + 0.2, (first, last)
    pulls = sum(_p(n).counters["base_pulls"] for n in group.nodes)
    if rule == "flag" or "outer_lr" in extra:
        # The aggregators need the contributors' start model: each one of k + 1 was put in k's sample (or
        # built k), so it held it and pulled none.
        assert all(by_version[i + 1].aggregator in {*by_version[i].sample, by_version[i].aggregator}
                   for i in range(1, 8))
    assert pulls == 0


@pytest.mark.parametrize("compression", ["int8", "topk:0.1"])
def test_compressed_rounds_learn_and_keep_each_trainers_residual(compression: str) -> None:
    """Lossy compression: trainers upload model - base with error feedback, aggregators send decoded versions."""
    events, group = _run(10, 8, compression=compression)
    by_version = {e.index: e for e in events}
    assert sorted(by_version) == list(range(1, max(by_version) + 1))
    first, last = by_version[1].accuracy, by_version[8].accuracy
    assert first is not None and last is not None and last > first + 0.2, (first, last)
    # Every trainer whose upload went into a version keeps what its last upload's compression left out, for
    # its next upload (one stream). (A node can train and not upload: a newer version aborts its work.)
    contributors = {p for e in events for p in e.contributors}
    trainers = [n for n in group.nodes if n.peer_id in contributors]
    assert trainers
    for n in trainers:
        core = _p(n).core
        assert core.upload_updates and core.feedback.streams == [""]
        residual = core.feedback.residual("")
        assert set(residual) == {k for k, v in n.trainer.state().items() if v.is_floating_point()}
        assert max(float(r.abs().max()) for r in residual.values()) > 0
    # Each version is held as decoded by its aggregator, so uploads made from it always match its digest.
    assert sum(_p(n).counters["stale_updates"] for n in group.nodes) == 0
    # The aggregators needed the base to apply the updates: they hold it or pull it.
    assert all(e.rule == "mean" and len(e.contributors) == 4 for e in events)


def test_fl_server_aggregates_every_round_and_never_trains() -> None:
    events, group = _run(10, 6, topology="fl")
    server = min(n.peer_id for n in group.nodes)
    assert {e.aggregator for e in events} == {server}
    assert all(server not in e.contributors and server not in e.sample for e in events)
    assert group.nodes[0].peer_id == server and group.nodes[0].trainer.steps_done == 0


def test_trainers_resend_when_their_aggregator_crashes() -> None:
    async def main() -> None:
        group = await make_group(10, **{**BASE, "liveness_min": 1})
        swarm = Swarm(group)
        for node in group.nodes:
            swarm.start(node)
        await swarm.until(3)
        # Crash the node that is collecting the models of version 5 as soon as it holds one from another node.
        while True:
            collecting = [n for n in group.nodes if any(a.index == 5 and set(a.models) - {n.peer_id}
                                                        for a in _p(n).core.aggregations.values())]
            if collecting:
                break
            await asyncio.sleep(0.001)
        swarm.crash(collecting[0])
        await swarm.until(7)
        resends = sum(_p(n).counters["resends"] for n in group.nodes)
        assert resends >= 1
        v5 = [e for e in swarm.events if e.index == 5]
        assert v5 and all(e.aggregator != collecting[0].peer_id for e in v5)
        await swarm.stop()

    run_virtual(main())


def test_a_lost_sample_is_relaunched() -> None:
    """Every member of the sample of version 4 crashes: a contributor of version 4 sends version 3 again."""
    async def main() -> None:
        group = await make_group(12, **BASE)
        swarm = Swarm(group)
        crashed: list[str] = []

        def crash_sample(ev: AggregationEvent) -> None:
            for n in group.nodes:
                if n.peer_id in ev.sample or n.peer_id == ev.aggregator:
                    crashed.append(n.peer_id)
                    swarm.crash(n)

        def on_aggregate(ev: AggregationEvent) -> None:
            if ev.index == 4 and not crashed:
                # After the acknowledgements have reached the trainers, before the sample is done training.
                asyncio.get_running_loop().call_later(0.02, crash_sample, ev)
            swarm._on_aggregate(ev)

        for node in group.nodes:
            _p(node).hooks.on_aggregate = on_aggregate
            swarm.start(node)
        await swarm.until(6)
        assert sum(_p(n).counters["relaunches"] for n in group.nodes) >= 1
        later = [e for e in swarm.events if e.index >= 5]
        assert later and all(c not in crashed for e in later for c in e.contributors)
        await swarm.stop()

    run_virtual(main())


def test_a_graceful_leave_removes_the_node_from_later_samples() -> None:
    async def main() -> None:
        group = await make_group(8, **BASE)
        swarm = Swarm(group)
        for node in group.nodes:
            swarm.start(node)
        await swarm.until(2)
        leaver = group.nodes[3]
        task = swarm._tasks.pop(leaver.peer_id)
        task.cancel()
        await leaver.shutdown()  # withdraws the record and announces LEAVE
        left_at = swarm.version
        await swarm.until(left_at + 6)
        later = [e for e in swarm.events if e.index > left_at + 1]
        assert later and all(leaver.peer_id not in e.contributors + e.sample for e in later)
        await swarm.stop()

    run_virtual(main())


class StaleDirectory(PeerDirectory):
    """A directory whose reads never change: the list it returned first (stale DHT reads)."""

    def __init__(self, inner: PeerDirectory, frozen: list[PeerInfo] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.frozen = frozen

    async def announce(self, info: PeerInfo) -> None:
        await self.inner.announce(info)

    async def withdraw(self) -> None:
        await self.inner.withdraw()

    async def peers(self) -> list[PeerInfo]:
        if self.frozen is None:
            self.frozen = await self.inner.peers()
        return list(self.frozen)


def test_stale_directory_reads_crashes_and_a_newcomer() -> None:
    """DHT reads frozen at the start: crashes are found by pings, a newcomer enters through its adverts."""
    async def main() -> None:
        group = await make_group(8, **BASE)
        for node in group.nodes:
            node.directory = StaleDirectory(node.directory)
            _p(node).directory = node.directory
        swarm = Swarm(group)
        for node in group.nodes:
            swarm.start(node)
        await swarm.until(3)
        swarm.crash(group.nodes[5])
        swarm.crash(group.nodes[6])
        # A newcomer whose directory only ever lists two of the original peers.
        config = make_config(8, 9, **BASE)
        pid = "node-new"
        transport = group.network.transport(pid)
        inner = MemoryDirectory(group.registry, peer_id=pid, run_id=config.run_id, config_hash=config.config_hash)
        known = [p for p in await inner.peers() if p.peer_id in (group.nodes[0].peer_id, group.nodes[1].peer_id)]
        directory = StaleDirectory(inner, known)
        trainer = build_trainer(config)
        protocol = build_protocol(config, trainer=trainer, transport=transport, directory=directory,
                                  compute=VirtualCompute(), rng=random.Random(9), step_cost_s=0.01)
        newcomer = Node(config, trainer=trainer, transport=transport, directory=directory, protocol=protocol,
                        compute=VirtualCompute())
        await newcomer.start()
        group.nodes.append(newcomer)
        swarm.watch(newcomer)
        swarm.start(newcomer)
        start = swarm.version
        await swarm.until(start + 12)
        later = [e for e in swarm.events if e.index > start + 1]
        dead = {group.nodes[5].peer_id, group.nodes[6].peer_id}
        assert all(not dead & set(e.contributors) for e in later)
        assert any(pid in e.contributors for e in later), "the newcomer was never sampled"
        assert trainer.steps_done > 0
        await swarm.stop()

    run_virtual(main())


def test_same_seed_same_rounds() -> None:
    a, _ = _run(8, 4)
    b, _ = _run(8, 4)
    assert [(e.index, e.aggregator, e.contributors, e.sample, e.accuracy, e.time_s) for e in a] == \
        [(e.index, e.aggregator, e.contributors, e.sample, e.accuracy, e.time_s) for e in b]


def test_sample_key_round_uses_the_reference_order() -> None:
    events, group = _run(10, 4, sample_key="round")
    from p2pnode.protocols import candidate_order

    ids = sorted(n.peer_id for n in group.nodes)
    for e in events:
        # The aggregator of version k is normally the first of the order of round k.
        assert e.aggregator == candidate_order(ids, e.index)[0]


def test_make_group_helper_builds_started_nodes() -> None:
    async def main() -> None:
        group = await make_group(2, **BASE)
        assert all(isinstance(n.protocol, ModestProtocol) for n in group.nodes)

    run_virtual(main())
