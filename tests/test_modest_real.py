"""MoDeST over the real network: hivemind DHT + libp2p (P2PTransport) on 127.0.0.1, nodes in-process."""

from __future__ import annotations

import asyncio

import pytest

from netutil import AggregationLog, NetworkGuard, wait_for_directory_peers
from p2pnode.config import NodeConfig
from p2pnode.daemon.node import Node
from p2pnode.daemon.real import create_real_node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.protocols.modest import ModestProtocol

pytestmark = [pytest.mark.network, pytest.mark.slow]



async def test_five_real_nodes_run_modest_rounds_and_survive_an_aggregator_leaving() -> None:
    with NetworkGuard() as guard:
        nodes: list[Node] = []
        tasks: list[asyncio.Task[None]] = []
        log = AggregationLog()
        events = log.events

        try:
            for i in range(5):
                initial = [] if i == 0 else nodes[0].transport.addresses()[:1]
                config = NodeConfig(run_id="modest-it", seed=5, shard=(i, 5), device="cpu", initial_peers=initial,
                                    topology="modest", sample_size=3, aggregation_timeout_s=10.0,
                                    ping_timeout_s=3.0, idle_timeout_s=5.0, exchange_timeout_s=10.0,
                                    announce_ttl_s=20.0, local_steps=20).validate()
                node = await create_real_node(config, DaemonSettings.in_memory())
                await node.start()
                assert isinstance(node.protocol, ModestProtocol)
                node.protocol.on_aggregate = log.on_aggregate
                nodes.append(node)
            await wait_for_directory_peers(nodes, 4)

            async def loop(node: Node) -> None:
                while True:
                    await node.run_round()

            tasks = [asyncio.get_running_loop().create_task(loop(n)) for n in nodes]
            await log.until(4, timeout=120.0)
            by_version = {e.index: e for e in events}
            assert all(len(by_version[v].contributors) == 3 for v in range(1, 5))
            # The aggregator of the last version leaves gracefully; the others carry on without it.
            leaver = next(n for n in nodes if n.peer_id == by_version[4].aggregator)
            tasks[nodes.index(leaver)].cancel()
            await leaver.shutdown()
            await log.until(8, timeout=120.0)
            later = [e for e in events if e.index >= 6]
            assert later and all(leaver.peer_id not in e.contributors + e.sample for e in later)
            accuracy = max(e.index for e in events), [e.accuracy for e in events]
            assert events[-1].accuracy is not None and events[-1].accuracy > 0.7, accuracy
            assert all(n.transport.stats.rejected.total() == 0 for n in nodes if n is not leaver)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for n in nodes:
                await n.shutdown()
    assert not guard.leaked_processes, guard.leaked_processes
