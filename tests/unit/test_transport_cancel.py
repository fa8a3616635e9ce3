"""`Transport.call` passes a cancellation on, even one that arrives as the call completes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from p2pnode.errors import PeerUnreachable
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.base import Transport
from p2pnode.transport.codec import Message


class _Gate(Transport):
    """A transport whose peer answers (a Pong) when `open` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()

    @property
    def peer_id(self) -> str:
        return "me"

    async def _send(self, peer_id: str, method: str, parts: Sequence[memoryview], timeout: float) -> bytes:
        await self.open.wait()
        return codec.join(codec.encode(method, peer_pb2.Pong(round=1)))


async def test_a_call_cancelled_as_its_answer_arrives_is_cancelled() -> None:
    transport = _Gate()
    call = asyncio.create_task(transport.call("peer", "ping", Message(peer_pb2.Ping()), peer_pb2.Pong, 10.0))
    await asyncio.sleep(0.01)
    # The answer and the cancellation arrive in the same turn of the loop (as when a round loop is
    # stopped while its exchange completes): asyncio.wait_for on Python 3.11 returned the answer here.
    transport.open.set()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert call.cancelled()


async def test_a_call_still_times_out() -> None:
    transport = _Gate()
    with pytest.raises(PeerUnreachable, match=r"did not answer ping within 0\.1 s"):
        await transport.call("peer", "ping", Message(peer_pb2.Ping()), peer_pb2.Pong, 0.1)
