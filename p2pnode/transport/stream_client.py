"""`StreamClient`: the calling side of libp2p streams, one stream per request.

`P2PTransport` sends every message that does not take the direct channel through here: open a stream to
the peer's handler, write the framed request while the response is read, close the stream. The writers
of the calls in flight are kept, so that `close_all` (on shutdown, or when the transport moves to a new
p2pd) makes those calls fail promptly with `PeerUnreachable` instead of waiting out their timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from p2pnode.errors import PeerUnreachable
from p2pnode.transport.framing import MessageIO, StreamIO, write_message

#: Errors of a libp2p stream or of the p2pd control socket that mean "the peer or the daemon is gone".
STREAM_ERRORS = (asyncio.IncompleteReadError, ConnectionError, OSError, P2PDaemonError)

#: Reads and checks one response (the transport's: responses share its receive buffers and counters).
ReadResponse = Callable[[str, MessageIO], Awaitable[memoryview]]


class StreamClient:
    """Calls peers over libp2p streams of one p2pd and keeps the writers of the calls in flight.

    :param p2p: the libp2p daemon handle to open streams with (replaced by the transport on rebind).
    :param handler_name: libp2p protocol name of the peers' handler.
    :param read_response: reads and checks one response, see `ReadResponse`.
    """

    def __init__(self, p2p: P2P, handler_name: str, read_response: ReadResponse) -> None:
        self.p2p = p2p
        self.handler_name = handler_name
        self._read_response = read_response
        #: Writers of outbound calls in flight, closed by `close_all` so that those calls fail promptly.
        self.in_flight: set[asyncio.StreamWriter] = set()

    async def call(self, peer_id: str, parts: Sequence[memoryview], timeout: float) -> memoryview:
        """Send the framed request `parts` to `peer_id` on a new stream and return its framed response.

        :param timeout: longest wait for each read or write on the stream, in seconds (the caller bounds
            the whole call).
        :raises PeerUnreachable: the peer id is invalid, no stream could be opened, or the stream broke.
        """
        try:
            pid = PeerID.from_base58(peer_id)
        except ValueError as e:
            raise PeerUnreachable(f"invalid peer id {peer_id!r}") from e
        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(pid, self.handler_name)
        except STREAM_ERRORS as e:
            raise PeerUnreachable(f"cannot open a stream to {peer_id}: {e}") from e
        self.in_flight.add(writer)
        try:
            return await self._exchange(peer_id, StreamIO(reader, writer, timeout), parts)
        finally:
            # Also runs when the transport cancels a timed-out call: closing the socket makes p2pd
            # reset the libp2p stream, so the peer's handler stops too.
            self.in_flight.discard(writer)
            writer.close()

    def close_all(self) -> None:
        """Close the streams of all calls in flight (they fail with `PeerUnreachable`)."""
        for writer in list(self.in_flight):
            writer.close()

    async def _exchange(self, peer_id: str, io: StreamIO, parts: Sequence[memoryview]) -> memoryview:
        """Write a request and read its response on a libp2p stream.

        The request is written by a separate task while the response is awaited, so that an early
        refusal (for example ``oversized``, sent before the payload is read) reaches the caller as the
        peer's error rather than as a broken pipe.
        """
        write_task = asyncio.create_task(write_message(io, parts))
        try:
            return await self._read_response(peer_id, io)
        except asyncio.IncompleteReadError as e:
            cause = _task_error(write_task) or e
            raise PeerUnreachable(f"{peer_id} closed the stream before answering: {cause!r}") from e
        except (ConnectionError, OSError) as e:
            raise PeerUnreachable(f"stream to {peer_id} broke: {e!r}") from e
        finally:
            if not write_task.done():
                write_task.cancel()
            # Mark the outcome as retrieved: its errors are reported through the read side.
            write_task.add_done_callback(_task_error)


def _task_error(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception of a finished task (None if it succeeded, was cancelled or is still running)."""
    if not task.done() or task.cancelled():
        return None
    return task.exception()
