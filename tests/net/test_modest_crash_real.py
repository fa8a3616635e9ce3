"""MoDeST over the real network with a crash: six daemons on 127.0.0.1 (hivemind DHT + libp2p), sample size 3;
the aggregator of a round dies mid-round (its libp2p daemon and DHT process are killed with SIGKILL, its handler
never answers, nothing is withdrawn). The survivors carry on and all reach accuracy >= 0.85 on digits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from netutil import NetworkGuard, RealSwarm, crash_node
from p2pnode.config import NodeConfig
from p2pnode.daemon.node import Node
from p2pnode.protocols.modest import AggregationEvent, ModestProtocol

pytestmark = [pytest.mark.network, pytest.mark.slow]

NODES = 6
#: The first aggregation index whose aggregator is killed when it receives its first trained model.
CRASH_AT = 4



async def test_six_real_nodes_survive_the_aggregator_crashing_mid_round() -> None:
    events: list[AggregationEvent] = []
    victim: list[Node] = []
    progress = asyncio.Event()
    swarm: RealSwarm | None = None

    def on_aggregate(ev: AggregationEvent) -> None:
        events.append(ev)
        progress.set()

    def arm(node: Node) -> None:
        proto: Any = node.protocol
        real = proto._receive_update

        async def receive(sender: str, round_: int, *args: Any, **kwargs: Any) -> Any:
            if not victim and round_ + 1 >= CRASH_AT:
                victim.append(node)
                crash_node(node)
                assert swarm is not None
                swarm.tasks[node.peer_id].cancel()
                await asyncio.Event().wait()  # a dead process never answers
            return await real(sender, round_, *args, **kwargs)

        proto._receive_update = receive

    def config(i: int, initial: list[str]) -> NodeConfig:
        return NodeConfig(run_id="modest-crash", seed=11, shard=(i, NODES), device="cpu", initial_peers=initial,
                          topology="modest", sample_size=3, aggregation_timeout_s=8.0, ping_timeout_s=2.0,
                          idle_timeout_s=5.0, exchange_timeout_s=8.0, announce_ttl_s=20.0, local_steps=20)

    with NetworkGuard() as guard:
        async with RealSwarm(NODES, config) as swarm:
            nodes = swarm.nodes
            for node in nodes:
                assert isinstance(node.protocol, ModestProtocol)
                node.protocol.hooks.on_aggregate = on_aggregate
                arm(node)
            swarm.run()
            deadline = time.monotonic() + 150.0
            while not (victim and events and events[-1].index >= CRASH_AT + 10
                       and (events[-1].accuracy or 0.0) >= 0.85):
                progress.clear()
                assert time.monotonic() < deadline, (len(victim), [(e.index, e.accuracy) for e in events])
                await asyncio.wait_for(progress.wait(), max(0.1, deadline - time.monotonic()))
            dead = victim[0]
            after = [e for e in events if e.index > CRASH_AT]
            # Rounds kept completing without the dead node, which took no part after it died.
            assert len(after) >= 10
            table = [(e.index, e.aggregator[-6:], [c[-6:] for c in e.contributors]) for e in after]
            assert all(dead.peer_id not in e.contributors and e.aggregator != dead.peer_id for e in after[3:]), \
                (dead.peer_id[-6:], table)
            await swarm.stop_loops()
            survivors = [n for n in nodes if n is not dead]
            accuracy = [n.trainer.evaluate()[1] for n in survivors]
            assert all(a >= 0.85 for a in accuracy), accuracy
    assert not guard.leaked_processes, guard.leaked_processes
