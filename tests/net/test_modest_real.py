"""MoDeST over the real network: hivemind DHT + libp2p (P2PTransport) on 127.0.0.1, nodes in-process."""

from __future__ import annotations

import pytest

from netutil import AggregationLog, NetworkGuard, RealSwarm
from p2pnode.config import NodeConfig
from p2pnode.protocols.modest import ModestProtocol

pytestmark = [pytest.mark.network, pytest.mark.slow]


async def test_five_real_nodes_run_modest_rounds_and_survive_an_aggregator_leaving() -> None:
    log = AggregationLog()
    events = log.events

    def config(i: int, initial: list[str]) -> NodeConfig:
        return NodeConfig(run_id="modest-it", seed=5, shard=(i, 5), device="cpu", initial_peers=initial,
                          topology="modest", sample_size=3, aggregation_timeout_s=10.0, ping_timeout_s=3.0,
                          idle_timeout_s=5.0, exchange_timeout_s=10.0, announce_ttl_s=20.0, local_steps=20)

    with NetworkGuard() as guard:
        async with RealSwarm(5, config, log=log) as swarm:
            nodes = swarm.nodes
            assert all(isinstance(n.protocol, ModestProtocol) for n in nodes)
            swarm.run()
            await log.until(4, timeout=120.0)
            by_version = {e.index: e for e in events}
            assert all(len(by_version[v].contributors) == 3 for v in range(1, 5))
            leaver = next(n for n in nodes if n.peer_id == by_version[4].aggregator)
            swarm.tasks[leaver.peer_id].cancel()
            await leaver.shutdown()
            await log.until(8, timeout=120.0)
            later = [e for e in events if e.index >= 6]
            assert later and all(leaver.peer_id not in e.contributors + e.sample for e in later)
            accuracy = max(e.index for e in events), [e.accuracy for e in events]
            assert events[-1].accuracy is not None and events[-1].accuracy > 0.7, accuracy
            assert all(n.transport.stats.rejected.total() == 0 for n in nodes if n is not leaver)
    assert not guard.leaked_processes, guard.leaked_processes
