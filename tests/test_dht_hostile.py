"""Outsiders against the run directory: stores a stock hivemind DHT client can make, on real DHTs (127.0.0.1).

Each test reproduces one attack with an outside `hivemind.DHT` that joins the swarm and stores under the
run's key, then asserts that the nodes' DHT processes survive, that the honest peers stay visible, and that
the attack is counted.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import hivemind
import pytest
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from netutil import NetworkGuard, start_dht, start_dhts, stop_dhts
from p2pnode.discovery import msgpack_guard
from p2pnode.discovery.base import PeerInfo
from p2pnode.discovery.dht import DHTDirectory, directory_key

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

CONFIG = "cfg-hostile"
_runs = itertools.count()


def nested(depth: int) -> object:
    """A value of `depth` nested tuples: about 1 KB once serialized at depth 200."""
    value: object = ()
    for _ in range(depth):
        value = (value,)
    return value


@pytest.fixture(scope="module")
def swarm() -> Iterator[tuple[list[hivemind.DHT], hivemind.DHT]]:
    """Two honest DHTs and an outsider that bootstraps from them."""
    with NetworkGuard() as guard:
        dhts = start_dhts(2)
        try:
            maddrs = [str(a) for a in dhts[0].get_visible_maddrs()]
            outsider = start_dht(initial_peers=maddrs)
            dhts.append(outsider)
            yield dhts[:2], outsider
        finally:
            stop_dhts(dhts)
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


async def honest_directories(dhts: list[hivemind.DHT], run: str) -> tuple[list[DHTDirectory], list[str]]:
    dirs = [DHTDirectory(dht, run, CONFIG, ttl=30.0, read_timeout=3.0) for dht in dhts]
    ids = []
    for i, d in enumerate(dirs):
        pid = await d.peer_id()
        await d.announce(PeerInfo(peer_id=pid, maddrs=(f"/ip4/127.0.0.1/tcp/{4100 + i}/p2p/{pid}",), round=1,
                                  task="digits-mlp", config_hash=CONFIG, capabilities=("gossip",)))
        ids.append(pid)
    return dirs, ids


def test_guard_refuses_deep_nesting_that_would_crash_the_decoder() -> None:
    assert msgpack_guard.installed()
    deep = MSGPackSerializer.dumps(nested(200))
    assert len(deep) < 2048
    with pytest.raises(msgpack_guard.HostileMsgpack):
        msgpack_guard.check(deep)
    with pytest.raises(ValueError):
        MSGPackSerializer.loads(deep)
    # honest data, a few levels deep, decodes as before
    assert MSGPackSerializer.loads(MSGPackSerializer.dumps(nested(5))) == nested(5)


def test_a_deeply_nested_store_does_not_kill_the_dht(swarm: tuple[list[hivemind.DHT], hivemind.DHT]) -> None:
    dhts, outsider = swarm
    run = f"hostile-deep-{next(_runs)}"

    async def main() -> None:
        dirs, ids = await honest_directories(dhts, run)
        assert [p.peer_id for p in await dirs[0].peers()] == [ids[1]]
        expiration = get_dht_time() + 20
        outsider.store(directory_key(run), subkey="junk", value=nested(200), expiration_time=expiration)
        outsider.store(f"{run}/elsewhere", value=nested(200), expiration_time=expiration)
        await asyncio.sleep(0.5)
        assert all(dht.is_alive() for dht in dhts)
        for d, other in ((dirs[0], ids[1]), (dirs[1], ids[0])):
            assert [p.peer_id for p in await d.peers()] == [other]
        # the refusal is counted where it happened: in a DHT process, reported as dht_decoder_*
        refused = sum(n for d in dirs for reason, n in d.rejected.items() if reason.startswith("dht_"))
        assert refused >= 1, [d.rejected for d in dirs]

    asyncio.run(main())


def test_a_plain_value_at_the_run_key_does_not_empty_the_directory(
        swarm: tuple[list[hivemind.DHT], hivemind.DHT]) -> None:
    dhts, outsider = swarm
    run = f"hostile-plain-{next(_runs)}"

    async def main() -> None:
        dirs, ids = await honest_directories(dhts, run)
        assert [p.peer_id for p in await dirs[0].peers()] == [ids[1]]
        outsider.store(directory_key(run), value=b"not a dictionary", expiration_time=get_dht_time() + 25)
        await asyncio.sleep(0.3)
        # a new joiner, and the existing nodes, still see the honest peers
        joiner = DHTDirectory(dhts[1], run, CONFIG, ttl=30.0, read_timeout=3.0, peer_id="joiner")
        assert sorted(p.peer_id for p in await joiner.peers()) == sorted(ids)
        assert [p.peer_id for p in await dirs[0].peers()] == [ids[1]]
        refused = sum(n for d in [*dirs, joiner] for reason, n in d.rejected.items()
                      if "not_dictionary" in reason)
        assert refused >= 1, [d.rejected for d in dirs]

    asyncio.run(main())


def test_far_expirations_and_junk_subkeys_are_refused_and_counted_once(
        swarm: tuple[list[hivemind.DHT], hivemind.DHT]) -> None:
    dhts, outsider = swarm
    run = f"hostile-junk-{next(_runs)}"

    async def main() -> None:
        dirs, ids = await honest_directories(dhts, run)
        key = directory_key(run)
        ten_years = get_dht_time() + 10 * 365 * 86400
        outsider.store(key, subkey="far", value=b"\x0a\x03abc", expiration_time=ten_years)
        for i in range(200):
            outsider.store(key, subkey=f"junk{i}", value=b"\xff" * 40, expiration_time=get_dht_time() + 25,
                           return_future=True)
        await asyncio.sleep(1.0)
        first = [p.peer_id for p in await dirs[0].peers()]
        counted = sum(dirs[0].rejected.values())
        second = [p.peer_id for p in await dirs[0].peers()]
        assert first == second == [ids[1]]
        assert counted >= 100, dirs[0].rejected
        # a record is counted once however many reads see it (the DHT's own counts are copied, not added)
        local = {r: n for r, n in dirs[0].rejected.items() if not r.startswith("dht_")}
        assert sum(local.values()) <= 201, local
        assert all(dht.is_alive() for dht in dhts)

    asyncio.run(main())
