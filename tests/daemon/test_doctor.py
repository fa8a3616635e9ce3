"""`p2pnode doctor` against a real local node, against nothing, and on synthetic results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from daemonutil import Daemon

from p2pnode.cli.doctor import _judge, check_state_dir, doctor
from p2pnode.daemon.identity import load_or_create_identity

NAMES = ["p2pd", "initial peers", "reachability", "clock", "gpu", "state dir", "identity"]


def _run(*args: str) -> Result:
    """`p2pnode doctor ARGS` in this process (for checks that start no DHT process)."""
    return CliRunner().invoke(doctor, list(args), catch_exceptions=False)


def _run_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`p2pnode doctor ARGS` in a process of its own, as a user runs it. Checks that start a DHT run there:
    hivemind forks the DHT process, and a fork of the test process would inherit the grpc objects of
    earlier tests."""
    code = "from p2pnode.cli.doctor import doctor; doctor()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180)


def _statuses(stdout: str) -> dict[str, str]:
    return {c["name"]: c["status"] for c in json.loads(stdout)}


@pytest.mark.network
@pytest.mark.slow
def test_doctor_against_a_running_node(tmp_path: Path) -> None:
    state = tmp_path / "node"
    d = Daemon(["--state-dir", str(state), "--device", "cpu", "--min-round-time", "0.5"])
    try:
        peer_id, maddrs, _ = d.ready().groups()
        text = _run_process("--initial-peer", maddrs.split(",")[0], "--state-dir", str(state))
        assert text.returncode == 0, text.stdout + text.stderr
        lines = text.stdout.splitlines()
        for name in NAMES:  # every check is reported, in order
            assert any(line[6:].startswith(name) for line in lines), (name, text.stdout)
        assert lines[-1] == "7 checks: none failed"
        as_json = _run_process(maddrs.split(",")[0], "--state-dir", str(state), "--json")
        assert as_json.returncode == 0
        checks = {c["name"]: c for c in json.loads(as_json.stdout)}
        assert list(checks) == NAMES
        for name in ("p2pd", "initial peers", "reachability", "clock", "state dir", "identity"):
            assert checks[name]["status"] == "ok", checks[name]
        assert checks["initial peers"]["detail"].startswith("1 of 1 answered")
        assert abs(next(iter(checks["clock"]["data"]["skew_s"].values()))) < 1.0
        assert checks["identity"]["data"]["peer_id"] == peer_id  # the daemon's own key
        assert checks["gpu"]["status"] in ("ok", "warn")
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(30)


@pytest.mark.network
def test_doctor_with_a_dead_peer_fails_and_says_what_to_do(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)  # a real peer id that nobody runs
    result = _run_process("--initial-peer", f"/ip4/127.0.0.1/tcp/9/p2p/{identity.peer_id}", "--state-dir",
                          str(tmp_path / "s"), "--timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  initial peers" in result.stdout and "fix: check the addresses" in result.stdout
    statuses = _statuses(_run("--initial-peer", "/ip4/127.0.0.1/tcp/9", "--state-dir", str(tmp_path / "s"),
                              "--json").stdout)
    assert statuses["initial peers"] == "fail"  # no /p2p/<peer id>
    assert statuses["reachability"] == statuses["clock"] == "skip"


@pytest.mark.network
def test_doctor_without_peers_skips_the_network_checks_and_says_why(tmp_path: Path) -> None:
    result = _run("--state-dir", str(tmp_path / "new"), "--json")
    assert result.exit_code == 0
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["p2pd"]["status"] == "ok"
    for name in ("initial peers", "reachability", "clock"):
        assert checks[name]["status"] == "skip" and "no initial peer given" in checks[name]["detail"]
    assert checks["identity"]["status"] == "skip" and "first start creates" in checks["identity"]["detail"]


def test_state_dir_and_identity_checks(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert check_state_dir(tmp_path / "file")[0].status == "fail"
    identity = load_or_create_identity(tmp_path / "s")
    checks = {c.name: c for c in check_state_dir(tmp_path / "s")}
    assert checks["state dir"].status == "ok" and checks["identity"].status == "ok"
    assert identity.peer_id in checks["identity"].detail
    os.chmod(identity.path, 0o644)
    loose = {c.name: c for c in check_state_dir(tmp_path / "s")}["identity"]
    assert loose.status == "warn" and "chmod 400" in loose.fix
    os.chmod(identity.path, 0o600)
    identity.path.write_bytes(b"\x08\x00garbage")
    damaged = {c.name: c for c in check_state_dir(tmp_path / "s")}["identity"]
    assert damaged.status == "fail" and "damaged" in damaged.detail


def _answer(skew: float, available: bool = True) -> dict[str, object]:
    return {"answered": True, "available": available, "peer_time": 1000.0 + skew, "sent": 999.99, "received": 1000.01}


def test_judging_reachability_and_clock() -> None:
    public_peer = "/ip4/8.8.8.8/tcp/4001/p2p/QmPeer"
    lan_peer = "/ip4/192.168.1.5/tcp/4001/p2p/QmPeer"
    private_self = ["/ip4/192.168.1.7/tcp/4002/p2p/QmMe"]
    checks = {c.name: c for c in _judge({lan_peer: _answer(0.2)}, [], private_self)}
    assert checks["reachability"].status == "ok" and "same private network" in checks["reachability"].detail
    assert checks["clock"].status == "ok"
    checks = {c.name: c for c in _judge({public_peer: _answer(0.0)}, [], private_self)}
    assert checks["reachability"].status == "warn" and "relay" in checks["reachability"].detail
    assert "forward" in checks["reachability"].fix
    checks = {c.name: c for c in _judge({public_peer: _answer(0.0)}, [], ["/ip4/1.2.3.4/tcp/4002"])}
    assert checks["reachability"].status == "ok"
    checks = {c.name: c for c in _judge({lan_peer: _answer(0.0, available=False)}, [], private_self)}
    assert checks["reachability"].status == "fail"
    assert {c.name: c for c in _judge({lan_peer: _answer(2.0)}, [], private_self)}["clock"].status == "warn"
    late = {c.name: c for c in _judge({lan_peer: _answer(-7.5)}, [], private_self)}["clock"]
    assert late.status == "fail" and "-7.5" in late.detail and "timedatectl" in late.fix
    silent = {c.name: c for c in _judge({lan_peer: {"answered": False, "error": "timeout"}}, [], private_self)}
    assert silent["initial peers"].status == "fail" and silent["clock"].status == "skip"
