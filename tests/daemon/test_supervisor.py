"""The daemon's DHT process and p2pd: supervised, restarted when they die, and never left behind.

Real processes on 127.0.0.1: a `p2pnode run` daemon killed with SIGKILL leaves no DHT process and no
p2pd; an in-process node whose DHT process is killed reports it (health, status, metrics), pauses its
rounds, comes back with the same peer id and trains with its peer again; a dead p2pd brings its DHT
process down and both come back; a node starting on a state dir kills the leftovers recorded there,
and only those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemonutil import Daemon, invoke_control
from grpc_health.v1 import health_pb2, health_pb2_grpc

from netutil import NetworkGuard, descendant_pids, shutdown_replicas, start_real_nodes, wait_for_directory_peers
from p2pnode.config import NodeConfig
from p2pnode.daemon.children import ProcessRecord, pid_file_path, read_pid_file, start_time, write_pid_file
from p2pnode.daemon.control import start_control
from p2pnode.daemon.identity import load_or_create_identity
from p2pnode.daemon.metrics import parse_exposition
from p2pnode.daemon.node import Node
from p2pnode.daemon.real import create_real_node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.daemon.supervisor import DHTSupervisor

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

#: Longest time the DHT process and p2pd of a killed daemon may outlive it, in seconds.
ORPHAN_GRACE_S = 5.0


def _alive(pids: set[int]) -> set[int]:
    """The pids of `pids` that still run (zombies count as gone: they hold no port and answer no peer)."""
    return {p for p in pids if start_time(p) is not None}


def _wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_sigkilled_daemon_leaves_no_dht_process_and_no_p2pd(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = Daemon(["--state-dir", str(state), "--device", "cpu", "--run-id", "supervisor-kill",
                "--min-round-time", "0.2"])
    try:
        d.ready(timeout=90)
        records = read_pid_file(state)
        before = descendant_pids(d.proc.pid)
        assert sorted(r.name for r in records) == ["dht", "p2pd"], records
        recorded = {r.pid for r in records}
        assert recorded <= before, (records, before)  # the pid file names this daemon's own children
        os.kill(d.proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        d.proc.wait(10)
        gone = _wait_until(lambda: not _alive(before), ORPHAN_GRACE_S)
        assert gone, f"left running after the daemon was killed: {_alive(before)}"
    finally:
        for pid in [d.proc.pid, *descendant_pids(d.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        d.proc.wait(10)


def _config(i: int, initial: list[str]) -> NodeConfig:
    return NodeConfig(run_id="supervisor", seed=3, shard=(i, 2), device="cpu", initial_peers=initial,
                      exchange_timeout_s=5.0, announce_ttl_s=20.0, local_steps=5,
                      min_round_time_s=0.2).validate()


async def _status_json(state_dir: Path) -> dict[str, Any]:
    """`p2pnode status --json`, run in a worker thread (the gRPC server needs this thread's loop)."""
    result = await invoke_control(["status", "--json", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.stdout)
    return out


async def test_killed_dht_process_is_reported_restarted_with_the_same_peer_id_and_trains_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2pnode")
    settings = DaemonSettings.in_memory()
    control_dir = tmp_path / "control"
    with NetworkGuard() as guard:
        nodes: list[Node] = []
        control = runner = None
        try:
            await start_real_nodes(nodes, 2, _config, lambda i: settings)
            await wait_for_directory_peers(nodes, 1)
            a, b = nodes
            control = await start_control(a, control_dir, on_leave=a.stop)
            assert control.address is not None
            peer_id = a.peer_id
            supervisor: Any = a.network
            old = {r.pid for r in supervisor.processes}
            assert len(old) == 2
            status = await _status_json(control_dir)
            assert status["dht_state"] == "ok" and status["dht_events"]["dht_died"] == 0, status

            runner = asyncio.create_task(a.run())
            while a.round < 1:  # rounds run before the crash
                await asyncio.sleep(0.05)
            async with grpc.aio.insecure_channel(control.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def serving() -> bool:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

                assert await serving()
                killed_at = time.time()
                os.kill(supervisor.dht.pid, signal.SIGKILL)
                # Down: health, status and metrics say so.
                deadline = time.monotonic() + 10
                while a.network_ok:
                    assert time.monotonic() < deadline, "the dead DHT process was not noticed"
                    await asyncio.sleep(0.02)
                assert not await serving()
                down = await _status_json(control_dir)
                assert down["dht_state"] in ("down", "restarting") and down["dht_events"]["dht_died"] == 1, down
                assert down["state"] == "training"  # the lifecycle is unchanged; the DHT state tells the outage
                metrics = parse_exposition(a.metrics.exposition().decode())
                assert metrics["p2pnode_dht_up"] == 0.0
                rounds_while_down = a.round
                # Its p2pd died with it (parent-death signal), without waiting for the supervisor.
                assert await asyncio.to_thread(_wait_until, lambda: not _alive(old), ORPHAN_GRACE_S), _alive(old)

                deadline = time.monotonic() + 60
                while not a.network_ok:
                    assert time.monotonic() < deadline, f"no restart: {supervisor.state} {dict(supervisor.events)}"
                    await asyncio.sleep(0.05)
                assert await serving()
            # At most the round in progress at the crash ended while the DHT was down.
            assert a.round <= rounds_while_down + 1
            up = await _status_json(control_dir)
            assert up["dht_state"] == "ok" and up["peer_id"] == peer_id, up
            assert (up["dht_events"]["dht_died"], up["dht_events"]["restarted"]) == (1, 1), up
            assert a.peer_id == peer_id and a.transport.p2p.peer_id.to_base58() == peer_id
            assert not old & {r.pid for r in supervisor.processes}
            metrics = parse_exposition(a.metrics.exposition().decode())
            assert metrics["p2pnode_dht_up"] == 1.0
            assert metrics['p2pnode_dht_events_total{event="dht_died"}'] == 1.0
            assert metrics['p2pnode_dht_events_total{event="restarted"}'] == 1.0
            paused = [r for r in caplog.records if "no rounds until it is back" in r.getMessage()]
            assert len(paused) == 1, [r.getMessage() for r in paused]

            # Back on the network: the peer finds the re-announced record and a round merges its model.
            async def reannounced() -> bool:
                found = {p.peer_id: p for p in await b.directory.peers()}
                return peer_id in found and found[peer_id].timestamp > killed_at

            deadline = time.monotonic() + 30
            while not await reannounced():
                assert time.monotonic() < deadline, "the restarted node's record did not reach its peer"
                await asyncio.sleep(0.2)
            resumed_at = a.round
            deadline = time.monotonic() + 60
            while not (a.round > resumed_at and a.last_report is not None and a.last_report.combined >= 2):
                assert time.monotonic() < deadline, a.last_report
                assert not runner.done(), runner
                await asyncio.sleep(0.05)
            report = await b.run_round()  # and the peer reaches the restarted node
            assert report.combined >= 2, report
            # The connection guard sweeps the new p2pd, where the peer is known (its directory record and the
            # DHT's routing table): nothing is dropped.
            conn_guard: Any = a.transport.guard
            sweeps = conn_guard.sweeps
            assert await conn_guard.sweep() == []
            assert conn_guard.sweeps == sweeps + 1 and conn_guard.known(b.peer_id) and conn_guard.outsiders == 0
            assert b.peer_id in conn_guard._members_view and b.peer_id in conn_guard._dht_view
        finally:
            if runner is not None:
                a_node = nodes[0]
                a_node.stop()
                await asyncio.wait_for(runner, 60)
            if control is not None:
                await control.stop(grace_s=0)
            for node in nodes:
                await node.shutdown()
    assert not guard.leaked_processes, guard.leaked_processes


def _sleeper() -> subprocess.Popen[bytes]:
    """A python process of its own session (no parent-death signal), as a leftover would be."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


async def test_start_kills_the_leftovers_in_the_pid_file_and_only_those(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ghost, stranger = _sleeper(), _sleeper()
    try:
        assert await asyncio.to_thread(_wait_until, lambda: start_time(ghost.pid) is not None
                                       and start_time(stranger.pid) is not None, 10)
        ghost_rec = ProcessRecord.of(ghost.pid, "p2pd")
        assert ghost_rec is not None
        # The stranger's pid with another start time: a later process that got a recorded pid.
        stranger_rec = ProcessRecord(stranger.pid, (start_time(stranger.pid) or 0) + 1, "dht")
        write_pid_file(state, [ghost_rec, stranger_rec])
        with NetworkGuard() as guard:
            node = await create_real_node(_config(0, []), DaemonSettings.in_memory(state_dir=state))
            try:
                assert ghost.poll() == -signal.SIGKILL
                assert stranger.poll() is None
                mine = read_pid_file(state)  # now this node's DHT process and p2pd
                assert sorted(r.name for r in mine) == ["dht", "p2pd"]
                assert {r.pid for r in mine} <= descendant_pids()
            finally:
                await node.shutdown()
            assert not pid_file_path(state).exists()
        assert not guard.leaked_processes, guard.leaked_processes
    finally:
        for p in (ghost, stranger):
            if p.poll() is None:
                p.kill()
            p.wait(10)


async def test_dead_p2pd_takes_its_dht_process_down_and_both_come_back(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path).path
    with NetworkGuard() as guard:
        supervisor = DHTSupervisor(host="127.0.0.1", port=0, dht_options={"identity_path": str(identity)},
                                   state_dir=tmp_path)
        try:
            dht = await supervisor.start()
            port = supervisor.port
            peer_id = (await dht.replicate_p2p()).peer_id
            old = {r.name: r for r in supervisor.processes}
            os.kill(old["p2pd"].pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while supervisor.events["restarted"] < 1:
                assert time.monotonic() < deadline, (supervisor.state, dict(supervisor.events))
                await asyncio.sleep(0.05)
            assert supervisor.state == "ok"
            assert (supervisor.events["p2pd_died"], supervisor.events["dht_died"]) == (1, 0)
            assert not old["dht"].alive()  # a DHT process without its p2pd is useless: it was killed
            new = supervisor.dht
            assert new is not dht and (await new.replicate_p2p()).peer_id == peer_id
            assert supervisor.port == port
            assert {r.pid for r in read_pid_file(tmp_path)} == {r.pid for r in supervisor.processes}
            await shutdown_replicas([dht, new])
        finally:
            await supervisor.close()
        assert not pid_file_path(tmp_path).exists()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard
