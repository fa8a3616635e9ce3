"""The DHT directory against outsiders: a stock hivemind DHT on 127.0.0.1 that joins the nodes' DHT and
stores hostile values directly (no code of ours on its side, except the decoder guard it inherits by
forking from this test process, which it never needs: it only encodes). Each attack is one that broke a
node before: the node's DHT process must survive, its directory keep returning the honest peers, and
the attack be counted."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import base58
import hivemind
import msgpack
import pytest
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from netutil import NetworkGuard, start_dht, stop_dhts
from p2pnode.discovery import msgpack_guard
from p2pnode.discovery.base import PeerInfo
from p2pnode.discovery.dht import DHTDirectory
from p2pnode.discovery.dht_process import dht_refusals, stored_subkeys
from p2pnode.discovery.quota import DEFAULT_MAX_SUBKEYS
from p2pnode.discovery.signing import signed_dht_options
from p2pnode.proto import peer_pb2

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

CONFIG = "cfg-a"
_runs = itertools.count()
TEN_YEARS_S = 10 * 365 * 24 * 3600.0


class Swarm:
    """Two nodes (signed identities, as the daemon runs them) and one outsider that joined them."""

    def __init__(self, nodes: list[hivemind.DHT], signers: list[object], outsider: hivemind.DHT) -> None:
        self.nodes, self.signers, self.outsider = nodes, signers, outsider


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    with NetworkGuard() as guard:
        tmp: Path = tmp_path_factory.mktemp("identities")
        options = [signed_dht_options(str(tmp / f"id{i}.key"), check_if_identity_free=False) for i in range(2)]
        dhts: list[hivemind.DHT] = []
        try:
            dhts.append(start_dht(**options[0]))
            maddrs = [str(a) for a in dhts[0].get_visible_maddrs()]
            dhts.append(start_dht(initial_peers=maddrs, **options[1]))
            # The outsider: a stock DHT, no validators, bootstrapped from the nodes' addresses.
            dhts.append(start_dht(initial_peers=maddrs))
            yield Swarm(dhts[:2], [o["record_validators"][0] for o in options], dhts[2])
        finally:
            stop_dhts(dhts)
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


def run_id() -> str:
    return f"hostile{next(_runs)}"


async def honest_directories(swarm: Swarm, run: str, *, signed: bool) -> list[DHTDirectory]:
    """One directory per node, each announced (which installs the run's validator in its DHT)."""
    dirs = [DHTDirectory(dht, run, CONFIG, signer=signer if signed else None, min_read_interval=0.0)  # type: ignore[arg-type]
            for dht, signer in zip(swarm.nodes, swarm.signers, strict=True)]
    for i, d in enumerate(dirs):
        pid = await d.peer_id()
        await d.announce(PeerInfo(peer_id=pid, maddrs=(f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/{pid}",),
                                  config_hash=CONFIG, capabilities=("gossip",)))
    return dirs


async def outsider_store(outsider: hivemind.DHT, key: str, value: object, expiration: float,
                         subkey: object = None, **kwargs: object) -> None:
    """The outsider stores one value through the stock API (whether any replica accepts it is its problem)."""
    await outsider.store(key, value, expiration_time=expiration, subkey=subkey, return_future=True, **kwargs)


async def _store_many(_dht: hivemind.DHT, node: object, key: str, subkeys: list[str], value: bytes,
                      expiration: float) -> None:
    """Runs in the outsider's DHT process: one stock `DHTNode.store_many` of many subkeys."""
    await node.store_many([key] * len(subkeys), [value] * len(subkeys), expiration,  # type: ignore[attr-defined]
                          subkeys=list(subkeys))


def nested_tuple(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = (value,)
    return value


async def refusals(dht: hivemind.DHT) -> dict[str, int]:
    return await dht.run_coroutine(dht_refusals, return_future=True)


async def held(dht: hivemind.DHT, key: str) -> int:
    """Live subkeys that `dht`'s node stores under `key`."""
    return await dht.run_coroutine(partial(stored_subkeys, key=key), return_future=True)


async def peer_ids(d: DHTDirectory) -> list[str]:
    return [p.peer_id for p in await d.peers()]


# ------------------------------------------------------------------------------------------ the decoder


def test_guard_refuses_deep_and_oversized_values_and_passes_honest_ones() -> None:
    assert msgpack_guard.installed()  # importing p2pnode.discovery.dht installed it
    for honest in (1, b"x" * 100_000, "s", [1, (2, [3, {"a": (4,)}])], {"k": [None, True, 1.5]}):
        assert MSGPackSerializer.loads(MSGPackSerializer.dumps(honest)) == honest
    before = sum(msgpack_guard.refusals.values())
    # A value of about 1 KB that, unguarded, crashes the process (segmentation fault in the decoder).
    deep = MSGPackSerializer.dumps(nested_tuple(200))
    assert len(deep) < 1024
    with pytest.raises(ValueError, match="deeper than 32"):
        MSGPackSerializer.loads(deep)
    at_limit: object = 0
    for _ in range(msgpack_guard.MAX_DEPTH):
        at_limit = [at_limit]
    assert MSGPackSerializer.loads(msgpack.packb(at_limit)) == at_limit
    with pytest.raises(ValueError, match="deeper"):
        MSGPackSerializer.loads(msgpack.packb([at_limit]))
    with pytest.raises(ValueError, match="exceeds the limit"):
        MSGPackSerializer.loads(msgpack.packb(b"x" * (msgpack_guard.MAX_BYTES + 1)))
    with pytest.raises(ValueError):
        MSGPackSerializer.loads(b"\xc1")
    assert sum(msgpack_guard.refusals.values()) == before + 4
    msgpack_guard.install()  # idempotent
    assert msgpack_guard.installed()


async def test_deep_values_do_not_crash_the_nodes(swarm: Swarm) -> None:
    """Depth-200 subkeys and values, under the run's key and under an unrelated key.

    A fresh outsider: the nodes' refusals make it drop them from its routing table, and the nodes drop
    it from theirs (its replies no longer decode), which the other tests must not inherit.
    """
    run = run_id()
    dirs = await honest_directories(swarm, run, signed=True)
    outsider = start_dht(initial_peers=[str(a) for a in swarm.nodes[0].get_visible_maddrs()])
    try:
        other = await dirs[1].peer_id()
        assert await peer_ids(dirs[0]) == [other]
        before = [await refusals(dht) for dht in swarm.nodes]
        deep, exp = nested_tuple(200), get_dht_time() + 30
        for key in (dirs[0].key, f"{run}/unrelated"):
            # Not on its own storage, which cannot hold str and tuple subkeys under one key.
            await outsider_store(outsider, key, b"value", exp, subkey=deep, exclude_self=True)
            await outsider_store(outsider, key, deep, exp, subkey="subkey", exclude_self=True)
        await asyncio.sleep(0.5)  # let every replica handle what it was sent
        assert all(dht.is_alive() for dht in swarm.nodes)
        for dht, was in zip(swarm.nodes, before, strict=True):
            now = await refusals(dht)
            # The deep subkey under the unrelated key reached the decoder guard; under the run's key the
            # record validator refused subkey and value before anything decoded them.
            assert now.get("dht_decoder_too_deep", 0) > was.get("dht_decoder_too_deep", 0)
            assert now.get("dht_refused_undecodable", 0) >= was.get("dht_refused_undecodable", 0) + 2
        # The nodes still serve gets and the directory still lists the honest peers.
        assert await peer_ids(dirs[0]) == [other]
        assert await peer_ids(dirs[1]) == [await dirs[0].peer_id()]
        assert dirs[0].rejected["dht_decoder_too_deep"] >= 1
        assert await swarm.nodes[1].store(f"{run}/honest", b"ok", get_dht_time() + 30, return_future=True)
        found = await swarm.nodes[0].get(f"{run}/honest", latest=True, return_future=True)
        assert found is not None and found.value == b"ok"
    finally:
        stop_dhts([outsider])
        await asyncio.gather(*(d.shutdown() for d in dirs))


# ------------------------------------------------------------------------------------------ the directory


async def test_undecodable_value_neither_hangs_nor_blinds_a_read(swarm: Swarm) -> None:
    """A value that hivemind cannot decode (an ext type with a broken payload) under the run's key.

    On the nodes (validator installed) the replicas refuse it and a read is as fast as ever. A reader
    whose DHT lacks the validator (here: over the outsider's own DHT) would wait forever; its deadline
    ends the read, counts a timeout and returns the last good view.
    """
    run = run_id()
    dirs = await honest_directories(swarm, run, signed=False)
    blind = DHTDirectory(swarm.outsider, run, CONFIG, read_timeout=1.0, validate_records=False,
                         min_read_interval=0.0)
    try:
        honest = sorted([await d.peer_id() for d in dirs])
        other = await dirs[1].peer_id()
        assert await peer_ids(blind) == honest
        broken = msgpack.ExtType(0x50, b"\xc1 not a dictionary")  # hivemind's DictionaryDHTValue code
        await outsider_store(swarm.outsider, dirs[0].key, broken, get_dht_time() + 30, subkey="Qm" + "x" * 44)
        t0 = time.monotonic()
        assert await peer_ids(dirs[0]) == [other]
        assert time.monotonic() - t0 < 1.0
        assert dirs[0].rejected["timeout"] == 0
        t0 = time.monotonic()
        assert await peer_ids(blind) == honest  # the last good view
        assert 1.0 <= time.monotonic() - t0 < 3.0
        assert blind.rejected["timeout"] == 1
        assert all(dht.is_alive() for dht in swarm.nodes)
    finally:
        await asyncio.gather(*(d.shutdown() for d in dirs))


async def test_plain_value_at_the_key_does_not_empty_the_directory(swarm: Swarm) -> None:
    """A plain value with a later expiration than the dictionary: hivemind lets it replace the whole
    dictionary. The nodes refuse it; a joiner still sees the peers; a reader that does find it counts
    ``not_dictionary`` once and keeps its last good view."""
    run = run_id()
    # Unsigned records: a stock DHT cannot strip signatures, so it could not read signed ones at all.
    dirs = await honest_directories(swarm, run, signed=False)
    blind = DHTDirectory(swarm.outsider, run, CONFIG, peer_id="Qm" + "y" * 44, validate_records=False,
                         min_read_interval=0.0)
    try:
        honest = sorted([await d.peer_id() for d in dirs])
        assert await peer_ids(blind) == honest
        await outsider_store(swarm.outsider, dirs[0].key, b"plain", get_dht_time() + 100)  # after the records
        for _ in range(2):
            assert await peer_ids(dirs[0]) == [await dirs[1].peer_id()]
            assert await peer_ids(blind) == honest
        assert blind.rejected["not_dictionary"] == 1  # once, however many reads see it
        joiner = DHTDirectory(swarm.nodes[1], run, CONFIG, min_read_interval=0.0)
        assert await peer_ids(joiner) == [await dirs[0].peer_id()]
        assert dirs[0].rejected["not_dictionary"] == 0
        assert (await refusals(swarm.nodes[0])).get("dht_refused_not_dictionary", 0) >= 1
    finally:
        await asyncio.gather(*(d.shutdown() for d in dirs))


async def test_expiration_years_ahead_is_refused(swarm: Swarm) -> None:
    run = run_id()
    dirs = await honest_directories(swarm, run, signed=False)
    blind = DHTDirectory(swarm.outsider, run, CONFIG, peer_id="Qm" + "z" * 44, validate_records=False,
                         min_read_interval=0.0)
    try:
        before = await refusals(swarm.nodes[0])
        fake = base58.b58encode(bytes([0x12, 0x20]) + bytes(range(32))).decode()
        record = peer_pb2.PeerRecord(peer_id=fake, config_hash=CONFIG).SerializeToString()
        await outsider_store(swarm.outsider, dirs[0].key, record, get_dht_time() + TEN_YEARS_S, subkey=fake)
        honest = sorted([await d.peer_id() for d in dirs])
        assert await peer_ids(dirs[0]) == [await dirs[1].peer_id()]
        after = await refusals(swarm.nodes[0])
        assert after.get("dht_refused_expired_too_far", 0) > before.get("dht_refused_expired_too_far", 0)
        # The outsider's replica holds it; a reader without the validator skips it, counted once.
        for _ in range(2):
            assert await peer_ids(blind) == honest
        assert blind.rejected["expired_too_far"] == 1
    finally:
        await asyncio.gather(*(d.shutdown() for d in dirs))


async def test_junk_subkeys_cost_bounded_work_and_are_counted_once(swarm: Swarm) -> None:
    """300 well-shaped junk records (peer-id-like subkeys, bytes that are no record), stored in one
    stock ``store_many``. They pass the replicas' validator; each read parses at most 64 new records, the
    known peers first, and each junk record is counted once."""
    run = run_id()
    dirs = await honest_directories(swarm, run, signed=False)
    reader = DHTDirectory(swarm.nodes[0], run, CONFIG, max_parse_per_read=64, min_read_interval=0.0)
    try:
        other = await dirs[1].peer_id()
        assert await peer_ids(reader) == [other]
        rng = random.Random(0)
        junk = [base58.b58encode(bytes([0x12, 0x20]) + rng.randbytes(32)).decode() for _ in range(300)]
        # Expiring after the honest records: first in line if known peers were not preferred.
        await swarm.outsider.run_coroutine(partial(_store_many, key=dirs[0].key, subkeys=junk, value=b"\xff" * 20,
                                                   expiration=get_dht_time() + 100), return_future=True)
        for i in range(6):
            t0 = time.monotonic()
            assert await peer_ids(reader) == [other]
            assert time.monotonic() - t0 < 3.0
            assert reader.rejected["undecodable"] == min(300, 64 * (i + 1))
        assert reader.rejected["over_budget"] == 300 - 64  # deferred once each, then parsed
        assert reader.invalid == 300
        assert await peer_ids(reader) == [other] and reader.invalid == 300  # nothing counted twice
        # A joiner has no known peers: it finds the honest one within a few reads.
        joiner = DHTDirectory(swarm.nodes[0], run, CONFIG, max_parse_per_read=64, min_read_interval=0.0)
        seen = [await peer_ids(joiner) for _ in range(6)]
        assert seen[-1] == [other] and joiner.invalid == 300
    finally:
        await asyncio.gather(*(d.shutdown() for d in dirs))



def junk_subkeys(count: int, seed: int) -> list[str]:
    """`count` peer-id-like subkeys (base58 sha2-256 multihashes of random bytes)."""
    rng = random.Random(seed)
    return [base58.b58encode(bytes([0x12, 0x20]) + rng.randbytes(32)).decode() for _ in range(count)]


async def _store_direct(_dht: hivemind.DHT, node: object, key: str, count: int, seed: int, value: bytes,
                        expiration: float, peers: list[str], batch: int = 500, timeout: float = 10.0) -> int:
    """Runs in the outsider's DHT process: store `junk_subkeys(count, seed)` straight at `peers` (the
    replicas), in batches of `batch`, each batch with a deadline; returns how many records they accepted.

    The subkeys are made here, not sent: hivemind's pipe to its DHT process breaks on a message larger
    than the pipe's buffer (the process reads it non-blocking and fails with EAGAIN halfway).
    """
    from hivemind.dht.routing import DHTID
    from hivemind.p2p import PeerID

    subkeys = junk_subkeys(count, seed)
    protocol = node.protocol  # type: ignore[attr-defined]
    key_id, value_bytes = DHTID.generate(source=key), protocol.serializer.dumps(value)
    stored = 0
    for peer in peers:
        for i in range(0, len(subkeys), batch):
            part = subkeys[i:i + batch]
            ok = await asyncio.wait_for(protocol.call_store(PeerID.from_base58(peer), [key_id] * len(part),
                                                            [value_bytes] * len(part), expiration,
                                                            subkeys=part), timeout)
            stored += sum(ok or [])
    return stored


async def test_three_thousand_junk_subkeys_do_not_slow_reads_and_are_counted_once(swarm: Swarm) -> None:
    """3,000 junk subkeys stored straight at both replicas, then stored again with a later expiration.
    Each replica keeps at most `DEFAULT_MAX_SUBKEYS` subkeys under the run's key (the honest records and
    the first junk), refuses the rest (``dht_refused_over_quota``), and lets the stored junk be refreshed.
    Reads are shared, rate-limited and made in the background: 200 `peers` calls (50 at once, then one
    after another) cost one read from the DHT and return the honest peer; the junk is counted once, and
    not again once re-stored."""
    run = run_id()
    dirs = await honest_directories(swarm, run, signed=False)
    reader = DHTDirectory(swarm.nodes[0], run, CONFIG, max_parse_per_read=4096, min_read_interval=1.0)
    try:
        other = await dirs[1].peer_id()
        assert await peer_ids(reader) == [other]
        replicas = [await d.peer_id() for d in dirs]
        room = DEFAULT_MAX_SUBKEYS - 2  # the two honest records are in already
        before = [(await refusals(dht)).get("dht_refused_over_quota", 0) for dht in swarm.nodes]

        async def store_junk(expiration: float) -> None:
            stored = await swarm.outsider.run_coroutine(
                partial(_store_direct, key=dirs[0].key, count=3000, seed=1, value=b"\xff" * 20,
                        expiration=expiration, peers=replicas), return_future=True)
            assert stored == 2 * room  # each replica took junk up to its quota, the first 510 subkeys
            for dht in swarm.nodes:
                assert await held(dht, dirs[0].key) == DEFAULT_MAX_SUBKEYS

        await store_junk(get_dht_time() + 60)
        refused = [(await refusals(dht))["dht_refused_over_quota"] - b for dht, b in zip(swarm.nodes, before,
                                                                                           strict=True)]
        assert refused == [3000 - room] * 2
        await asyncio.sleep(1.0)  # past the interval: the next call reads
        reads = reader.reads
        t0 = time.monotonic()
        results = await asyncio.gather(*(peer_ids(reader) for _ in range(50)))
        results += [await peer_ids(reader) for _ in range(150)]
        elapsed = time.monotonic() - t0
        assert all(r == [other] for r in results)
        assert reader.reads - reads == 1, "the calls within the interval share one read"
        assert elapsed < 5.0, "no call waited for the read (it runs in the background)"
        assert [p.peer_id for p in await reader.refresh()] == [other]  # the read the first call started
        assert reader.reads - reads == 1
        assert reader.rejected["undecodable"] == room and reader.invalid == room
        # The same junk again with a fresh expiration: the stored junk is refreshed (a stored subkey always
        # passes), the rest refused again; the same records, not counted again by the reader.
        await store_junk(get_dht_time() + 80)
        assert [p.peer_id for p in await reader.refresh()] == [other]
        assert reader.reads - reads == 2
        assert reader.rejected["undecodable"] == room and reader.invalid == room
        assert reader.rejected["dht_refused_over_quota"] >= 2 * (3000 - room)  # the DHT process's count
    finally:
        await asyncio.gather(*(d.shutdown() for d in dirs))


async def test_a_full_key_keeps_its_honest_records_and_frees_room_as_junk_expires(swarm: Swarm) -> None:
    """A quota of 40 subkeys per replica, and 2,000 junk subkeys from a stock DHT: each replica stores 40
    (the 2 honest records among them) and counts the rest; the honest peers re-store their records while
    the key is full and stay listed; a new record is refused until the junk expires, then it gets in."""
    run = run_id()
    dirs = [DHTDirectory(dht, run, CONFIG, min_read_interval=0.0, max_subkeys=40) for dht in swarm.nodes]
    try:
        for i, d in enumerate(dirs):
            pid = await d.peer_id()
            await d.announce(PeerInfo(peer_id=pid, maddrs=(f"/ip4/127.0.0.1/tcp/{4100 + i}/p2p/{pid}",),
                                      config_hash=CONFIG, capabilities=("gossip",)))
        replicas = [await d.peer_id() for d in dirs]
        stored = await swarm.outsider.run_coroutine(
            partial(_store_direct, key=dirs[0].key, count=2000, seed=2, value=b"\xff" * 20,
                    expiration=get_dht_time() + 4, peers=replicas), return_future=True)
        t_junk = get_dht_time()
        assert stored == 2 * 38
        for dht in swarm.nodes:
            assert await held(dht, dirs[0].key) == 40
        # The honest peers re-store their own subkeys on the full key: always accepted.
        for d in dirs:
            await d.publisher.store(d.publisher.info)  # type: ignore[arg-type]
        assert sorted([await peer_ids(dirs[0]), await peer_ids(dirs[1])]) == sorted([[replicas[1]], [replicas[0]]])
        # A newcomer's record (stored at both replicas from outside) cannot get in while the key is full ...
        newcomer = junk_subkeys(1, 99)[0]
        record = PeerInfo(peer_id=newcomer, maddrs=("/ip4/127.0.0.1/tcp/4199",), config_hash=CONFIG).to_proto()

        async def newcomer_stores() -> None:
            await outsider_store(swarm.outsider, dirs[0].key, record.SerializeToString(), get_dht_time() + 30,
                                 subkey=newcomer, exclude_self=True)

        await newcomer_stores()
        assert [await held(dht, dirs[0].key) for dht in swarm.nodes] == [40, 40]
        # ... and once the junk has expired there is room again: its next store lands on both.
        await asyncio.sleep(max(0.0, t_junk + 4.5 - get_dht_time()))
        assert [await held(dht, dirs[0].key) for dht in swarm.nodes] == [2, 2]
        await newcomer_stores()
        assert [await held(dht, dirs[0].key) for dht in swarm.nodes] == [3, 3]
        assert newcomer in await peer_ids(dirs[0])
        for dht in swarm.nodes:
            assert (await refusals(dht))["dht_refused_over_quota"] >= 2000 - 38
    finally:
        await asyncio.gather(*(d.shutdown() for d in dirs))
