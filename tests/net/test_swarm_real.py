"""Real swarms on 127.0.0.1: hivemind DHT + p2pd per node, gossip on digits."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from daemonutil import Daemon

from netutil import NetworkGuard, process_name, start_real_nodes, wait_for_directory_peers
from p2pnode.config import NodeConfig

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _flat(node: Any) -> torch.Tensor:
    return torch.cat([v.flatten() for v in node.trainer.state().values()])


def _max_distance(nodes: list[Any]) -> float:
    flats = [_flat(n) for n in nodes]
    return max(float((a - b).norm()) for a, b in itertools.combinations(flats, 2))



async def test_three_real_nodes_discover_train_and_agree() -> None:
    """3 real nodes: discovery through the DHT, 10 gossip rounds, accuracy >= 0.85, models converge."""
    with NetworkGuard() as guard:
        nodes = []
        try:
            await start_real_nodes(nodes, 3, lambda i, initial: NodeConfig(
                run_id="it", seed=5, shard=(i, 3), device="cpu", initial_peers=initial, exchange_timeout_s=10.0,
                announce_ttl_s=20.0, local_steps=40, model_seed_mode="independent"))
            await wait_for_directory_peers(nodes, 2)
            distances = [_max_distance(nodes)]
            for _ in range(10):
                await asyncio.gather(*(n.run_round() for n in nodes))
                distances.append(_max_distance(nodes))
            accs = [n.last_report.accuracy for n in nodes]
            assert all(a is not None and a >= 0.85 for a in accs), accs
            # Independent initial models drift together: the largest pairwise distance shrinks.
            assert distances[-1] < 0.5 * distances[0], distances
            assert all(n.last_report.combined >= 2 for n in nodes)
            assert all(n.transport.stats.bytes_sent > 0 for n in nodes)
        finally:
            for n in nodes:
                await n.shutdown()
    assert not guard.leaked_processes, guard.leaked_processes


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_cli_swarm_survives_a_killed_node_and_stops_cleanly(tmp_path: Path) -> None:
    """`p2pnode run` + `p2pnode join`: one daemon is killed (-9) mid-run, the other two keep training,
    and SIGTERM stops them with exit code 0 and no p2pd left behind."""
    common = ["--run-id", "cli-it", "--min-round-time", "0.3", "--exchange-timeout", "3", "--device", "cpu"]
    daemons: list[Daemon] = []
    try:
        first = Daemon([*common, "--shard", "0/3", "--state-dir", str(tmp_path / "n0")])
        daemons.append(first)
        peer_id, maddrs, control = first.ready().groups()
        assert f"/p2p/{peer_id}" in maddrs
        assert re.fullmatch(r"127\.0\.0\.1:\d+", control)
        for i in (1, 2):
            d = Daemon([*common, "--shard", f"{i}/3", "--initial-peer", maddrs.split(",")[0],
                        "--state-dir", str(tmp_path / f"n{i}")])
            d.ready()
            daemons.append(d)
        _wait(lambda: all(d.rounds and d.rounds[-1]["peers"] == 2 for d in daemons), 60, "all to see 2 peers")
        victim = daemons[2]
        victim_pids = victim.group_pids()
        assert any(process_name(p) == "p2pd" for p in victim_pids)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        survivors = daemons[:2]
        at_kill = [d.round for d in survivors]
        _wait(lambda: all(d.round >= r + 5 for d, r in zip(survivors, at_kill, strict=True)), 90,
              "survivors to train 5 more rounds")
        status = subprocess.run([sys.executable, "-m", "p2pnode", "status", "--json", "--state-dir",
                                 str(tmp_path / "n0")], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        assert st["peer_id"] == peer_id and st["round"] >= at_kill[0] + 5 and st["peers"] >= 1
        assert st["bytes_sent"] > 0 and st["bytes_received"] > 0
        for d in survivors:
            pids = d.group_pids()
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(20) == 0, "".join(d.stderr[-30:])
            time.sleep(0.5)
            alive = [p for p in pids if os.path.exists(f"/proc/{p}") and process_name(p) != "?"]
            assert not [p for p in alive if process_name(p) == "p2pd"], "p2pd left behind after SIGTERM"
        assert all(d.rounds[-1]["accuracy"] >= 0.85 for d in survivors)
        # A clean stop removes the control file it wrote.
        assert not (tmp_path / "n0" / "control.json").exists()
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
