"""P2PTransport between two real p2pd daemons on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import torch
from hivemind.p2p import PeerID

from netutil import NetworkGuard, shutdown_replicas, start_dhts, start_p2p, stop_dhts
from p2pnode.errors import BadMessage, PeerUnreachable, RemoteError, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.transport import TrafficStats, codec
from p2pnode.transport.codec import Message
from p2pnode.transport.p2p import RPC_HANDLER, P2PTransport
from p2pnode.transport.tls import PinMismatch, TLSConnection

# One event loop for the module, so that most tests share one pair of daemons (starting p2pd takes ~0.5 s).
pytestmark = [pytest.mark.network, pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]


async def echo(sender: str, request: Message[Any]) -> Message[Any]:
    """Answer with the same round and every tensor plus one."""
    return Message(peer_pb2.Pong(round=request.body.round), {k: v + 1 for k, v in request.tensors.items()})


async def refuse(sender: str, request: Message[Any]) -> Message[Any]:
    raise BadMessage("tensor has the wrong shape", code="bad_shape")


async def crash(sender: str, request: Message[Any]) -> Message[Any]:
    raise ValueError("boom")


async def slow(sender: str, request: Message[Any]) -> Message[Any]:
    await asyncio.sleep(5)
    return Message(peer_pb2.Pong())


async def make_pair(**kwargs: Any) -> tuple[P2PTransport, P2PTransport]:
    p2p_a = await start_p2p()
    a = await P2PTransport.create(p2p_a, owns_p2p=True)
    try:
        p2p_b = await start_p2p(a.addresses())
        b = await P2PTransport.create(p2p_b, owns_p2p=True, **kwargs)
    except BaseException:
        await a.shutdown()
        raise
    for t in (a, b):
        t.register("echo", peer_pb2.Ping, echo)
        t.register("refuse", peer_pb2.Ping, refuse)
        t.register("crash", peer_pb2.Ping, crash)
        t.register("slow", peer_pb2.Ping, slow)
    return a, b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_pair() -> AsyncIterator[tuple[P2PTransport, P2PTransport]]:
    with NetworkGuard() as guard:
        a, b = await make_pair()
        try:
            yield a, b
        finally:
            await a.shutdown()
            await b.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


@pytest.fixture
def pair(shared_pair: tuple[P2PTransport, P2PTransport]) -> tuple[P2PTransport, P2PTransport]:
    """The shared pair, with fresh counters."""
    for t in shared_pair:
        t.stats = TrafficStats()
    return shared_pair


@contextlib.asynccontextmanager
async def extra_peer(a: P2PTransport, **kwargs: Any) -> AsyncIterator[P2PTransport]:
    """One more transport with its own p2pd, bootstrapped from `a`, stopped (and checked) on exit."""
    with NetworkGuard() as guard:
        t = await P2PTransport.create(initial_peers=a.addresses(), **kwargs)
        try:
            for name, handler in (("echo", echo), ("slow", slow)):
                t.register(name, peer_pb2.Ping, handler)
            yield t
        finally:
            await t.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


async def test_identity_and_addresses(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    assert a.peer_id != b.peer_id
    assert PeerID.from_base58(a.peer_id).to_base58() == a.peer_id
    assert a.addresses() and all(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in a.addresses())
    assert all(addr.endswith(f"/p2p/{a.peer_id}") for addr in a.addresses())


async def test_round_trip_with_tensors(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    big = torch.randn(5 * 1024 * 1024)  # 20 MiB of float32
    tensors = {
        "big": big,
        "half": torch.arange(12, dtype=torch.float16).reshape(3, 4),
        "bf": torch.ones(7, dtype=torch.bfloat16),
        "ints": torch.arange(10, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }
    request = Message(peer_pb2.Ping(round=7), tensors)
    reply = await a.call(b.peer_id, "echo", request, peer_pb2.Pong, timeout=20)
    assert reply.body.round == 7
    assert set(reply.tensors) == set(tensors)
    for name, t in tensors.items():
        assert reply.tensors[name].dtype == t.dtype and reply.tensors[name].shape == t.shape
        assert torch.equal(reply.tensors[name], t + 1), name
    assert a.direct_messages == 1  # 20 MiB is above the direct threshold
    # The same over libp2p streams only.
    a.direct_enabled = False
    try:
        reply = await a.call(b.peer_id, "echo", request, peer_pb2.Pong, timeout=20)
    finally:
        a.direct_enabled = True
    assert a.direct_messages == 1
    assert torch.equal(reply.tensors["big"], big + 1)
    # Both directions work, and the counters add up on both sides.
    back = await b.call(a.peer_id, "echo", Message(peer_pb2.Ping(round=1)), peer_pb2.Pong, timeout=10)
    assert back.body.round == 1
    assert a.stats.calls == 2 and b.stats.calls == 1
    assert a.stats.bytes_sent > big.numel() * 4 and b.stats.bytes_received > big.numel() * 4
    assert not a.stats.rejected and not b.stats.rejected


async def test_concurrent_calls(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    replies = await asyncio.gather(*(
        a.call(b.peer_id, "echo", Message(peer_pb2.Ping(round=i), {"x": torch.full((1000,), float(i))}),
               peer_pb2.Pong, timeout=10)
        for i in range(8)))
    for i, r in enumerate(replies):
        assert r.body.round == i and torch.equal(r.tensors["x"], torch.full((1000,), float(i + 1)))


async def test_remote_errors(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    with pytest.raises(RemoteError) as info:
        await a.call(b.peer_id, "refuse", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
    assert info.value.code == "bad_shape"
    assert b.stats.rejected["bad_shape"] == 1
    with pytest.raises(RemoteError) as info:
        await a.call(b.peer_id, "crash", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
    assert info.value.code == "internal" and "boom" in str(info.value)
    with pytest.raises(RemoteError) as info:
        await a.call(b.peer_id, "no.such.method", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
    assert info.value.code == "unknown_method"
    assert b.stats.rejected["unknown_method"] == 1
    assert a.stats.failed_calls == 3


async def test_oversized_request_is_refused_by_receiver(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    b.max_message_bytes = 1 << 20
    try:
        big = {"x": torch.zeros(4 * 1024 * 1024)}  # 16 MiB > the receiver's 1 MiB
        for direct in (True, False):  # refused at the ticket, or on the libp2p stream
            a.direct_enabled = direct
            with pytest.raises(RemoteError) as info:
                await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(), big), peer_pb2.Pong, timeout=10)
            assert info.value.code == "oversized"
        assert b.stats.rejected["oversized"] == 2
        # The refusals came before the payload was read.
        assert b.stats.bytes_received < 1 << 20
        # The sender refuses to send beyond its own limit, without touching the network.
        with pytest.raises(TransportError) as own:
            await b.call(a.peer_id, "echo", Message(peer_pb2.Ping(), big), peer_pb2.Pong, timeout=10)
        assert own.value.code == "oversized"
        # And the receiver still serves requests within its limit.
        ok = await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(round=3)), peer_pb2.Pong, timeout=10)
        assert ok.body.round == 3
    finally:
        a.direct_enabled = True
        b.max_message_bytes = codec.DEFAULT_MAX_MESSAGE_BYTES


async def test_timeout_closes_the_stream(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    start = time.monotonic()
    with pytest.raises(PeerUnreachable):
        await a.call(b.peer_id, "slow", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=0.5)
    assert time.monotonic() - start < 2.0
    assert not a.stream_client.in_flight  # the timed-out call closed its stream
    assert a.stats.failed_calls == 1


async def test_peer_that_shut_down_is_unreachable(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, _ = pair
    async with extra_peer(a) as b:
        await a.call(b.peer_id, "echo", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
        await b.shutdown()
        start = time.monotonic()
        with pytest.raises(PeerUnreachable):
            await a.call(b.peer_id, "echo", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=3)
        assert time.monotonic() - start < 3.5
        with pytest.raises(PeerUnreachable):
            await a.call("not-a-peer-id", "echo", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=3)
        # Calls on a transport that is shut down fail the same way.
        with pytest.raises(PeerUnreachable):
            await b.call(a.peer_id, "echo", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=3)


async def send_raw(a: P2PTransport, b: P2PTransport, data: bytes) -> peer_pb2.Envelope:
    """Send raw bytes on a stream to b's handler and parse the error envelope it answers with."""
    _, reader, writer = await a.p2p.call_binary_stream_handler(PeerID.from_base58(b.peer_id), RPC_HANDLER)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readexactly(4)
            env_bytes = await reader.readexactly(codec.parse_header(head))
        return codec.parse_envelope(env_bytes)
    finally:
        writer.close()


async def test_garbage_frames_are_rejected_and_counted(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    # An envelope that is not protobuf.
    env = await send_raw(a, b, codec.HEADER.pack(16) + b"\xff" * 16)
    assert env.error == peer_pb2.MALFORMED
    # An envelope length beyond the receiver's limit.
    env = await send_raw(a, b, codec.HEADER.pack(1 << 30) + b"\x00" * 64)
    assert env.error == peer_pb2.OVERSIZED
    # A well-formed envelope announcing a dtype that is not allowed.
    bad = peer_pb2.Envelope(method="echo", payload_bytes=16)
    bad.tensors.add(name="x", dtype="complex128", shape=[1])
    head = bad.SerializeToString()
    env = await send_raw(a, b, codec.HEADER.pack(len(head)) + head + b"\x00" * 16)
    assert env.error == peer_pb2.BAD_SHAPE
    # Specs that do not add up to the announced payload.
    bad = peer_pb2.Envelope(method="echo", payload_bytes=8)
    bad.tensors.add(name="x", dtype="float32", shape=[4])
    head = bad.SerializeToString()
    env = await send_raw(a, b, codec.HEADER.pack(len(head)) + head + b"\x00" * 8)
    assert env.error == peer_pb2.MALFORMED
    # A stream cut inside a request is dropped without an answer or a crash.
    _, _, writer = await a.p2p.call_binary_stream_handler(PeerID.from_base58(b.peer_id), RPC_HANDLER)
    writer.write(codec.HEADER.pack(100) + b"\x00" * 10)
    await writer.drain()
    writer.close()
    assert b.stats.rejected["malformed"] == 2
    assert b.stats.rejected["oversized"] == 1
    assert b.stats.rejected["bad_shape"] == 1
    # The receiver keeps serving.
    ok = await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(round=5), {"x": torch.ones(3)}), peer_pb2.Pong,
                      timeout=10)
    assert ok.body.round == 5 and torch.equal(ok.tensors["x"], torch.full((3,), 2.0))


async def test_transports_on_dht_replicas() -> None:
    """The node's setup: each transport shares its DHT's p2pd and peer id; peers are found through the DHT."""
    with NetworkGuard() as guard:
        dhts = start_dhts(2)
        try:
            transports = [await P2PTransport.create(await dht.replicate_p2p()) for dht in dhts]
            try:
                for dht, t in zip(dhts, transports, strict=True):
                    assert t.peer_id == dht.peer_id.to_base58()
                    t.register("echo", peer_pb2.Ping, echo)
                a, b = transports
                request = Message(peer_pb2.Ping(round=2), {"w": torch.zeros(1000)})
                reply = await a.call(b.peer_id, "echo", request, peer_pb2.Pong, timeout=10)
                assert reply.body.round == 2 and torch.equal(reply.tensors["w"], torch.ones(1000))
            finally:
                for t in transports:
                    await t.shutdown()
                await shutdown_replicas(dhts)
        finally:
            stop_dhts(dhts)
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


# -- direct channel -----------------------------------------------------------------------------------
async def test_direct_connections_are_reused_and_renewed(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    x = {"x": torch.arange(600_000, dtype=torch.float32)}  # 2.4 MB
    before = a.direct_messages
    for _ in range(2):
        reply = await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(), x), peer_pb2.Pong, timeout=10)
        assert torch.equal(reply.tensors["x"], x["x"] + 1)
    assert a.direct_messages == before + 2
    assert a.direct_client.pool.get(b.peer_id, b._direct.fingerprint) is not None  # type: ignore[union-attr]
    # The peer drops its side of every connection (as after its idle timeout): the next call notices
    # that the reused connection is dead and succeeds on a fresh one.
    reply = await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(), x), peer_pb2.Pong, timeout=10)
    assert b._direct is not None
    for task in list(b._direct._connections):
        task.cancel()
    await asyncio.sleep(0.1)
    reply = await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(round=9), x), peer_pb2.Pong, timeout=10)
    assert reply.body.round == 9 and torch.equal(reply.tensors["x"], x["x"] + 1)
    assert a.direct_messages == before + 4 and a.direct_fallbacks == 0


async def test_direct_concurrent_exchanges_in_both_directions(pair: tuple[P2PTransport, P2PTransport]) -> None:
    """Many rounds over reused connections, both ways at once: none may stall."""
    a, b = pair
    x = {"x": torch.arange(700_000, dtype=torch.float32)}  # 2.8 MB
    before = a.direct_messages + b.direct_messages
    for i in range(6):
        replies = await asyncio.gather(*(
            src.call(dst.peer_id, "echo", Message(peer_pb2.Ping(round=i), x), peer_pb2.Pong, timeout=5)
            for src, dst in ((a, b), (b, a), (a, b), (b, a))))
        assert all(r.body.round == i and torch.equal(r.tensors["x"], x["x"] + 1) for r in replies)
    assert a.direct_messages + b.direct_messages == before + 24


async def test_direct_channel_refuses_bad_tokens_and_wrong_certificates(
        pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    assert b._direct is not None and b.direct_address is not None
    host, port = b.direct_address
    # A client that expects another certificate refuses the server before sending anything.
    with pytest.raises(PinMismatch):
        await TLSConnection.connect(host, port, b"\x00" * 32, connect_timeout=5)
    # A client with the right certificate but no valid token is disconnected.
    refused = b._direct.refused_tokens
    conn = await TLSConnection.connect(host, port, b._direct.fingerprint, connect_timeout=5)
    try:
        await conn.write(memoryview(b"\x01" * 32), 5)
        with pytest.raises(asyncio.IncompleteReadError):
            await conn.readexactly(1, 5)
    finally:
        conn.close()
    # A token is good for one message only.
    ticket = b._direct.issue(a.peer_id)
    assert b._direct.redeem(ticket.token) == a.peer_id
    assert b._direct.redeem(ticket.token) is None
    assert b._direct.refused_tokens == refused + 1
    ok = await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(round=4), {"x": torch.ones(500_000)}),
                      peer_pb2.Pong, timeout=10)
    assert ok.body.round == 4


async def test_direct_timeout_closes_the_connection(pair: tuple[P2PTransport, P2PTransport]) -> None:
    a, b = pair
    start = time.monotonic()
    with pytest.raises(PeerUnreachable):
        await a.call(b.peer_id, "slow", Message(peer_pb2.Ping(), {"x": torch.ones(500_000)}), peer_pb2.Pong,
                     timeout=0.5)
    assert time.monotonic() - start < 2.0
    assert not a.direct_client.in_flight and not a.stream_client.in_flight


async def test_falls_back_to_libp2p_when_direct_fails(pair: tuple[P2PTransport, P2PTransport]) -> None:
    """A peer without the direct channel, and one whose direct address cannot be reached."""
    a, _ = pair
    # 127.0.0.2 is loopback too, but nothing listens there: the connection is refused.
    async with extra_peer(a, direct=False) as b, extra_peer(a, direct_advertise_host="127.0.0.2") as c:
        x = {"x": torch.arange(1_000_000, dtype=torch.float32)}
        direct_before = a.direct_messages
        for peer in (b, c):
            for _ in range(2):
                reply = await a.call(peer.peer_id, "echo", Message(peer_pb2.Ping(), x), peer_pb2.Pong,
                                     timeout=10)
                assert torch.equal(reply.tensors["x"], x["x"] + 1)
        assert a.direct_messages == direct_before
        assert a.direct_fallbacks == 2  # once per peer, then the peer is remembered


def test_receive_buffers_are_reused_only_when_free() -> None:
    from p2pnode.transport.receive_buffers import POOLED_MIN_BYTES, ReceiveBuffers

    pool = ReceiveBuffers(max_bytes=8 * POOLED_MIN_BYTES)
    first = pool.take(2 * POOLED_MIN_BYTES)
    held = torch.frombuffer(first[:1024], dtype=torch.uint8)  # a tensor kept by a handler
    del first
    second = pool.take(2 * POOLED_MIN_BYTES)
    assert pool.reused == 0  # the first buffer is still referenced by `held`
    second[:4] = b"abcd"
    del second
    third = pool.take(2 * POOLED_MIN_BYTES)
    assert pool.reused == 1 and bytes(third[:4]) == b"abcd"  # the free one came back, not `held`'s
    del held, third
    small = pool.take(1000)  # small messages never use the pool
    assert len(small) == 1000 and pool.reused == 1
    # The pool never keeps more than max_bytes.
    big = [pool.take(3 * POOLED_MIN_BYTES) for _ in range(4)]
    assert sum(len(b) for b in pool._bufs) <= pool.max_bytes
    del big
