"""The identity key in the state dir (same peer id across restarts) and the state dir lock."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from daemonutil import Daemon

from p2pnode.daemon.identity import (
    IDENTITY_MODE,
    SECAGG_KEY_FILE,
    IdentityError,
    StateDirLock,
    load_or_create_identity,
    load_or_create_secagg_key,
    secagg_key_path,
)
from p2pnode.daemon.statedir import StateDirError
from p2pnode.secagg import keys


def test_identity_is_created_once_owner_only_and_stable(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path / "state")
    assert first.created and first.path.name == "identity.key"
    assert stat.S_IMODE(first.path.stat().st_mode) == IDENTITY_MODE
    again = load_or_create_identity(tmp_path / "state")
    assert (again.peer_id, again.created) == (first.peer_id, False)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["identity.key"]  # no temporary file
    other = load_or_create_identity(tmp_path / "other")
    assert other.peer_id != first.peer_id


def test_loose_permissions_are_tightened(tmp_path: Path) -> None:
    key = load_or_create_identity(tmp_path).path
    os.chmod(key, 0o644)
    load_or_create_identity(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == IDENTITY_MODE


def test_damaged_identity_is_refused_not_replaced(tmp_path: Path) -> None:
    key = load_or_create_identity(tmp_path).path
    os.chmod(key, 0o600)
    key.write_bytes(key.read_bytes()[:40])
    with pytest.raises(IdentityError, match="damaged"):
        load_or_create_identity(tmp_path)
    assert len(key.read_bytes()) == 40  # the user decides: a new key means a new peer id


def test_secagg_key_is_created_once_owner_only_and_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    load_or_create_identity(state)
    first = load_or_create_secagg_key(state)
    path = secagg_key_path(state)
    assert path.name == SECAGG_KEY_FILE and stat.S_IMODE(path.stat().st_mode) == IDENTITY_MODE
    assert sorted(p.name for p in state.iterdir()) == ["identity.key", "secagg.key"]  # no temporary file
    # A restart reads the same key: peers that learnt it from this node's record can still verify it.
    again = load_or_create_secagg_key(state)
    assert keys.public_identity_key(again) == keys.public_identity_key(first)
    payload = b"advertised keys"
    assert keys.verify(keys.public_identity_key(first), keys.sign(again, payload), payload)
    assert keys.public_identity_key(load_or_create_secagg_key(tmp_path / "other")) != keys.public_identity_key(first)
    os.chmod(path, 0o644)
    load_or_create_secagg_key(state)
    assert stat.S_IMODE(path.stat().st_mode) == IDENTITY_MODE


def test_damaged_secagg_key_is_refused_not_replaced(tmp_path: Path) -> None:
    load_or_create_secagg_key(tmp_path)
    path = secagg_key_path(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(b"\x01" * 16)
    with pytest.raises(IdentityError, match="damaged"):
        load_or_create_secagg_key(tmp_path)
    assert path.read_bytes() == b"\x01" * 16


_HOLDER = textwrap.dedent("""
    import sys, time
    from p2pnode.daemon.identity import StateDirLock
    StateDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_state_dir_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    lock = StateDirLock(tmp_path).acquire()
    with pytest.raises(StateDirError, match="another node of this process"):
        StateDirLock(tmp_path).acquire()
    lock.release()

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateDirError, match=rf"another node \(pid {holder.pid}\) is running"):
            StateDirLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with StateDirLock(tmp_path) as again:  # the kernel released the dead holder's lock
            assert again.held
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.network
@pytest.mark.slow
def test_restart_after_kill_keeps_the_peer_id_and_a_second_daemon_is_refused(tmp_path: Path) -> None:
    """B joins A; B is killed (-9) and restarted with the same state dir: same peer id, and p2pd's check
    that the identity is not in use passes. A second daemon on B's state dir is refused at once."""
    common = ["--run-id", "ident", "--device", "cpu", "--min-round-time", "0.5"]
    daemons: list[Daemon] = []
    try:
        a = Daemon([*common, "--state-dir", str(tmp_path / "a")])
        daemons.append(a)
        _, maddrs, _ = a.ready().groups()
        b_args = [*common, "--state-dir", str(tmp_path / "b"), "--initial-peer", maddrs.split(",")[0]]
        b = Daemon(b_args)
        daemons.append(b)
        b_id = b.ready().group(1)
        assert b_id == load_or_create_identity(tmp_path / "b").peer_id
        time.sleep(1.0)
        os.killpg(b.proc.pid, signal.SIGKILL)
        b.proc.wait(10)
        again = Daemon(b_args)
        daemons.append(again)
        assert again.ready(timeout=90).group(1) == b_id

        second = subprocess.run([sys.executable, "-m", "p2pnode", "run", *b_args], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 3, second.stderr
        assert "another node" in second.stderr and str(tmp_path / "b") in second.stderr
        assert again.proc.poll() is None  # the running one is untouched
        for d in (again, a):
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(30) == 0, "".join(d.stderr[-20:])
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
