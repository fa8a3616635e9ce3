"""The in-memory peer directory: run scoping, config-hash filtering, expiry on the virtual clock."""

from __future__ import annotations

import asyncio

import pytest

from p2pnode.discovery.base import PeerInfo
from p2pnode.discovery.memory import MemoryDirectory, MemoryRegistry
from p2pnode.transport.clock import run_virtual


def directory(reg: MemoryRegistry, peer: str, *, run: str = "run", config: str = "h1",
              ttl_s: float = 30.0) -> MemoryDirectory:
    return MemoryDirectory(reg, peer_id=peer, run_id=run, config_hash=config, ttl_s=ttl_s)


def test_peers_are_sorted_exclude_self_and_carry_the_announcement() -> None:
    async def main() -> None:
        reg = MemoryRegistry()
        dirs = {p: directory(reg, p) for p in ("c", "a", "b")}
        await asyncio.sleep(5.0)
        for p, d in dirs.items():
            await d.announce(PeerInfo(peer_id=p, round=3, task="mnist", capabilities=("gossip",)))
        peers = await dirs["b"].peers()
        assert [p.peer_id for p in peers] == ["a", "c"]
        assert peers[0] == PeerInfo(peer_id="a", round=3, task="mnist", config_hash="h1",
                                    capabilities=("gossip",), timestamp=5.0)
        assert dirs["b"].mismatched == 0 and dirs["b"].invalid == 0

    run_virtual(main())


def test_other_config_hash_is_excluded_and_counted() -> None:
    async def main() -> None:
        reg = MemoryRegistry()
        a, b, c = directory(reg, "a"), directory(reg, "b"), directory(reg, "c", config="h2")
        for d in (a, b, c):
            await d.announce(PeerInfo(peer_id=d.peer_id))
        assert [p.peer_id for p in await a.peers()] == ["b"]
        assert a.mismatched == 1
        await a.peers()
        assert a.mismatched == 2  # a cumulative counter
        assert [p.peer_id for p in await c.peers()] == []
        assert c.mismatched == 2

    run_virtual(main())


def test_runs_are_separate() -> None:
    async def main() -> None:
        reg = MemoryRegistry()
        a, b = directory(reg, "a", run="r1"), directory(reg, "b", run="r2")
        await a.announce(PeerInfo(peer_id="a"))
        await b.announce(PeerInfo(peer_id="b"))
        assert await a.peers() == [] and await b.peers() == []
        assert a.mismatched == 0

    run_virtual(main())


def test_records_expire_unless_refreshed() -> None:
    async def main() -> None:
        reg = MemoryRegistry()
        a, b, c = (directory(reg, p, ttl_s=10.0) for p in "abc")
        for d in (a, b, c):
            await d.announce(PeerInfo(peer_id=d.peer_id))
        await asyncio.sleep(6.0)
        await b.announce(PeerInfo(peer_id="b", round=1))  # b keeps refreshing, c has crashed
        await asyncio.sleep(4.0)  # t = 10: c's record expires exactly now
        assert [(p.peer_id, p.round, p.timestamp) for p in await a.peers()] == [("b", 1, 6.0)]
        await asyncio.sleep(6.0)  # t = 16: b's refresh has run out too
        assert await a.peers() == []
        assert reg.live("run") == []

    run_virtual(main())


def test_withdraw_and_shutdown_remove_the_record() -> None:
    async def main() -> None:
        reg = MemoryRegistry()
        a, b, c = (directory(reg, p) for p in "abc")
        for d in (a, b, c):
            await d.announce(PeerInfo(peer_id=d.peer_id))
        await b.withdraw()
        await c.shutdown()
        assert await a.peers() == []
        await b.withdraw()  # idempotent

    run_virtual(main())


def test_announce_checks_identity_and_config() -> None:
    async def main() -> None:
        a = directory(MemoryRegistry(), "a")
        with pytest.raises(ValueError, match="announces 'a'"):
            await a.announce(PeerInfo(peer_id="b"))
        with pytest.raises(ValueError, match="config hash"):
            await a.announce(PeerInfo(peer_id="a", config_hash="other"))
        await a.announce(PeerInfo(peer_id="a", config_hash="h1"))

    run_virtual(main())


def test_invalid_records_are_excluded_and_counted() -> None:
    async def main() -> None:
        reg = MemoryRegistry()
        a = directory(reg, "a")
        reg.put("run", PeerInfo(peer_id="x", config_hash="h1", round=-4), ttl_s=10)
        reg.put("run", PeerInfo(peer_id="y", config_hash="h1", timestamp=float("nan")), ttl_s=10)
        reg.put("run", PeerInfo(peer_id="w", config_hash="h1", secagg_key=b"short"), ttl_s=10)
        reg.put("run", PeerInfo(peer_id="z", config_hash="h1", secagg_key=bytes(32)), ttl_s=10)
        assert [p.peer_id for p in await a.peers()] == ["z"]
        assert a.invalid == 3

    run_virtual(main())


def test_registry_with_an_explicit_clock() -> None:
    t = [100.0]
    reg = MemoryRegistry(clock=lambda: t[0])
    reg.put("run", PeerInfo(peer_id="a"), ttl_s=5.0)
    assert [p.peer_id for p in reg.live("run")] == ["a"]
    t[0] = 105.0
    assert reg.live("run") == []
    with pytest.raises(ValueError, match="ttl_s"):
        reg.put("run", PeerInfo(peer_id="a"), ttl_s=0)
    with pytest.raises(ValueError, match="ttl_s"):
        MemoryDirectory(reg, peer_id="a", run_id="run", config_hash="h", ttl_s=-1)


def test_the_secagg_key_travels_in_the_record_and_the_directory_says_whether_it_is_bound() -> None:
    async def main() -> None:
        reg = MemoryRegistry()
        a, b = directory(reg, "a"), directory(reg, "b")
        await b.announce(PeerInfo(peer_id="b", secagg_key=b"\x07" * 32))
        assert [p.secagg_key for p in await a.peers()] == [b"\x07" * 32]
        # The registry stands for signed records; an unsigned directory is modelled explicitly.
        assert a.authenticated
        assert not MemoryDirectory(reg, peer_id="c", run_id="run", config_hash="h1", authenticated=False).authenticated
        assert PeerInfo.from_proto(PeerInfo(peer_id="b", secagg_key=b"\x07" * 32).to_proto()).secagg_key == b"\x07" * 32

    run_virtual(main())
