"""The control API: real nodes on the in-memory network, the real gRPC server, the real CLI commands.

The gRPC server runs on the test's event loop, so the (blocking) CLI runs in a worker thread
(`asyncio.to_thread`); calling it on the loop's thread would deadlock. Direct calls use the aio client.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import stat
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import Result
from daemonutil import invoke_control
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2pnode.cli.control_cmds import EXIT_NO_DAEMON, EXIT_UNAUTHORIZED, EXIT_UNREACHABLE, partial_line
from p2pnode.config import NodeConfig
from p2pnode.daemon.control import SERVICE_NAME, ControlServer, start_control
from p2pnode.daemon.memory import create_memory_node
from p2pnode.daemon.node import Node
from p2pnode.daemon.statedir import (
    StateDirError,
    ensure_state_dir,
    new_token,
    read_control_file,
    remove_control_file,
    write_control_file,
)
from p2pnode.discovery.base import PeerInfo
from p2pnode.discovery.memory import MemoryDirectory, MemoryRegistry
from p2pnode.proto import control_pb2, control_pb2_grpc
from p2pnode.protocols.compute import ThreadCompute
from p2pnode.training.tasks import get_task
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel
from simutil import running_nodes

pytestmark = pytest.mark.timeout(60)

NODES = 3
ROUNDS = 3


@dataclass
class Swarm:
    nodes: list[Node]
    state_dir: Path
    control: ControlServer
    leaves: list[float] = field(default_factory=list)

    @property
    def node(self) -> Node:
        """The node whose control API is served."""
        return self.nodes[0]


def _make_nodes(count: int, task_name: str = "digits-mlp", **task_options: Any) -> list[Node]:
    """`count` gossip nodes (digits-mlp by default) on an in-memory network with instant links, each training
    on its own worker thread, as in the daemon (the simulator's virtual clock is not used here)."""
    network = MemoryNetwork(NetworkModel(LinkModel(latency_s=0.0, bandwidth_bytes_per_s=math.inf)))
    # Wall-clock records, like the real DHT's: the control API reports their age in real seconds.
    registry = MemoryRegistry(clock=time.time)
    task = get_task(task_name, **task_options)
    nodes = []
    for i in range(count):
        config = NodeConfig(run_id="control-test", task=task_name, task_options=dict(task_options), shard=(i, count),
                            device="cpu", local_steps=2, exchange_timeout_s=5.0, min_round_time_s=0.02,
                            batch_size=8 if task_options else None).validate()
        nodes.append(create_memory_node(config, network=network, registry=registry, peer_id=f"peer-{i}", task=task,
                                        compute=ThreadCompute(), rng=random.Random(i)))
    return nodes


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    nodes = _make_nodes(NODES)
    async with running_nodes(nodes):
        leaves: list[float] = []

        def on_leave() -> None:
            leaves.append(time.time())
            nodes[0].stop()

        state_dir = tmp_path / "state"
        control = await start_control(nodes[0], state_dir, on_leave)
        s = Swarm(nodes=nodes, state_dir=state_dir, control=control, leaves=leaves)
        try:
            yield s
        finally:
            await control.stop(grace_s=0)


async def invoke(args: Sequence[str]) -> Result:
    """Run `p2pnode ARGS` in a worker thread (the gRPC server needs this thread's event loop)."""
    return await invoke_control(list(args))


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _run_rounds(nodes: list[Node], rounds: int) -> None:
    await asyncio.gather(*(n.run(rounds=rounds) for n in nodes))


# ------------------------------------------------------------------------------------------ CLI


async def test_status_and_peers_report_rounds_and_peers(swarm: Swarm) -> None:
    await _run_rounds(swarm.nodes, ROUNDS)
    result = await invoke(["status", "--json", "--state-dir", str(swarm.state_dir)])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["peer_id"] == swarm.node.peer_id
    assert status["round"] == ROUNDS
    assert status["peers"] == NODES - 1
    assert status["state"] == "training"
    assert status["partial_rounds"] == swarm.node.partial_rounds
    assert status["partial_by_reason"] == swarm.node.metrics.partial_by_reason
    assert status["last_checkpoint_round"] is None  # these nodes keep no checkpoints
    assert status["resumed_from"] == "fresh"
    assert 0.0 <= status["accuracy"] <= 1.0
    assert status["loss"] > 0
    assert status["bytes_sent"] == swarm.node.transport.stats.bytes_sent > 0
    assert status["bytes_received"] == swarm.node.transport.stats.bytes_received > 0
    assert status["rejected"] == {}
    assert status["pid"] == os.getpid()

    human = await invoke(["status", "--state-dir", str(swarm.state_dir)])
    assert human.exit_code == 0
    assert swarm.node.peer_id in human.stdout
    assert any(line.split() == ["round", str(ROUNDS)] for line in human.stdout.splitlines())
    assert any(line.split() == ["state", "training"] for line in human.stdout.splitlines())
    assert any(line.split() == ["resumed", "from", "fresh"] for line in human.stdout.splitlines())

    peers = await invoke(["peers", "--json", "--state-dir", str(swarm.state_dir)])
    assert peers.exit_code == 0, peers.output
    listed = json.loads(peers.stdout)
    assert [p["peer_id"] for p in listed] == [n.peer_id for n in swarm.nodes[1:]]
    assert all(p["round"] >= 1 and 0 <= p["age_s"] < 30 for p in listed)
    table = await invoke(["peers", "--state-dir", str(swarm.state_dir)])
    assert table.stdout.splitlines()[0].split()[:3] == ["PEER", "ID", "ROUND"]
    assert len(table.stdout.splitlines()) == NODES


async def test_status_reports_directory_rejections(swarm: Swarm) -> None:
    directory = swarm.node.directory
    assert isinstance(directory, MemoryDirectory)
    directory.registry.put(directory.run_id, PeerInfo(peer_id="elsewhere", config_hash="another"), 60.0)
    await directory.peers()
    result = await invoke(["status", "--json", "--state-dir", str(swarm.state_dir)])
    assert result.exit_code == 0, result.output
    rejected = json.loads(result.stdout)["rejected"]
    assert rejected == {"directory.other_config": directory.rejected["other_config"]} and rejected[
        "directory.other_config"] >= 1


async def test_state_dir_from_environment(swarm: Swarm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PNODE_STATE_DIR", str(swarm.state_dir))
    result = await invoke(["status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["peer_id"] == swarm.node.peer_id


async def test_no_daemon_exits_4(tmp_path: Path) -> None:
    result = await invoke(["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == EXIT_NO_DAEMON
    assert f"no running node found in {tmp_path}" in result.stderr
    assert f"p2pnode run --state-dir {tmp_path}" in result.stderr


async def test_stale_control_file_exits_5(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_control_file(ensure_state_dir(tmp_path), f"127.0.0.1:{port}", new_token(), "gone", pid=0)
    result = await invoke(["peers", "--state-dir", str(tmp_path), "--timeout", "1"])
    assert result.exit_code == EXIT_UNREACHABLE
    assert "does not answer" in result.stderr and "stale" in result.stderr

    (tmp_path / "control.json").write_text("{not json")
    result = await invoke(["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == EXIT_UNREACHABLE
    assert "not a valid control file" in result.stderr


async def test_wrong_token_is_refused(swarm: Swarm) -> None:
    address = swarm.control.address
    assert address is not None
    write_control_file(swarm.state_dir, address, "not-the-token", swarm.node.peer_id)
    result = await invoke(["status", "--state-dir", str(swarm.state_dir)])
    assert result.exit_code == EXIT_UNAUTHORIZED
    assert "refused the token" in result.stderr and "UNAUTHENTICATED" not in result.stdout

    async with grpc.aio.insecure_channel(address) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        for metadata in (None, _metadata("not-the-token"), (("authorization", "Basic abc"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Status(control_pb2.StatusRequest(), metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "control token" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Watch(control_pb2.WatchRequest(), metadata=_metadata("nope"), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Leave(control_pb2.LeaveRequest(), metadata=_metadata("nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert swarm.leaves == []


async def test_leave_calls_on_leave(swarm: Swarm) -> None:
    runner = asyncio.create_task(swarm.node.run())  # until stopped
    result = await invoke(["leave", "--state-dir", str(swarm.state_dir), "--reason", "test"])
    assert result.exit_code == 0, result.output
    assert "is leaving" in result.stdout
    assert len(swarm.leaves) == 1
    await asyncio.wait_for(runner, 30)  # on_leave stopped the round loop


async def test_watch_cli_prints_round_events(swarm: Swarm) -> None:
    runners = [asyncio.create_task(n.run()) for n in swarm.nodes]
    try:
        result = await invoke(["watch", "--json", "--count", "2", "--state-dir", str(swarm.state_dir)])
    finally:
        for n in swarm.nodes:
            n.stop()
        await asyncio.gather(*runners)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 2
    assert events[1]["round"] == events[0]["round"] + 1
    assert all(e["peer_id"] == swarm.node.peer_id and e["peers"] == NODES - 1 for e in events)


# ------------------------------------------------------------------------------------------ gRPC API


async def test_watch_streams_rounds_and_ends_when_node_stops(swarm: Swarm) -> None:
    info = read_control_file(swarm.state_dir)
    assert info is not None
    async with grpc.aio.insecure_channel(info.address) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        call = stub.Watch(control_pb2.WatchRequest(), metadata=_metadata(info.token))
        await call.wait_for_connection()  # the server has subscribed: no round will be missed
        await _run_rounds(swarm.nodes, ROUNDS)
        events = [await call.read() for _ in range(ROUNDS)]
        assert [e.round for e in events] == list(range(1, ROUNDS + 1))
        assert all(e.peer_id == swarm.node.peer_id and e.peers == NODES - 1 for e in events)
        assert events[-1].HasField("accuracy") and events[-1].train_loss > 0
        assert events[-1].bytes_sent > 0
        await swarm.node.shutdown()
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_metrics_and_status_rpc(swarm: Swarm) -> None:
    await _run_rounds(swarm.nodes, 2)
    info = read_control_file(swarm.state_dir)
    assert info is not None
    async with grpc.aio.insecure_channel(info.address) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        m = await stub.Metrics(control_pb2.MetricsRequest(), metadata=_metadata(info.token), timeout=5)
        st = swarm.node.transport.stats
        assert (m.round, m.calls, m.failed_calls) == (2, st.calls, st.failed_calls)
        assert m.bytes_sent == st.bytes_sent
        assert m.calls >= 2 and m.peers == NODES - 1 and m.HasField("accuracy") and m.HasField("loss")
        s = await stub.Status(control_pb2.StatusRequest(), metadata=_metadata(info.token), timeout=5)
        assert (s.round, s.task, s.run_id, s.topology) == (2, "digits-mlp", "control-test", "gossip")
        assert s.uptime_s > 0
        assert s.node_state == control_pb2.NODE_STATE_TRAINING and s.state == "running"
        assert not s.HasField("last_checkpoint_round") and s.resumed_from == "fresh"
        # What a resumed node with partial rounds reports (set by the checkpoint and quorum code paths).
        swarm.node.last_checkpoint_round, swarm.node.resumed_from = 2, "checkpoint"
        assert swarm.node.last_report is not None
        swarm.node.metrics.observe_round(swarm.node.last_report, 0.1, "quorum")  # as the quorum counts one
        s = await stub.Status(control_pb2.StatusRequest(), metadata=_metadata(info.token), timeout=5)
        assert (s.last_checkpoint_round, s.resumed_from, s.partial_rounds) == (2, "checkpoint", 1)
        assert dict(s.partial_by_reason) == {"quorum": 1} and partial_line(s) == "1 (quorum 1)"


async def test_health_serving_then_not_serving(swarm: Swarm) -> None:
    address = swarm.control.address
    assert address is not None
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):  # no token needed
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        result = await invoke(["health", "--state-dir", str(swarm.state_dir)])
        assert result.exit_code == 0 and result.stdout.startswith("SERVING")

        await swarm.node.shutdown()
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        result = await invoke(["health", "--address", address])
        assert result.exit_code == 1 and result.stdout.startswith("NOT_SERVING")


async def test_stop_removes_control_file_and_refuses_second_daemon(swarm: Swarm) -> None:
    with pytest.raises(StateDirError, match="another node"):
        await start_control(swarm.nodes[1], swarm.state_dir, lambda: None)
    assert read_control_file(swarm.state_dir) is not None
    await swarm.control.stop()
    assert not (swarm.state_dir / "control.json").exists()
    result = await invoke(["status", "--state-dir", str(swarm.state_dir)])
    assert result.exit_code == EXIT_NO_DAEMON


async def test_unix_socket(tmp_path: Path) -> None:
    nodes = _make_nodes(1)
    await nodes[0].start()
    token = new_token()
    server = ControlServer(nodes[0], token=token, on_leave=lambda: None, host=f"unix:{tmp_path}/control.sock")
    try:
        address = await server.start()
        assert address == f"unix:{tmp_path}/control.sock"
        assert stat.S_IMODE(os.stat(tmp_path / "control.sock").st_mode) == 0o600
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await control_pb2_grpc.ControlStub(channel).Status(
                control_pb2.StatusRequest(), metadata=_metadata(token), timeout=5)
        assert reply.peer_id == nodes[0].peer_id and reply.round == 0 and not reply.HasField("accuracy")
    finally:
        await server.stop()
        await nodes[0].shutdown()


# ------------------------------------------------------------------------------------------ state dir


async def test_state_dir_and_control_file_permissions(swarm: Swarm) -> None:
    assert stat.S_IMODE(swarm.state_dir.stat().st_mode) == 0o700
    path = swarm.state_dir / "control.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = read_control_file(swarm.state_dir)
    assert info is not None
    assert info.address == swarm.control.address and info.peer_id == swarm.node.peer_id
    assert info.pid == os.getpid() and len(info.token) >= 43
    assert sorted(p.name for p in swarm.state_dir.iterdir()) == ["control.json"]  # no temporary files left


def test_state_dir_helpers(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    assert stat.S_IMODE(ensure_state_dir(loose).stat().st_mode) == 0o700
    nested = ensure_state_dir(tmp_path / "a" / "b")
    assert nested.is_dir() and stat.S_IMODE(nested.stat().st_mode) == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(StateDirError, match="not a directory"):
        ensure_state_dir(tmp_path / "file")

    assert read_control_file(nested) is None
    write_control_file(nested, "127.0.0.1:1", "token-a", "peer", pid=123)
    write_control_file(nested, "127.0.0.1:2", "token-b", "peer", pid=124)  # replaces atomically
    info = read_control_file(nested)
    assert info is not None and (info.address, info.token, info.pid) == ("127.0.0.1:2", "token-b", 124)
    assert not remove_control_file(nested, token="token-a")  # another daemon's file stays
    assert remove_control_file(nested, token="token-b")
    assert not remove_control_file(nested)
    assert new_token() != new_token()


async def test_watch_ends_when_client_leaves_or_server_stops(swarm: Swarm) -> None:
    info = read_control_file(swarm.state_dir)
    assert info is not None
    async with grpc.aio.insecure_channel(info.address) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        gone = stub.Watch(control_pb2.WatchRequest(), metadata=_metadata(info.token))
        await gone.wait_for_connection()
        assert len(swarm.node._watchers) == 1
        gone.cancel()
        for _ in range(100):  # the server notices the cancellation and unsubscribes from the node
            if not swarm.node._watchers:
                break
            await asyncio.sleep(0.02)
        assert swarm.node._watchers == []

        open_call = stub.Watch(control_pb2.WatchRequest(), metadata=_metadata(info.token))
        await open_call.wait_for_connection()
        t0 = time.monotonic()
        await swarm.control.stop(grace_s=10)
        assert await open_call.code() == grpc.StatusCode.OK  # ended cleanly, not cancelled
        assert time.monotonic() - t0 < 5


async def test_language_model_node_reports_perplexity_under_its_name(tmp_path: Path) -> None:
    nodes = _make_nodes(2, "tiny-lm", size="tiny")
    async with running_nodes(nodes):
        control = await start_control(nodes[0], tmp_path / "state", lambda: None)
        try:
            await _run_rounds(nodes, 1)
            info = read_control_file(tmp_path / "state")
            assert info is not None
            async with grpc.aio.insecure_channel(info.address) as channel:
                stub = control_pb2_grpc.ControlStub(channel)
                s = await stub.Status(control_pb2.StatusRequest(), metadata=_metadata(info.token), timeout=5)
                m = await stub.Metrics(control_pb2.MetricsRequest(), metadata=_metadata(info.token), timeout=5)
            # A perplexity (about 256 for an untrained byte model, lower after a round) is never an accuracy.
            for reply in (s, m):
                assert reply.metric == "perplexity" and not reply.HasField("accuracy")
                assert 1.0 < reply.metric_value < 300.0
            assert m.metric_value == pytest.approx(math.exp(m.test_loss))
            result = await invoke(["status", "--state-dir", str(tmp_path / "state"), "--json"])
            data = json.loads(result.output)
            assert (data["metric"], data["accuracy"]) == ("perplexity", None)
            assert data["metric_value"] == pytest.approx(s.metric_value)
            text = (await invoke(["status", "--state-dir", str(tmp_path / "state")])).output
            assert "perplexity" in text and "accuracy" not in text
        finally:
            await control.stop(grace_s=0)
