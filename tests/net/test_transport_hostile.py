"""A node's transport against outsiders: raw hivemind P2P clients and raw sockets on 127.0.0.1 that pin
receive budgets, open too many streams or connections, trickle, truncate, replay, and flood the log.

Each attack must leave the node serving honest peers and be counted with a reason in
``Transport.stats.rejected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import mmap
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest
import torch
from hivemind.p2p import P2P, PeerID

from netutil import NetworkGuard, start_p2p
from p2pnode.config import NodeConfig
from p2pnode.errors import BadMessage, RemoteError
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec, stream_server
from p2pnode.transport.admission import Admission, derive_key
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.codec import Message
from p2pnode.transport.memory import MemoryNetwork
from p2pnode.transport.p2p import DIRECT_TICKET_METHOD, RPC_HANDLER, P2PTransport
from p2pnode.transport.rate import RateGuard, TooSlow
from p2pnode.transport.receive_buffers import POOLED_MIN_BYTES, ReceiveBuffers, lazy_buffer
from p2pnode.transport.refusals import RefusalLog, clip
from p2pnode.transport.replay import ReplayGuard
from p2pnode.transport.request_server import UNKNOWN_METHOD_DRAIN_BYTES
from p2pnode.transport.tls import TLSConnection

MiB = 1 << 20


async def echo(sender: str, request: Message[Any]) -> Message[Any]:
    return Message(peer_pb2.Pong(round=request.body.round), {k: v + 1 for k, v in request.tensors.items()})


async def refuse(sender: str, request: Message[Any]) -> Message[Any]:
    raise BadMessage("tensor has the wrong shape", code="bad_shape")


@contextlib.asynccontextmanager
async def swarm(**victim_options: Any) -> AsyncIterator[tuple[P2PTransport, P2PTransport, P2P]]:
    """(victim, honest peer, raw attacker client): two transports and a bare p2pd, all on 127.0.0.1."""
    with NetworkGuard() as guard:
        victim = await P2PTransport.create(**victim_options)
        honest: P2PTransport | None = None
        raw: P2P | None = None
        try:
            honest = await P2PTransport.create(initial_peers=victim.addresses())
            raw = await start_p2p(victim.addresses())
            for t in (victim, honest):
                t.register("echo", peer_pb2.Ping, echo)
                t.register("refuse", peer_pb2.Ping, refuse)
            yield victim, honest, raw
        finally:
            if raw is not None:
                await raw.shutdown()
            if honest is not None:
                await honest.shutdown()
            await victim.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


async def open_stream(raw: P2P, victim: P2PTransport) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    _, reader, writer = await raw.call_binary_stream_handler(PeerID.from_base58(victim.peer_id), RPC_HANDLER)
    return reader, writer


async def read_reply(reader: asyncio.StreamReader, timeout: float = 10.0) -> peer_pb2.Envelope:
    async with asyncio.timeout(timeout):
        head = await reader.readexactly(4)
        return codec.parse_envelope(await reader.readexactly(codec.parse_header(head)))


async def exchange_raw(raw: P2P, victim: P2PTransport, data: bytes) -> peer_pb2.Envelope:
    reader, writer = await open_stream(raw, victim)
    try:
        writer.write(data)
        await writer.drain()
        return await read_reply(reader)
    finally:
        writer.close()


def announcing(nbytes: int, method: str = "echo") -> bytes:
    """Header and envelope of a well-formed request whose `nbytes` payload is still to come."""
    env = peer_pb2.Envelope(method=method, body=peer_pb2.Ping().SerializeToString(), payload_bytes=nbytes,
                            nonce=b"n" * 16, sent_at=time.time())
    env.tensors.add(name="x", dtype="uint8", shape=[nbytes])
    head = env.SerializeToString()
    return codec.HEADER.pack(len(head)) + head


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def call_times(honest: P2PTransport, victim: P2PTransport, count: int = 3) -> list[float]:
    """Seconds each of `count` echo calls from `honest` to `victim` takes, one after another."""
    times = []
    for _ in range(count):
        start = time.monotonic()
        await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=1)), peer_pb2.Pong, 10.0)
        times.append(time.monotonic() - start)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096




# -- 1. memory: receive budget, stream caps, slow senders ---------------------------------------------
@pytest.mark.network
@pytest.mark.timeout(90)
async def test_slow_streams_cannot_pin_the_receive_budget() -> None:
    """Two slow streams announcing a largest message each: the second is refused at once (the peer's
    share), honest pushes keep going through, and the slow one is cut off with ``too_slow``."""
    async with swarm(max_message_bytes=64 * MiB, receive_grace_s=1.0, direct=False) as (victim, honest, raw):
        assert victim.inbound.max_inflight_bytes == 128 * MiB and victim.inbound.max_inflight_bytes_per_peer == 64 * MiB
        size = 60 * MiB
        slow_reader, slow_writer = await open_stream(raw, victim)
        slow_writer.write(announcing(size))
        await slow_writer.drain()
        await until(lambda: victim.inflight_bytes > 0)
        second_reader, second_writer = await open_stream(raw, victim)
        second_writer.write(announcing(size))
        await second_writer.drain()
        refused = await read_reply(second_reader)
        second_writer.close()
        assert refused.error == peer_pb2.BUSY
        assert victim.stats.rejected["busy"] == 1
        # An honest 40 MB push goes through while the slow stream holds its reservation.
        x = torch.ones(10 * MiB // 4 * 4)
        reply = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=3), {"x": x}),
                                  peer_pb2.Pong, timeout=30)
        assert reply.body.round == 3 and torch.equal(reply.tensors["x"], x + 1)
        await trickle_until_cut_off(victim, slow_reader, slow_writer)
        # The buffer of the cut-off message did not stay in the reuse pool.
        assert all(len(b) < size for b in victim.buffers._bufs)


async def trickle_until_cut_off(victim: P2PTransport, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
    """Trickle 4 KiB/s (far below the 64 KiB/s minimum) on a stream until `victim` cuts it off as too slow.

    Asserts the BUSY reply naming the rate, one ``too_slow`` refusal and the reservation released.
    """

    async def trickle() -> None:
        with contextlib.suppress(OSError, ConnectionError):
            for _ in range(200):
                writer.write(b"\x00" * 1024)
                await writer.drain()
                await asyncio.sleep(0.25)

    task = asyncio.create_task(trickle())
    try:
        cut = await read_reply(reader, timeout=20)
        assert cut.error == peer_pb2.BUSY and "KiB/s" in cut.error_message
    finally:
        task.cancel()
        writer.close()
    assert victim.stats.rejected["too_slow"] == 1
    await until(lambda: victim.inflight_bytes == 0)


def vm_rss_bytes() -> int:
    """VmRSS of this process (where the victim transport's receive buffers live), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.network
@pytest.mark.timeout(90)
async def test_an_announced_message_costs_memory_only_as_its_bytes_arrive() -> None:
    """An outsider announces a message of almost 1 GiB (the default largest message) and trickles.

    The announcement reserves its size in the receive budget (accounting) but costs no resident memory:
    the buffer is a mapping whose pages are touched only as bytes arrive. Honest pushes still go
    through, and the trickle is cut off as ``too_slow``.
    """
    async with swarm(receive_grace_s=1.0, direct=False) as (victim, honest, raw):
        size = (1 << 30) - 4096
        assert victim.max_message_bytes == 1 << 30
        gc.collect()
        before = vm_rss_bytes()
        slow_reader, slow_writer = await open_stream(raw, victim)
        slow_writer.write(announcing(size) + b"\x00" * (256 << 10))
        await slow_writer.drain()
        await until(lambda: victim.inflight_bytes >= size)
        peak = before
        for _ in range(10):  # while the reservation is held
            peak = max(peak, vm_rss_bytes())
            await asyncio.sleep(0.05)
        assert peak - before < 64 * MiB, f"RSS grew by {(peak - before) / MiB:.0f} MiB for a 1 GiB announcement"
        # An honest 8 MB push goes through while the reservation is held.
        x = torch.ones(2 * MiB)
        reply = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=4), {"x": x}),
                                  peer_pb2.Pong, timeout=30)
        assert reply.body.round == 4 and torch.equal(reply.tensors["x"], x + 1)
        await trickle_until_cut_off(victim, slow_reader, slow_writer)
        assert all(len(b) < size for b in victim.buffers._bufs)


def test_lazy_buffers_cost_memory_where_written() -> None:
    """Unit test: a large receive buffer is a mapping that costs resident memory only where written."""
    gc.collect()
    before = vm_rss_bytes()
    view = lazy_buffer(512 * MiB)
    assert isinstance(view.obj, mmap.mmap) and not view.readonly and view[123_456_789] == 0
    assert vm_rss_bytes() - before < 16 * MiB
    view[:8 * MiB] = b"\x01" * (8 * MiB)
    grown = vm_rss_bytes() - before
    assert 8 * MiB <= grown < 24 * MiB
    t = torch.frombuffer(view[:8 * MiB], dtype=torch.uint8)  # tensors are built on it without a copy
    assert int(t[-1]) == 1
    del t, view
    gc.collect()
    assert vm_rss_bytes() - before < 16 * MiB  # unmapped with its last reference
    assert isinstance(lazy_buffer(1000).obj, bytearray)  # small ones: plain bytearrays


@pytest.mark.network
@pytest.mark.timeout(90)
async def test_streams_per_peer_are_capped() -> None:
    async with swarm(max_streams_per_peer=4, idle_timeout=2.0, direct=False) as (victim, honest, raw):
        held = [await open_stream(raw, victim) for _ in range(4)]
        for _, writer in held:
            writer.write(b"\x01\x00")  # half a header, then nothing
            await writer.drain()
        await until(lambda: victim.inbound.streams_by_peer.get(raw.peer_id.to_base58(), 0) == 4)
        reader, writer = await open_stream(raw, victim)
        refused = await read_reply(reader)
        writer.close()
        assert refused.error == peer_pb2.BUSY and victim.stats.rejected["busy"] == 1
        # Another peer is not affected.
        ok = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=1)), peer_pb2.Pong, timeout=10)
        assert ok.body.round == 1
        # The stalled streams are closed after the idle timeout and counted.
        await until(lambda: victim.stats.rejected["too_slow"] == 4)
        for _, w in held:
            w.close()
        await until(lambda: not victim.inbound.streams_by_peer)


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_truncated_frames_and_budget_refusals_are_counted() -> None:
    async with swarm(max_message_bytes=8 * MiB, max_inflight_bytes=12 * MiB, direct=False) as (victim, honest, raw):
        _, writer = await open_stream(raw, victim)
        writer.write(announcing(MiB) + b"\x00" * 1000)
        await writer.drain()
        writer.close()
        await until(lambda: victim.stats.rejected["truncated"] == 1)
        # Cut inside the envelope, too.
        _, writer = await open_stream(raw, victim)
        writer.write(announcing(MiB)[:10])
        await writer.drain()
        writer.close()
        await until(lambda: victim.stats.rejected["truncated"] == 2)
        assert victim.inflight_bytes == 0
        # The node's whole budget (12 MiB): one peer holds 7 MiB, so another's 7 MiB is refused (busy).
        assert victim.inbound.max_inflight_bytes_per_peer == 8 * MiB
        _, writer = await open_stream(raw, victim)
        writer.write(announcing(7 * MiB))
        await writer.drain()
        await until(lambda: victim.inflight_bytes > 0)
        with pytest.raises(RemoteError) as err:
            await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(), {"x": torch.zeros(7 * MiB // 4)}),
                              peer_pb2.Pong, timeout=20)
        assert err.value.code == "busy" and victim.stats.rejected["busy"] == 1
        writer.close()
        await until(lambda: victim.stats.rejected["truncated"] == 3 and victim.inflight_bytes == 0)
        ok = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=1), {"x": torch.zeros(MiB)}),
                               peer_pb2.Pong, timeout=20)
        assert ok.body.round == 1


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_refused_large_messages_leave_no_buffers_in_the_pool() -> None:
    async with swarm(direct=False) as (victim, honest, _):
        x = {"x": torch.zeros(16 * MiB // 4)}
        for _ in range(3):
            with pytest.raises(Exception, match="wrong shape"):
                await honest.call(victim.peer_id, "refuse", Message(peer_pb2.Ping(), x), peer_pb2.Pong, timeout=20)
        assert victim.stats.rejected["bad_shape"] == 3
        assert victim.buffers.held_bytes == 0 and victim.buffers.discarded == 3
        await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(), x), peer_pb2.Pong, timeout=20)
        assert victim.buffers.held_bytes >= 16 * MiB  # an answered message's buffer is kept for reuse


def test_receive_pool_gives_memory_back_after_refusals() -> None:
    """Unit test of the pool: buffers of refused messages are dropped, and their memory leaves the process."""
    pool = ReceiveBuffers(max_bytes=512 * MiB)
    gc.collect()
    before = rss_bytes()
    for _ in range(4):
        view = pool.take(100 * MiB)
        view[::4096] = b"\x01" * len(range(0, 100 * MiB, 4096))  # touch every page, as a received payload does
        pool.discard(view)
        del view
    assert pool.held_bytes == 0 and pool.discarded == 4
    gc.collect()
    assert rss_bytes() - before < 64 * MiB
    # Kept buffers can be trimmed as well.
    kept = [pool.take(2 * POOLED_MIN_BYTES) for _ in range(3)]
    del kept
    assert pool.held_bytes == 6 * POOLED_MIN_BYTES
    assert pool.trim(2 * POOLED_MIN_BYTES) == 4 * POOLED_MIN_BYTES and pool.held_bytes == 2 * POOLED_MIN_BYTES


def test_rate_guard_cuts_off_a_trickle_after_the_grace_period() -> None:
    now = [0.0]
    guard = RateGuard(64 * 1024, grace_s=5.0, window_s=3.0, clock=lambda: now[0])
    for _ in range(4):  # 1 KiB/s during the grace period: accepted
        now[0] += 1.0
        guard.progress(1024)
    now[0] += 1.0
    guard.progress(10 * 1024 * 1024)  # a burst: fine
    for _ in range(2):
        now[0] += 1.0
        guard.progress(1024)
    with pytest.raises(TooSlow):
        for _ in range(4):
            now[0] += 1.0
            guard.progress(1024)
    assert RateGuard(0).wait_s(30.0) <= 30.0


# -- 1b. direct channel ----------------------------------------------------------------------------------
@pytest.mark.network
@pytest.mark.timeout(90)
async def test_direct_channel_survives_a_slowloris_and_counts_it() -> None:
    # The direct channel's caps come from the ``limits`` section of the config.
    limits = NodeConfig(direct_max_connections=32, direct_max_pending=16,
                        direct_handshake_timeout_s=2.0).validate().transport_limits()
    async with swarm(**limits) as (victim, honest, _):
        server = victim._direct
        assert server is not None and victim.direct_address is not None
        assert (server.max_connections, server.max_pending, server.handshake_timeout) == (32, 16, 2.0)
        host, port = victim.direct_address
        socks: list[socket.socket] = []
        try:
            for _ in range(100):  # TCP connections that never start their TLS handshake
                s = socket.create_connection((host, port))
                s.sendall(b"\x16\x03")  # two bytes of a ClientHello, then silence
                socks.append(s)
            await until(lambda: victim.stats.rejected["busy"] >= 100 - 16)
            assert len(server._connections) <= 16
            # An honest peer still gets through on the direct channel: the oldest handshakes give way.
            x = {"x": torch.arange(600_000, dtype=torch.float32)}
            before = honest.direct_messages
            reply = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=2), x), peer_pb2.Pong,
                                      timeout=20)
            assert reply.body.round == 2 and honest.direct_messages == before + 1
            # Stalled handshakes are closed by their deadline and counted.
            await until(lambda: victim.stats.rejected["handshake_timeout"] >= 1)
            await until(lambda: server.pending_handshakes == 0)
        finally:
            for s in socks:
                s.close()
        # A bad token is counted too.
        conn = await TLSConnection.connect(host, port, server.fingerprint, connect_timeout=5)
        try:
            await conn.write(memoryview(b"\x01" * 32), 5)
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
                await conn.readexactly(1, 5)
        finally:
            conn.close()
        assert victim.stats.rejected["bad_token"] == 1


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_direct_tickets_are_capped_per_peer_and_ask_admits() -> None:
    async with swarm(**NodeConfig(direct_max_tickets_per_peer=5).validate().transport_limits()) as (
            victim, honest, raw):
        server = victim._direct
        assert server is not None and server.max_tickets_per_peer == 5
        inner = peer_pb2.Envelope(method="echo", payload_bytes=0)
        codes = [(await exchange_raw(raw, victim, codec.join(codec.encode(DIRECT_TICKET_METHOD, inner)))).error
                 for _ in range(server.max_tickets_per_peer + 3)]
        assert codes[:server.max_tickets_per_peer] == [peer_pb2.OK] * server.max_tickets_per_peer
        assert codes[server.max_tickets_per_peer:] == [peer_pb2.BUSY] * 3
        assert victim.stats.rejected["busy"] == 3
        # The honest peer's tickets are not affected by the attacker's.
        x = {"x": torch.ones(500_000)}
        before = honest.direct_messages
        await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(), x), peer_pb2.Pong, timeout=20)
        assert honest.direct_messages == before + 1
        # The admission hook: a peer it refuses gets neither tickets nor exchanges.
        attacker = raw.peer_id.to_base58()
        victim.admits = lambda peer_id, envelope: peer_id != attacker  # type: ignore[method-assign]
        env = await exchange_raw(raw, victim, codec.join(codec.encode(DIRECT_TICKET_METHOD, inner)))
        assert env.error == peer_pb2.NOT_ADMITTED
        env = await exchange_raw(raw, victim, codec.join(codec.encode("echo", peer_pb2.Ping())))
        assert env.error == peer_pb2.NOT_ADMITTED
        assert victim.stats.rejected["not_admitted"] == 2
        ok = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=5)), peer_pb2.Pong, timeout=10)
        assert ok.body.round == 5


# -- 2. logs ------------------------------------------------------------------------------------------------
async def send_reading(raw: P2P, victim: P2PTransport, data: bytes) -> peer_pb2.Envelope | None:
    """Write `data` while reading the answer, as a transport does; None when the stream broke first."""
    reader, writer = await open_stream(raw, victim)

    async def write() -> None:
        writer.write(data)
        await writer.drain()

    task = asyncio.create_task(write())
    try:
        return await read_reply(reader)
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await task


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_a_flood_of_megabyte_method_names_is_refused_from_their_first_bytes() -> None:
    """Requests whose method name is 2 MB are refused from the 4-byte header and the name's length (3 bytes
    of the envelope): nothing else of the envelope is parsed or buffered, and at most
    `UNKNOWN_METHOD_DRAIN_BYTES` of what the flooder keeps sending is read before the stream closes."""
    async with swarm(direct=False) as (victim, honest, raw):
        huge = "m" * (2 * 1000 * 1000)
        flood = 20
        for _ in range(flood):
            env = await send_reading(raw, victim, codec.join(codec.encode(huge, peer_pb2.Ping())))
            assert env is None or env.error == peer_pb2.UNKNOWN_METHOD
        await until(lambda: victim.stats.rejected["unknown_method"] == flood)
        assert victim.stats.refused_bytes_read == flood * (codec.HEADER.size + 3)
        assert victim.stats.refused_bytes_drained <= flood * UNKNOWN_METHOD_DRAIN_BYTES
        assert victim.stats.bytes_received == 0  # none reached the dispatcher
        # An unknown short name is refused once its bytes are read, and the caller gets the reason.
        env = await send_reading(raw, victim, codec.join(codec.encode("no.such.method", peer_pb2.Ping())))
        assert env is not None and env.error == peer_pb2.UNKNOWN_METHOD
        assert victim.stats.rejected["unknown_method"] == flood + 1
        assert victim.stats.refused_bytes_read == flood * 7 + codec.HEADER.size + 2 + len("no.such.method")
        # Honest peers are served throughout.
        reply = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=3)), peer_pb2.Pong, 10.0)
        assert reply.body.round == 3


@pytest.mark.network
@pytest.mark.timeout(90)
async def test_a_flooder_past_its_refusal_budget_is_held_and_honest_peers_are_not_slowed() -> None:
    """A peer refused more than `tarpit_refusals` times in the window has its next streams held unread, then
    closed (``tarpit``): a sequential flooder's rate falls to about one request per hold, a parallel one holds
    at most `max_streams_per_peer` streams, an honest peer's call takes its usual time, and the flooder is
    served again one window after it was put in the tarpit."""
    hold_s, window_s, budget = 0.5, 8.0, 5
    async with swarm(direct=False, tarpit_refusals=budget, tarpit_window_s=window_s, tarpit_hold_s=hold_s,
                     max_streams_per_peer=4) as (victim, honest, raw):
        flooder = raw.peer_id.to_base58()
        frame = codec.join(codec.encode("m" * (2 * 1000 * 1000), peer_pb2.Ping()))
        usual = await call_times(honest, victim)
        # Within the budget and the one refusal past it: refused at once with the reason.
        t0 = time.monotonic()
        for _ in range(budget + 1):
            env = await send_reading(raw, victim, frame)
            assert env is None or env.error == peer_pb2.UNKNOWN_METHOD
        refused_rate = (budget + 1) / (time.monotonic() - t0)
        tripped_at = time.monotonic()
        assert victim.stats.rejected["unknown_method"] == budget + 1 and victim.tarpit.holds(flooder)
        read_before = victim.stats.refused_bytes_read

        # Sequential flood in the tarpit, while the honest peer keeps calling.
        async def flood(seconds: float) -> int:
            sent, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                env = await send_reading(raw, victim, frame)
                assert env is None  # held, then closed: no answer
                sent += 1
            return sent

        flooding = asyncio.create_task(flood(2.0))
        during = []
        while not flooding.done():
            start = time.monotonic()
            reply = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=2)), peer_pb2.Pong, 10.0)
            during.append(time.monotonic() - start)
            assert reply.body.round == 2
            await asyncio.sleep(0.1)
        held = await flooding
        held_rate = held / 2.0
        assert 1 <= held <= 2.0 / hold_s + 1, held
        assert held_rate < refused_rate / 2 and held_rate <= 1 / hold_s + 0.5, (held_rate, refused_rate)
        assert victim.stats.rejected["tarpit"] == held
        assert victim.stats.rejected["unknown_method"] == budget + 1  # nothing of a held stream is read
        assert victim.stats.refused_bytes_read == read_before
        assert max(during) < max(usual) + 1.0, (during, usual)

        # Parallel: at most max_streams_per_peer streams are held; the others are closed at once.
        streams = [await open_stream(raw, victim) for _ in range(10)]
        await until(lambda: victim.stats.rejected["tarpit"] == held + 10)
        assert victim.inbound.streams_by_peer.get(flooder, 0) <= 4
        for _, writer in streams:
            writer.close()
        assert time.monotonic() - tripped_at < window_s, "the machine is too slow for this test's window"

        # One window after the trip, the flooder is served (refused with the reason) again.
        await until(lambda: not victim.tarpit.holds(flooder), timeout=window_s + 5)
        env = await send_reading(raw, victim, codec.join(codec.encode("no.such.method", peer_pb2.Ping())))
        assert env is not None and env.error == peer_pb2.UNKNOWN_METHOD
        assert victim.stats.rejected["unknown_method"] == budget + 2 and victim.tarpit.trips == 1


@pytest.mark.network
@pytest.mark.timeout(120)
async def test_identities_of_one_host_share_one_refusal_budget_and_the_held_streams_are_capped() -> None:
    """k outside identities on one host (bare p2pds on 127.0.0.1, like the honest peer) flood in turn, each
    under its own budget: together they get the host's budget plus one refusal each before every one of
    them is held (not k budgets); at most `tarpit_max_held` of their streams are held at once, the others
    are closed at once (``tarpit_full``); the honest peer on the same host is never held and its calls
    keep their usual time."""
    k, budget, host_budget, max_held, hold_s, window_s = 5, 5, 8, 3, 2.0, 20.0
    async with swarm(direct=False, tarpit_refusals=budget, tarpit_window_s=window_s, tarpit_hold_s=hold_s,
                     tarpit_host_refusals=host_budget, tarpit_max_held=max_held) as (victim, honest, raw):
        sybils = [raw, *await asyncio.gather(*(start_p2p(victim.addresses()) for _ in range(k - 1)))]
        try:
            ids = [s.peer_id.to_base58() for s in sybils]
            frame = codec.join(codec.encode("m" * (2 * 1000 * 1000), peer_pb2.Ping()))
            usual = await call_times(honest, victim)
            t0 = time.monotonic()
            # Round robin: no identity gets near its own budget of 5 before the host's 8 are spent.
            for i in range(3 * k):
                env = await send_reading(sybils[i % k], victim, frame)
                # Refused with the reason (or the stream reset overtook it), or held and closed unanswered.
                assert env is None or env.error == peer_pb2.UNKNOWN_METHOD
            assert victim.tarpit.hot("127.0.0.1") and victim.tarpit.hot_hosts == 1
            assert all(victim.tarpit.holds(p) for p in ids)
            # host_budget + 1 trips the host (and the identity that earned it), then one each for the others:
            # 8 + 1 + 4 = 13 refusals, where k budgets would have allowed k x (budget + 1) = 30.
            refused = victim.stats.rejected["unknown_method"]
            assert refused == host_budget + k, refused
            assert victim.tarpit.trips == k and victim.tarpit.host_trips == k
            assert victim.stats.rejected["tarpit"] == 3 * k - refused
            assert not victim.tarpit.holds(honest.peer_id)

            # All of them at once, 2 streams each: at most max_held are held, the rest closed at once.
            before = victim.stats.rejected["tarpit"] + victim.stats.rejected["tarpit_full"]
            streams = [await open_stream(s, victim) for s in sybils for _ in range(2)]
            await until(lambda: victim.stats.rejected["tarpit"] + victim.stats.rejected["tarpit_full"]
                        == before + 2 * k)
            assert victim.streams.held <= max_held and victim.stats.rejected["tarpit_full"] >= 2 * k - max_held
            # The honest neighbour on the same host is served in its usual time meanwhile.
            during = []
            for _ in range(3):
                start = time.monotonic()
                reply = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=2)), peer_pb2.Pong,
                                          10.0)
                during.append(time.monotonic() - start)
                assert reply.body.round == 2
            assert max(during) < max(usual) + 1.0, (during, usual)
            assert victim.stats.rejected["unknown_method"] == refused  # nothing of a held stream was read
            assert not victim.tarpit.holds(honest.peer_id)
            for _, writer in streams:
                writer.close()
            assert time.monotonic() - t0 < window_s, "the machine is too slow for this test's window"
        finally:
            for s in sybils[1:]:
                await s.shutdown()


@pytest.mark.network
@pytest.mark.timeout(120)
async def test_identities_of_many_hosts_alarm_the_node_and_its_known_peer_keeps_its_budget() -> None:
    """k outside identities, each on a host of its own (bare p2pds on 127.0.0.2, 127.0.0.3, ...: loopback
    addresses that the node sees as k remote hosts), flood in turn, each under its own and its host's budget:
    together they get the node-wide budget plus one refusal each before every one of them is held; the
    honest peer, known to the node (it was served), is not held by its own refusal meanwhile and its calls
    keep their usual time."""
    k, budget, host_budget, node_budget, hold_s, window_s = 6, 5, 8, 10, 2.0, 20.0
    async with swarm(direct=False, tarpit_refusals=budget, tarpit_window_s=window_s, tarpit_hold_s=hold_s,
                     tarpit_host_refusals=host_budget, tarpit_node_refusals=node_budget) as (victim, honest, _raw):
        sybils = list(await asyncio.gather(*(start_p2p(victim.addresses(), host=f"127.0.0.{2 + i}")
                                             for i in range(k))))
        try:
            ids = [s.peer_id.to_base58() for s in sybils]
            frame = codec.join(codec.encode("m" * (2 * 1000 * 1000), peer_pb2.Ping()))
            usual = await call_times(honest, victim)
            assert victim.guard.known(honest.peer_id)
            t0 = time.monotonic()
            # Round robin: 3 refusals at most per identity and per host, under their budgets of 5 and 8.
            for i in range(3 * k):
                env = await send_reading(sybils[i % k], victim, frame)
                assert env is None or env.error == peer_pb2.UNKNOWN_METHOD
            hosts = {victim.tarpit.host_of(p) for p in ids}
            assert hosts == {f"127.0.0.{2 + i}" for i in range(k)}
            assert victim.tarpit.hot_hosts == 0 and victim.tarpit.alarms == 1 and victim.tarpit.alarmed()
            assert all(victim.tarpit.holds(p) for p in ids)
            # node_budget + 1 alarms the node (and trips the identity that earned it), then one each for the
            # others: 10 + 1 + 5 = 16 refusals, where k budgets would have allowed k x (budget + 1) = 36.
            refused = victim.stats.rejected["unknown_method"]
            assert refused == node_budget + k, refused
            assert victim.tarpit.trips == k and victim.tarpit.alarm_trips == k
            assert victim.stats.rejected["tarpit"] == 3 * k - refused
            # The known peer keeps its own budget while the node is alarmed: one refusal does not hold it.
            with pytest.raises(RemoteError):
                await honest.call(victim.peer_id, "no.such.method", Message(peer_pb2.Ping()), peer_pb2.Pong, 10.0)
            assert victim.stats.rejected["unknown_method"] == refused + 1
            assert not victim.tarpit.holds(honest.peer_id)
            during = await call_times(honest, victim)
            assert max(during) < max(usual) + 1.0, (during, usual)
            assert time.monotonic() - t0 < window_s, "the machine is too slow for this test's window"
        finally:
            for s in sybils:
                await s.shutdown()


@pytest.mark.network
@pytest.mark.timeout(90)
async def test_streams_refused_busy_stop_draining_when_their_peer_trips_the_tarpit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream beyond the peer's own stream limit is answered ``busy`` and drained; when the peer trips the
    tarpit (streams beyond its limit count against its budget), the drains still running end at once."""
    monkeypatch.setattr(stream_server, "BUSY_DRAIN_S", 10.0)  # long, so that "at once" is unmistakable
    async with swarm(direct=False, max_streams_per_peer=2, idle_timeout=30.0, tarpit_refusals=3,
                     tarpit_window_s=20.0, tarpit_hold_s=0.5, tarpit_host_refusals=0) as (victim, honest, raw):
        flooder = raw.peer_id.to_base58()
        stalled = [await open_stream(raw, victim) for _ in range(2)]
        for _, writer in stalled:
            writer.write(b"\x01\x00")  # half a header, then nothing: the two streams it may have are taken
            await writer.drain()
        await until(lambda: victim.inbound.streams_by_peer.get(flooder, 0) == 2)
        draining = []
        for _ in range(3):
            reader, writer = await open_stream(raw, victim)
            assert (await read_reply(reader)).error == peer_pb2.BUSY
            draining.append((reader, writer))
        # Within its budget of 3, the busy streams are drained: still open a second later.
        await asyncio.sleep(1.0)
        assert all(not r.at_eof() for r, _ in draining) and not victim.tarpit.holds(flooder)
        # The fourth trips the tarpit: it is answered without a drain, and the three drains stop.
        t0 = time.monotonic()
        reader, writer = await open_stream(raw, victim)
        assert (await read_reply(reader)).error == peer_pb2.BUSY
        draining.append((reader, writer))
        async with asyncio.timeout(5.0):
            for r, _ in draining:
                assert await r.read() == b""
        closed_after = time.monotonic() - t0
        assert victim.tarpit.holds(flooder) and victim.tarpit.trips == 1 and victim.stats.rejected["busy"] == 4
        assert closed_after < 3.0, closed_after  # not the 10 s of a drain
        for _, w in [*stalled, *draining]:
            w.close()
        await until(lambda: not victim.inbound.streams_by_peer.get(flooder))
        ok = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=4)), peer_pb2.Pong, timeout=10)
        assert ok.body.round == 4


def envelope_with_method_last(method: str) -> bytes:
    """A request whose envelope has its method field after the others (valid protobuf; no encoder of ours
    writes one): only parsing the whole envelope tells the method."""
    rest = codec.join(codec.encode("", peer_pb2.Ping()))[codec.HEADER.size:]
    name = method.encode()
    field = bytes([0x0A]) + _varint(len(name)) + name
    return codec.HEADER.pack(len(rest) + len(field)) + rest + field


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_refusal_logs_are_clipped_and_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    # The refusal budget is off: the log's own rate limit is what is tested, over 100 refusals of one peer.
    async with swarm(direct=False, tarpit_refusals=0) as (victim, _, raw):
        caplog.set_level(logging.WARNING, logger="p2pnode")
        huge = "m" * (2 * 1000 * 1000)
        env = await exchange_raw(raw, victim, envelope_with_method_last(huge))
        assert env.error == peer_pb2.UNKNOWN_METHOD and len(env.SerializeToString()) < 2000
        lines = [r.getMessage() for r in caplog.records if "rejected a message" in r.getMessage()]
        assert len(lines) == 1 and len(lines[0]) < 1024 and "(2000000 characters)" in lines[0]
        caplog.clear()
        for i in range(99):
            env = await exchange_raw(raw, victim, codec.join(codec.encode(f"no.such.{i}", peer_pb2.Ping())))
            assert env.error == peer_pb2.UNKNOWN_METHOD
        assert victim.stats.rejected["unknown_method"] == 100
        lines = [r.getMessage() for r in caplog.records if "rejected a message" in r.getMessage()]
        assert len(lines) <= 3, lines


def test_refusal_log_reports_how_many_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RefusalLog(logging.getLogger("p2pnode.test"), lambda: now[0], interval_s=10.0)
    caplog.set_level(logging.WARNING, logger="p2pnode.test")
    logged = [log.log("me", "peer", "malformed", "x" * 5000) for _ in range(50)]
    assert logged.count(True) == 1
    now[0] = 11.0
    assert log.log("me", "peer", "malformed", "again")
    assert log.log("me", "other", "malformed", "another peer has its own limit")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "49 more suppressed" in messages[1]
    assert all(len(m) < 1024 for m in messages)
    assert clip("abc") == "abc" and clip("é" * 300).endswith("...(600 bytes)")


# -- 4. replay --------------------------------------------------------------------------------------------
@pytest.mark.network
@pytest.mark.timeout(60)
async def test_replayed_exchange_is_refused_by_the_real_transport() -> None:
    # The refusal budget is off: this test counts each of 100 replays refused with its reason (with it on, the
    # replays past 20 would be held unread, see the tarpit test).
    async with swarm(direct=False, tarpit_refusals=0) as (victim, _, raw):
        served: list[str] = []

        async def record(sender: str, request: Message[Any]) -> Message[Any]:
            served.append(sender)
            return Message(peer_pb2.Pong(round=request.body.round))

        victim.register("record", peer_pb2.Ping, record)
        captured = codec.join(codec.encode("record", peer_pb2.Ping(round=9)))
        first = await exchange_raw(raw, victim, captured)
        assert first.error == peer_pb2.OK
        for _ in range(100):
            env = await exchange_raw(raw, victim, captured)
            assert env.error == peer_pb2.REPLAYED
        assert len(served) == 1 and victim.stats.rejected["replayed"] == 100
        # A request stamped far from the receiver's clock, and one without a nonce (an older node).
        stale = codec.join(codec.encode("record", peer_pb2.Ping(), sent_at=time.time() - 3600))
        assert (await exchange_raw(raw, victim, stale)).error == peer_pb2.REPLAYED
        head = peer_pb2.Envelope(method="record", body=peer_pb2.Ping().SerializeToString()).SerializeToString()
        env = await exchange_raw(raw, victim, codec.HEADER.pack(len(head)) + head)
        assert env.error == peer_pb2.REPLAYED and "older version" in env.error_message
        assert victim.stats.rejected["stale_clock"] == 1 and victim.stats.rejected["no_nonce"] == 1
        assert len(served) == 1
        # Fresh requests still pass.
        assert (await exchange_raw(raw, victim, codec.join(codec.encode("record", peer_pb2.Ping())))).error == 0


async def _read_request(reader: asyncio.StreamReader) -> peer_pb2.Envelope:
    """Read one framed request off a raw stream (header, envelope, payload); return its envelope."""
    head = await reader.readexactly(codec.HEADER.size)
    env = codec.parse_envelope(await reader.readexactly(codec.parse_header(head)))
    await reader.readexactly(env.payload_bytes)
    return env


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_replayed_response_is_refused_and_counted() -> None:
    """An outside peer that a node calls answers with one captured response again and again, then with a
    stale one: the node uses the first, refuses the others (``replayed``, ``stale_clock``) and goes on."""
    async with swarm(direct=False) as (victim, honest, raw):
        captured = codec.join(codec.encode("echo", peer_pb2.Pong(round=7)))
        answers = [captured, captured, captured,
                   codec.join(codec.encode("echo", peer_pb2.Pong(round=8), sent_at=time.time() - 3600))]

        async def answer(_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _read_request(reader)
                writer.write(answers.pop(0) if answers else codec.join(codec.encode("echo", peer_pb2.Pong())))
                await writer.drain()
            finally:
                writer.close()

        await raw.add_binary_stream_handler(RPC_HANDLER, answer)
        outsider = raw.peer_id.to_base58()
        first = await victim.call(outsider, "echo", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
        assert first.body.round == 7
        for reason in ("replayed", "replayed", "stale_clock"):
            with pytest.raises(BadMessage) as e:
                await victim.call(outsider, "echo", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
            assert e.value.code == reason
        assert victim.stats.rejected["replayed"] == 2 and victim.stats.rejected["stale_clock"] == 1
        fresh = await victim.call(outsider, "echo", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
        assert fresh.body.round == 0
        ok = await victim.call(honest.peer_id, "echo", Message(peer_pb2.Ping(round=3)), peer_pb2.Pong, timeout=10)
        assert ok.body.round == 3


class CountingAdmission(Admission):
    """A real `Admission` that counts the MACs it computes (frozen dataclass: the count lives in a list)."""

    macs: ClassVar[list[int]] = []

    def _mac(self, data: bytes) -> bytes:
        self.macs.append(1)
        return super()._mac(data)


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_a_proof_is_bound_to_its_message_and_checked_once() -> None:
    """An outside p2pd that holds the run key (as a leaked proof's sender would) sends a valid request, then
    another message carrying the same proof: the proof names the first message's nonce, so the second is
    refused (``not_admitted``). The node computes one MAC to check each request and one for its answer."""
    key = derive_key(b"correct horse battery staple 42", "run")
    async with swarm(direct=False) as (victim, honest, raw):
        CountingAdmission.macs = []
        victim.admission = CountingAdmission(key)
        honest.admission = Admission(key)
        outsider = raw.peer_id.to_base58()

        def request(nonce: bytes, proof_nonce: bytes) -> bytes:
            proof = Admission(key).proof(outsider, victim.peer_id, "echo", proof_nonce)
            return codec.join(codec.encode("echo", peer_pb2.Ping(round=4), nonce=nonce, admission=proof))

        n1, n2 = bytes(range(16)), bytes(range(1, 17))
        env = await exchange_raw(raw, victim, request(n1, n1))
        assert env.error == peer_pb2.OK
        assert len(CountingAdmission.macs) == 2  # the request's proof once, the response's proof once
        env = await exchange_raw(raw, victim, request(n2, n1))  # the captured proof on another message
        assert env.error == peer_pb2.NOT_ADMITTED
        assert victim.stats.rejected["not_admitted"] == 1
        # An honest admitted peer: its request and the response are checked once each on either side.
        CountingAdmission.macs = []
        ok = await honest.call(victim.peer_id, "echo", Message(peer_pb2.Ping(round=5)), peer_pb2.Pong, timeout=10)
        assert ok.body.round == 5 and len(CountingAdmission.macs) == 2


def test_replay_is_refused_in_the_simulator_on_its_virtual_clock() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b")
        served: list[int] = []

        async def handle(sender: str, request: Message[Any]) -> Message[Any]:
            served.append(request.body.round)
            return Message(peer_pb2.Pong(round=request.body.round))

        b.register("ping", peer_pb2.Ping, handle)
        frame = codec.join(codec.encode("ping", peer_pb2.Ping(round=1)))
        assert codec.decode(frame)[0].sent_at == 0.0  # stamped with the virtual clock
        for _ in range(3):
            await b._dispatch("a", frame)
        assert served == [1] and b.stats.rejected["replayed"] == 2
        await asyncio.sleep(3600)  # an hour of virtual time: the capture is stale now
        env, _ = codec.decode(codec.join(await b._dispatch("a", frame)))
        assert env.error == peer_pb2.REPLAYED and b.stats.rejected["stale_clock"] == 1
        # Calls stamped by the transport's (virtual) clock pass, an hour in.
        reply = await a.call("b", "ping", Message(peer_pb2.Ping(round=2)), peer_pb2.Pong, timeout=5)
        assert reply.body.round == 2 and served == [1, 2]

    run_virtual(main())


def test_seen_nonce_cache_is_bounded_and_a_flood_costs_only_the_flooder() -> None:
    guard = ReplayGuard(300.0, max_per_peer=100, max_entries=250)
    for i in range(1000):  # one peer floods, with send times up to near the window's future edge
        assert guard.check("flooder", i.to_bytes(16, "big"), 1000.0 + i * 0.29, 1000.0) is None
    assert len(guard) <= 100
    # Its forgotten nonces cannot come back: they are below its floor now.
    assert guard.check("flooder", (0).to_bytes(16, "big"), 1000.0, 1000.0) is not None
    # Honest peers are not affected by the flooder's floor.
    for p in range(3):
        for i in range(60):
            assert guard.check(f"honest{p}", bytes([p + 1]) * 8 + i.to_bytes(8, "big"), 999.0, 1000.0) is None
    assert len(guard) <= 250
    assert guard.check("honest0", bytes([1]) * 8 + (5).to_bytes(8, "big"), 999.0, 1000.0)[0] == "replayed"  # type: ignore[index]
    # Old entries expire with the window.
    assert guard.check("late", b"z" * 16, 2000.0, 2000.0) is None
    assert len(guard) == 1


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_streams_open_at_shutdown_end_without_an_error_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Streams still being served when the node shuts down (here: outside streams that send nothing) are
    stopped without asyncio logging their cancelled handler tasks as errors."""
    async with swarm(direct=False) as (victim, _honest, raw):
        streams = [await open_stream(raw, victim) for _ in range(3)]
        await until(lambda: victim.inbound.streams_by_peer.get(raw.peer_id.to_base58(), 0) == 3)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            await victim.shutdown()
            await asyncio.sleep(0.2)  # the stream server's callbacks run after the tasks end
        for _, writer in streams:
            writer.close()
    errors = [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, errors
