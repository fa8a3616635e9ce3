"""Outsiders against the transport, over real libp2p daemons on 127.0.0.1: replayed requests, requests
without a nonce or with a send time far off, and refusal floods that would fill the log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import torch
from hivemind.p2p import PeerID

from netutil import NetworkGuard, start_p2p
from p2pnode.proto import peer_pb2
from p2pnode.transport import TrafficStats, codec
from p2pnode.transport.codec import Message
from p2pnode.transport.p2p import RPC_HANDLER, P2PTransport
from p2pnode.transport.replay import ReplayGuard

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair() -> AsyncIterator[tuple[P2PTransport, P2PTransport, list[int]]]:
    """Two transports; b counts the requests its `echo` handler really served."""
    served: list[int] = []

    async def echo(sender: str, request: Message[Any]) -> Message[Any]:
        served.append(request.body.round)
        return Message(peer_pb2.Pong(round=request.body.round))

    with NetworkGuard() as guard:
        a = await P2PTransport.create(await start_p2p(), owns_p2p=True)
        b = await P2PTransport.create(await start_p2p(a.addresses()), owns_p2p=True)
        b.register("echo", peer_pb2.Ping, echo)
        try:
            yield a, b, served
        finally:
            await a.shutdown()
            await b.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard


async def send_raw(a: P2PTransport, b: P2PTransport, data: bytes) -> peer_pb2.Envelope:
    """Send a whole encoded request on a fresh libp2p stream, as any outside libp2p client can."""
    _, reader, writer = await a.p2p.call_binary_stream_handler(PeerID.from_base58(b.peer_id), RPC_HANDLER)
    try:
        writer.write(data)
        await writer.drain()
        head = await reader.readexactly(4)
        return codec.parse_envelope(await reader.readexactly(codec.parse_header(head)))
    finally:
        writer.close()


def captured(round_: int, sent_at: float | None) -> bytes:
    parts = codec.encode("echo", peer_pb2.Ping(round=round_), {"x": torch.ones(4)}, sent_at=sent_at)
    return b"".join(bytes(p) for p in parts)


@module_loop
async def test_replayed_requests_are_refused_and_counted(pair: tuple[P2PTransport, P2PTransport, list[int]]
                                                         ) -> None:
    a, b, served = pair
    b.stats = TrafficStats()
    served.clear()
    request = captured(7, b.clock())
    first = await send_raw(a, b, request)
    assert first.error == peer_pb2.OK
    for _ in range(100):
        env = await send_raw(a, b, request)
        assert env.error == peer_pb2.REPLAYED
    assert served == [7]
    assert b.stats.rejected["replayed"] == 100
    # fresh requests from the same peer still pass
    reply = await a.call(b.peer_id, "echo", Message(peer_pb2.Ping(round=8)), peer_pb2.Pong, timeout=10)
    assert reply.body.round == 8 and served == [7, 8]


@module_loop
async def test_unstamped_and_far_off_requests_are_refused(pair: tuple[P2PTransport, P2PTransport, list[int]]
                                                          ) -> None:
    a, b, served = pair
    b.stats = TrafficStats()
    served.clear()
    late = await send_raw(a, b, captured(1, b.clock() - 10 * b.replay.window_s))
    early = await send_raw(a, b, captured(2, b.clock() + 10 * b.replay.window_s))
    bare = peer_pb2.Envelope(method="echo", body=peer_pb2.Ping(round=3).SerializeToString())
    head = bare.SerializeToString()
    unstamped = await send_raw(a, b, codec.HEADER.pack(len(head)) + head)
    assert late.error == early.error == unstamped.error == peer_pb2.REPLAYED
    assert served == []
    assert b.stats.rejected["stale_clock"] == 2 and b.stats.rejected["no_nonce"] == 1


@module_loop
async def test_refusal_logs_are_clipped_and_rate_limited(pair: tuple[P2PTransport, P2PTransport, list[int]],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    a, b, _ = pair
    b.stats = TrafficStats()
    huge = "m" * (2 << 20)  # a 2 MB method name
    with caplog.at_level(logging.INFO, logger="p2pnode.transport"):
        for _ in range(100):
            parts = codec.encode(huge, peer_pb2.Ping(), sent_at=b.clock())
            env = await send_raw(a, b, b"".join(bytes(p) for p in parts))
            assert env.error == peer_pb2.UNKNOWN_METHOD
            assert len(env.error_message) <= 1000
    assert b.stats.rejected["unknown_method"] == 100
    lines = [r.getMessage() for r in caplog.records if "unknown_method" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines
    assert max(len(line) for line in lines) < 1024


def test_replay_guard_forgets_nonces_only_after_the_window() -> None:
    guard = ReplayGuard(window_s=10.0, max_per_peer=4)
    nonce = bytes(range(16))
    assert guard.check("p", nonce, 100.0, now=100.0) is None
    refusal = guard.check("p", nonce, 100.0, now=105.0)
    assert refusal is not None and refusal[0] == "replayed"
    # after the window the request is refused as stale, so forgetting its nonce is safe
    refusal = guard.check("p", nonce, 100.0, now=111.0)
    assert refusal is not None and refusal[0] == "stale_clock"
    # the memory a peer can pin is bounded
    for i in range(100):
        guard.check("p", i.to_bytes(16, "big"), 111.0, now=111.0)
    assert len(guard) <= 4
