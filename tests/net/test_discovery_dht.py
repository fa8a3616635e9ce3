"""DHTDirectory over three real hivemind DHTs on 127.0.0.1 (two bootstrapped from the first)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
from hivemind.utils.timed_storage import get_dht_time

from netutil import NetworkGuard, start_dht, start_dhts, stop_dhts
from p2pnode.discovery.base import PeerInfo
from p2pnode.discovery.dht import DHTDirectory
from p2pnode.discovery.signing import peer_id_of_public_key, signed_dht_options
from p2pnode.proto import peer_pb2

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

CONFIG = "cfg-a"
_runs = itertools.count()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[hivemind.DHT, dict]]]:
    """Three DHTs whose libp2p identities are RSA keys, with the record signature validator installed."""
    with NetworkGuard() as guard:
        tmp: Path = tmp_path_factory.mktemp("identities")
        options = [signed_dht_options(str(tmp / f"id{i}.key"), check_if_identity_free=False)
                   for i in range(3)]
        dhts = start_dhts(1, **options[0])
        try:
            maddrs = [str(a) for a in dhts[0].get_visible_maddrs()]
            for opts in options[1:]:
                dhts.append(start_dht(initial_peers=maddrs, **opts))
            yield list(zip(dhts, options, strict=True))
        finally:
            stop_dhts(dhts)
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


def directories(swarm: list[tuple[hivemind.DHT, dict]], run: str, *, signed: bool = True, ttl: float = 60.0,
                config: str = CONFIG) -> list[DHTDirectory]:
    return [DHTDirectory(dht, run, config, ttl=ttl, signer=opts["record_validators"][0] if signed else None,
                         min_read_interval=0.0)
            for dht, opts in swarm]


async def announce_all(dirs: list[DHTDirectory], **fields: object) -> list[PeerInfo]:
    infos = []
    for i, d in enumerate(dirs):
        pid = await d.peer_id()
        info = PeerInfo(peer_id=pid, maddrs=(f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/{pid}",), round=i,
                        task="mnist", config_hash=d.config_hash, capabilities=("gossip",),
                        **fields)  # type: ignore[arg-type]
        await d.announce(info)
        infos.append(info)
    return infos


async def shutdown_all(dirs: list[DHTDirectory]) -> None:
    await asyncio.gather(*(d.shutdown() for d in dirs))


def run_id() -> str:
    return f"run{next(_runs)}"


async def test_peer_ids_match_the_identity_keys(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    for dht, opts in swarm:
        ssh_key = opts["record_validators"][0].local_public_key[len(b"[owner:"):-1]
        assert peer_id_of_public_key(ssh_key) == dht.peer_id.to_base58()


async def test_routing_peers_are_the_other_dht_nodes(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    # What the connection guard exempts as the DHT's own peers: the others of the swarm, never itself.
    dirs = directories(swarm, run_id())
    try:
        ids = [dht.peer_id.to_base58() for dht, _ in swarm]
        peers = set(await dirs[0].routing_peers())
        assert peers == set(ids[1:])
    finally:
        await shutdown_all(dirs)


@pytest.mark.parametrize("signed", [True, False])
async def test_each_peer_sees_the_other_two(swarm: list[tuple[hivemind.DHT, dict]], signed: bool) -> None:
    dirs = directories(swarm, run_id(), signed=signed)
    try:
        infos = await announce_all(dirs, secagg_key=bytes(range(32)))
        for i, d in enumerate(dirs):
            # Only signed records bind what they claim (the secagg key among it) to their peer id.
            assert d.authenticated is signed
            seen = await d.peers()
            expected = sorted((info for j, info in enumerate(infos) if j != i), key=lambda p: p.peer_id)
            assert [p.peer_id for p in seen] == [p.peer_id for p in expected]
            for got, want in zip(seen, expected, strict=True):
                assert (got.maddrs, got.round, got.task, got.capabilities, got.config_hash, got.secagg_key) == (
                    want.maddrs, want.round, want.task, want.capabilities, want.config_hash, want.secagg_key)
                assert got.timestamp > 0
            assert d.invalid == 0 and d.mismatched == 0
    finally:
        await shutdown_all(dirs)


async def test_mismatched_config_is_excluded_and_counted(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    run = run_id()
    dirs = directories(swarm, run)[:2]
    other = DHTDirectory(swarm[2][0], run, "cfg-b", signer=swarm[2][1]["record_validators"][0],
                         min_read_interval=0.0)
    try:
        await announce_all([*dirs, other])
        for d, friend in ((dirs[0], dirs[1]), (dirs[1], dirs[0])):
            assert [p.peer_id for p in await d.peers()] == [await friend.peer_id()]
            assert d.mismatched == 1
        assert await other.peers() == []  # it sees two peers of another config
        assert other.mismatched == 2
    finally:
        await shutdown_all([*dirs, other])


async def test_withdrawn_peer_disappears_and_can_return(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    dirs = directories(swarm, run_id())
    try:
        infos = await announce_all(dirs)
        assert len(await dirs[0].peers()) == 2
        await dirs[2].withdraw()
        assert [p.peer_id for p in await dirs[0].peers()] == [infos[1].peer_id]
        assert [p.peer_id for p in await dirs[1].peers()] == [infos[0].peer_id]
        await dirs[2].announce(infos[2])
        assert len(await dirs[0].peers()) == 2
        await dirs[1].shutdown()  # leaving withdraws too
        assert [p.peer_id for p in await dirs[0].peers()] == [infos[2].peer_id]
        assert dirs[0].invalid == 0
    finally:
        await shutdown_all(dirs)


async def test_records_refresh_and_expire(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    dirs = directories(swarm, run_id(), ttl=1.5)
    try:
        await dirs[1].start()  # refreshes every 0.5 s
        infos = await announce_all(dirs[1:])  # dirs[2] announces but never refreshes (as if it crashed)
        first = {p.peer_id: p.timestamp for p in await dirs[0].peers()}
        assert set(first) == {infos[0].peer_id, infos[1].peer_id}
        await asyncio.sleep(2.5)
        later = await dirs[0].peers()
        assert [p.peer_id for p in later] == [infos[0].peer_id]
        assert later[0].timestamp > first[infos[0].peer_id]
        assert dirs[1].refreshes >= 3
    finally:
        await shutdown_all(dirs)


async def test_invalid_and_forged_records_are_skipped(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    run = run_id()
    dirs = directories(swarm, run)
    unsigned = DHTDirectory(swarm[2][0], run, CONFIG, min_read_interval=0.0)
    try:
        infos = await announce_all(dirs[:2])
        key = dirs[0].key
        exp = get_dht_time() + 30
        dht2 = swarm[2][0]
        # An unsigned record (valid protobuf) is refused by signed readers.
        await unsigned.announce(PeerInfo(peer_id=await unsigned.peer_id(), config_hash=CONFIG))
        # Garbage bytes under a subkey signed by their owner.
        own_subkey = await dirs[2].subkey()
        assert await dht2.store(key, b"\xff\x00garbage", exp, subkey=own_subkey, return_future=True)
        seen = await dirs[0].peers()
        assert [p.peer_id for p in seen] == [infos[1].peer_id]
        assert dirs[0].invalid == 2
        # A record whose peer id differs from its owner's id.
        rec = peer_pb2.PeerRecord(peer_id=infos[1].peer_id, config_hash=CONFIG).SerializeToString()
        assert await dht2.store(key, rec, exp + 1, subkey=own_subkey, return_future=True)
        assert [p.peer_id for p in await dirs[0].peers()] == [infos[1].peer_id]
        assert dirs[0].invalid == 3  # each record counts once: the unsigned one was counted by the first read
        assert dirs[0].rejected["mismatched"] == 1
        # A signed record whose secagg key is not a 32-byte Ed25519 public key.
        rec = peer_pb2.PeerRecord(peer_id=await dirs[2].peer_id(), config_hash=CONFIG,
                                  secagg_key=b"\x01" * 31).SerializeToString()
        assert await dht2.store(key, rec, exp + 2, subkey=own_subkey, return_future=True)
        assert [p.peer_id for p in await dirs[0].peers()] == [infos[1].peer_id]
        assert dirs[0].invalid == 4
        assert dirs[0].rejected["bad_record"] == 2 and dirs[0].rejected["undecodable"] == 1
        # Peer 2 cannot overwrite or tombstone peer 1's signed record: every DHT node refuses it.
        victim_subkey = await dirs[1].subkey()
        assert not await dht2.store(key, b"", exp + 100, subkey=victim_subkey, return_future=True)
        assert [p.peer_id for p in await dirs[2].peers()] == sorted([infos[0].peer_id, infos[1].peer_id])
        # An unsigned reader skips owner-marked subkeys (it cannot check them); only it announced unsigned.
        assert await unsigned.peers() == []
    finally:
        await shutdown_all([*dirs, unsigned])


async def test_announce_checks_the_peer_id(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    d = directories(swarm, run_id())[0]
    with pytest.raises(ValueError):
        await d.announce(PeerInfo(peer_id="someone-else", config_hash=CONFIG))
    await d.shutdown()


async def test_rate_limited_reads_and_round_announcements(swarm: list[tuple[hivemind.DHT, dict]]) -> None:
    """With ``min_read_interval``: `peers` answers from the last read within the interval and refreshes in
    the background after it; an announcement that only moves the round on is stored in the background, at
    most once a second, and a reader sees the latest round afterwards."""
    run = run_id()
    dirs = [DHTDirectory(dht, run, CONFIG, signer=opts["record_validators"][0], min_read_interval=0.5)
            for dht, opts in swarm[:2]]
    try:
        infos = await announce_all(dirs)
        assert [p.peer_id for p in await dirs[0].peers()] == [infos[1].peer_id]  # the first read is waited for
        reads = dirs[0].reads
        for _ in range(20):
            assert [p.peer_id for p in await dirs[0].peers()] == [infos[1].peer_id]
        assert dirs[0].reads == reads  # within the interval: no read
        t0 = time.monotonic()
        for r in range(1, 11):  # ten rounds in quick succession
            await dirs[1].announce(dataclasses.replace(infos[1], round=r))
        assert time.monotonic() - t0 < 0.5, "no announcement of a round waited for a store"
        deadline = time.monotonic() + 10
        while True:
            seen = {p.peer_id: p.round for p in await dirs[0].refresh()}
            if seen.get(infos[1].peer_id) == 10 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert seen == {infos[1].peer_id: 10}
    finally:
        await shutdown_all(dirs)
