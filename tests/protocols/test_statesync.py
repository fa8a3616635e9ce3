"""Late joiner state sync: chunks with hashes from several peers, retries, refusals, and whole nodes.

Memory-network tests run on the virtual clock (timeouts cost no wall time); the last test joins a real
swarm of hivemind nodes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from p2pnode.config import NodeConfig
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.discovery import PeerInfo
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.protocols.statesync import Snapshot, StateSyncServer, fetch_state
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel
from simutil import memory_node, running_nodes

CHUNK = 8 << 10


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(128, 256, generator=g), "a.bias": torch.randn(128, generator=g),
            "b.weight": torch.randn(10, 128, generator=g).to(torch.float16)}


def _spec(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


RUN, CFG = "run", "cfg"


def _servers(network: MemoryNetwork, states: list[tuple[int, dict[str, torch.Tensor]]]) -> list[StateSyncServer]:
    out = []
    for i, (round_, state) in enumerate(states):
        server = StateSyncServer(network.transport(f"s{i}"), run_id=RUN, config_hash=CFG, chunk_bytes=CHUNK)
        server.publish(round_, state)
        out.append(server)
    return out


def _infos(servers: list[StateSyncServer], rounds: list[int]) -> list[PeerInfo]:
    return [PeerInfo(peer_id=s.transport.peer_id, round=r) for s, r in zip(servers, rounds, strict=True)]


def _net() -> MemoryNetwork:
    return MemoryNetwork(NetworkModel(LinkModel(latency_s=0.005, bandwidth_bytes_per_s=50e6)))


def test_chunks_come_from_several_peers_and_match() -> None:
    state = _state()

    async def main() -> None:
        net = _net()
        servers = _servers(net, [(5, state)] * 3)
        client = net.transport("joiner")
        result = await fetch_state(client, _infos(servers, [5, 5, 5]), run_id=RUN, config_hash=CFG,
                                   spec=_spec(state), parallel=6)
        assert result is not None
        assert result.round == 5 and result.failed_chunks == 0
        assert all(torch.equal(result.state[k], state[k]) for k in state)
        n_chunks = -(-Snapshot.build(5, state, CHUNK).data.__len__() // CHUNK)
        assert sum(result.chunks_from.values()) == n_chunks
        assert sorted(result.chunks_from) == ["s0", "s1", "s2"]  # spread over the three peers
        assert min(result.chunks_from.values()) >= n_chunks // 6

    run_virtual(main())


def test_crashed_peer_chunks_are_fetched_from_the_others() -> None:
    state = _state()

    async def main() -> None:
        net = _net()
        servers = _servers(net, [(5, state)] * 3)
        client = net.transport("joiner")
        asyncio.get_running_loop().call_later(0.02, net.crash, "s1")  # mid-transfer
        result = await fetch_state(client, _infos(servers, [5, 5, 5]), run_id=RUN, config_hash=CFG,
                                   spec=_spec(state), parallel=6, request_timeout_s=1.0)
        assert result is not None and result.failed_chunks > 0
        assert all(torch.equal(result.state[k], state[k]) for k in state)
        assert result.chunks_from.get("s0", 0) > 0 and result.chunks_from.get("s2", 0) > 0

    run_virtual(main())


def test_chunk_with_wrong_hash_is_refused_counted_and_refetched() -> None:
    state = _state()

    async def main() -> None:
        net = _net()
        servers = _servers(net, [(5, state)] * 2)
        snap = servers[0]._current()
        assert snap is not None
        for i in range(3, len(snap.data), CHUNK):  # s0 serves damaged chunks under the right manifest
            snap.data[i] ^= 0xFF
        client = net.transport("joiner")
        result = await fetch_state(client, _infos(servers, [5, 5]), run_id=RUN, config_hash=CFG, spec=_spec(state),
                                   parallel=2, max_peer_failures=3)
        assert result is not None
        assert all(torch.equal(result.state[k], state[k]) for k in state)
        # s0 is dropped after 3 bad chunks; every chunk it damaged was fetched again from s1.
        assert client.stats.rejected["bad_hash"] == 3 and result.failed_chunks == 3
        assert result.chunks_from == {"s1": len(snap.chunk_sha256)}

    run_virtual(main())


def test_most_advanced_model_first_then_fallback_when_its_peer_dies() -> None:
    old, new = _state(1), _state(2)

    async def main() -> None:
        net = _net()
        servers = _servers(net, [(3, old), (7, new)])
        client = net.transport("joiner")
        result = await fetch_state(client, _infos(servers, [3, 7]), run_id=RUN, config_hash=CFG, spec=_spec(old))
        assert result is not None and result.round == 7 and result.sources == ["s1"]
        assert torch.equal(result.state["a.weight"], new["a.weight"])
        # Only peers ahead of the joiner are asked.
        assert await fetch_state(client, _infos(servers, [3, 7]), run_id=RUN, config_hash=CFG, spec=_spec(old),
                                 min_round=7) is None
        net.crash("s1")
        result = await fetch_state(client, _infos(servers, [3, 7]), run_id=RUN, config_hash=CFG, spec=_spec(old),
                                   request_timeout_s=0.5)
        assert result is not None and result.round == 3 and result.sources == ["s0"]

    run_virtual(main())


def test_manifest_of_another_model_or_run_is_refused() -> None:
    state = _state()

    async def main() -> None:
        net = _net()
        servers = _servers(net, [(5, state)])
        client = net.transport("joiner")
        other_spec = {**_spec(state), "a.bias": ((64,), torch.float32)}
        assert await fetch_state(client, _infos(servers, [5]), run_id=RUN, config_hash=CFG, spec=other_spec) is None
        assert client.stats.rejected["bad_shape"] == 1
        assert await fetch_state(client, _infos(servers, [5]), run_id=RUN, config_hash="other",
                                 spec=_spec(state)) is None
        assert servers[0].transport.stats.rejected["wrong_run"] == 1

    run_virtual(main())


def test_non_finite_model_is_refused() -> None:
    state = _state()
    state["a.bias"][3] = float("nan")

    async def main() -> None:
        net = _net()
        servers = _servers(net, [(5, state)])
        client = net.transport("joiner")
        assert await fetch_state(client, _infos(servers, [5]), run_id=RUN, config_hash=CFG, spec=_spec(state)) is None
        assert client.stats.rejected["non_finite"] == 1

    run_virtual(main())


def test_late_joiner_starts_from_the_swarms_model_in_the_simulator() -> None:
    """3 gossip nodes run 5 rounds; a 4th node started then syncs: round 5 and one peer's exact model,
    and its accuracy before training is that of the swarm, not of a fresh model."""
    serving = DaemonSettings.in_memory(serve_state=True)
    joining = DaemonSettings.in_memory(serve_state=True, sync_on_join=True)

    async def main() -> None:
        net = MemoryNetwork(seed=0)
        registry = MemoryRegistry()
        nodes = [memory_node(net, registry, i, 4, serving, model_seed_mode="independent", local_steps=20)
                 for i in range(3)]
        async with running_nodes(nodes) as members:
            for _ in range(5):
                await asyncio.gather(*(n.run_round() for n in nodes))
            joiner = memory_node(net, registry, 3, 4, joining, model_seed_mode="independent", local_steps=20)
            members.append(joiner)
            fresh_acc = joiner.trainer.evaluate()[1]  # its own initial model
            await joiner.start()
            assert joiner.round == 5 and joiner.resumed_from == "peers" and joiner.sync_result is not None
            source = next(n for n in nodes if n.peer_id == joiner.sync_result.sources[0])
            got, want = joiner.trainer.state(), source.trainer.state()
            assert all(torch.equal(got[k], want[k]) for k in want)
            swarm_accs = [n.last_report.accuracy for n in nodes if n.last_report and n.last_report.accuracy]
            joiner_acc = joiner.trainer.evaluate()[1]
            assert min(swarm_accs) - 0.05 <= joiner_acc, (joiner_acc, swarm_accs)
            assert joiner_acc > fresh_acc + 0.3, (joiner_acc, fresh_acc)
            report = await joiner.run_round()
            assert report.round == 6 and report.accuracy is not None
            assert abs(report.accuracy - sum(swarm_accs) / len(swarm_accs)) < 0.1
            assert joiner.metrics.syncs.labels(result="ok")._value.get() == 1

    run_virtual(main())


@pytest.mark.network
@pytest.mark.slow
async def test_late_joiner_syncs_from_a_real_swarm(tmp_path: Path) -> None:
    """3 real nodes (hivemind DHT + p2pd) train 5 rounds; a 4th joins through one of them and starts
    from the swarm's model and round (its first evaluation is close to the others')."""
    from netutil import NetworkGuard, start_real_nodes
    from p2pnode.daemon.real import create_real_node

    with NetworkGuard() as guard:
        nodes: list[Node] = []
        try:
            await start_real_nodes(nodes, 3, lambda i, initial: NodeConfig(
                run_id="late", seed=5, shard=(i, 4), device="cpu", initial_peers=initial, exchange_timeout_s=10.0,
                announce_ttl_s=20.0, local_steps=20, model_seed_mode="independent"),
                lambda i: DaemonSettings(state_dir=tmp_path / f"n{i}"))
            for _ in range(5):
                await asyncio.gather(*(n.run_round() for n in nodes))
            config = NodeConfig(run_id="late", seed=5, shard=(3, 4), device="cpu",
                                initial_peers=nodes[1].transport.addresses()[:1], exchange_timeout_s=10.0,
                                announce_ttl_s=20.0, local_steps=20, model_seed_mode="independent").validate()
            joiner = await create_real_node(config, DaemonSettings(state_dir=tmp_path / "n3"))
            nodes.append(joiner)
            fresh_acc = joiner.trainer.evaluate()[1]
            await joiner.start()
            assert joiner.resumed_from == "peers" and joiner.round == 5
            swarm_accs = [n.last_report.accuracy for n in nodes[:3] if n.last_report and n.last_report.accuracy]
            synced_acc = joiner.trainer.evaluate()[1]
            assert synced_acc >= min(swarm_accs) - 0.05 and synced_acc > fresh_acc + 0.3, (synced_acc, swarm_accs)
            await asyncio.gather(*(n.run_round() for n in nodes))
            accs = [n.last_report.accuracy for n in nodes if n.last_report and n.last_report.accuracy is not None]
            assert len(accs) == 4
            assert abs(accs[-1] - sum(accs[:3]) / 3) < 0.1, accs
        finally:
            for n in nodes:
                await n.shutdown()
    assert not guard.leaked_processes, guard.leaked_processes
