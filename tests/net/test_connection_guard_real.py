"""The connection guard over the real network: outside identities (bare p2pds on 127.0.0.1) that connect
to a node and send nothing are disconnected beyond the per-host cap, and under admission once their grace
period is over; a member of the run on the same host keeps its connection and its calls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hivemind.p2p import P2P, PeerID

from netutil import NetworkGuard, start_p2p
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.admission import Admission, derive_key
from p2pnode.transport.codec import Message
from p2pnode.transport.connection_guard import HOST_CAP, NOT_ADMITTED
from p2pnode.transport.p2p import RPC_HANDLER, P2PTransport

#: Sweep interval of the tests' guards, in seconds (the default is 5 s).
SWEEP_S = 0.2


async def echo(sender: str, request: Message[Any]) -> Message[Any]:
    return Message(peer_pb2.Pong(round=request.body.round))


async def connected(victim: P2PTransport) -> set[str]:
    return {info.peer_id.to_base58() for info in await victim.p2p.list_peers()}


async def call_echo(honest: P2PTransport, victim: P2PTransport) -> int:
    reply = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=7)), peer_pb2.Pong, 10.0)
    return int(reply.body.round)


async def settle(victim: P2PTransport, outsiders: set[str], at_most: int, timeout: float = 10.0) -> set[str]:
    """Wait until at most `at_most` of `outsiders` are connected to `victim`; return those that are."""
    deadline = time.monotonic() + timeout
    while True:
        left = await connected(victim) & outsiders
        if len(left) <= at_most:
            return left
        assert time.monotonic() < deadline, f"{len(left)} outsiders still connected"
        await asyncio.sleep(0.05)


async def test_idle_outsiders_of_one_host_beyond_the_cap_are_disconnected_and_a_member_is_kept() -> None:
    k, cap = 8, 4
    with NetworkGuard() as guard:
        victim = await P2PTransport.create(conn_guard_interval_s=SWEEP_S, conn_max_per_host=cap)
        honest = await P2PTransport.create(initial_peers=victim.addresses())
        raws: list[P2P] = []
        try:
            victim.register("echo", peer_pb2.Ping, echo)
            # A member of the run's directory, on the same host as the outsiders.
            victim.guard.members = lambda: [honest.peer_id]
            raws = list(await asyncio.gather(*(start_p2p(victim.addresses()) for _ in range(k))))
            outsiders = {r.peer_id.to_base58() for r in raws}
            left = await settle(victim, outsiders, cap)
            assert len(left) == cap
            assert honest.peer_id in await connected(victim)
            assert await call_echo(honest, victim) == 7
            # Every drop is counted under its reason, by the guard and in the transport's refusal counters.
            # (A dropped identity may dial again, and is dropped again: the count is of drops, not peers.)
            assert victim.guard.dropped_peers() == outsiders - left
            assert victim.guard.dropped[HOST_CAP] >= k - cap
            assert victim.stats.rejected[HOST_CAP] == victim.guard.dropped[HOST_CAP]
            assert set(victim.guard.dropped) == {HOST_CAP}
            assert victim.guard.outsiders <= k
            # The dropped ones stay dropped (or are dropped again if they dial again).
            await asyncio.sleep(4 * SWEEP_S)
            assert len(await connected(victim) & outsiders) <= cap
            assert honest.peer_id in await connected(victim)
        finally:
            for r in raws:
                await r.shutdown()
            await honest.shutdown()
            await victim.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


async def test_under_admission_a_peer_that_never_proves_admission_is_disconnected_after_its_grace() -> None:
    key = derive_key(b"correct horse battery staple 42", "run")
    with NetworkGuard() as guard:
        victim = await P2PTransport.create(conn_guard_interval_s=SWEEP_S, conn_admission_grace_s=1.0)
        honest = await P2PTransport.create(initial_peers=victim.addresses())
        raw: P2P | None = None
        try:
            victim.admission = Admission(key)
            honest.admission = Admission(key)
            victim.register("echo", peer_pb2.Ping, echo)
            raw = await start_p2p(victim.addresses())
            outsider = raw.peer_id.to_base58()
            assert await call_echo(honest, victim) == 7  # a proved request: the honest peer is known
            assert outsider in await connected(victim)
            assert await settle(victim, {outsider}, 0) == set()
            assert victim.guard.dropped[NOT_ADMITTED] >= 1
            assert victim.stats.rejected[NOT_ADMITTED] == victim.guard.dropped[NOT_ADMITTED]
            assert honest.peer_id in await connected(victim)
            assert await call_echo(honest, victim) == 7
        finally:
            if raw is not None:
                await raw.shutdown()
            await honest.shutdown()
            await victim.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_a_dropped_peer_in_the_tarpit_has_its_held_streams_released_and_is_held_again() -> None:
    """The held streams of a dropped peer died with its connection: their places in the tarpit's cap are
    given back, so the streams it opens after dialing again are held again (not closed at once)."""
    with NetworkGuard() as guard:
        # Sweeps by hand (interval 0); the peer is refused without a proof and dropped at the first sweep.
        victim = await P2PTransport.create(conn_guard_interval_s=0, conn_admission_grace_s=0, tarpit_refusals=3,
                                           tarpit_hold_s=30.0, tarpit_max_held=2)
        raw: P2P | None = None
        try:
            victim.admission = Admission(derive_key(b"correct horse battery staple 42", "run"))
            victim.register("echo", peer_pb2.Ping, echo)
            raw = await start_p2p(victim.addresses())
            flooder = raw.peer_id.to_base58()
            frame = codec.join(codec.encode("echo", peer_pb2.Ping(round=1)))
            writers = []

            async def send() -> None:
                _, _, writer = await raw.call_binary_stream_handler(PeerID.from_base58(victim.peer_id), RPC_HANDLER)
                writer.write(frame)
                await writer.drain()
                writers.append(writer)

            for _ in range(4):
                await send()
            await until(lambda: victim.tarpit.holds(flooder))
            for _ in range(2):
                await send()
            await until(lambda: victim.streams.held == 2)
            drops = await victim.guard.sweep()
            assert [(d.peer_id, d.reason) for d in drops] == [(flooder, NOT_ADMITTED)]
            assert victim.stats.rejected[NOT_ADMITTED] == 1
            await until(lambda: victim.streams.held == 0)
            # It dials again: its new streams are held again, none closed for a full tarpit.
            for _ in range(2):
                await send()
            await until(lambda: victim.streams.held == 2)
            assert victim.stats.rejected["tarpit_full"] == 0
            for writer in writers:
                writer.close()
        finally:
            if raw is not None:
                await raw.shutdown()
            await victim.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard
