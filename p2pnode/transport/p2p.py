"""`P2PTransport`: the real transport, over hivemind's libp2p daemon (p2pd).

Every request is one libp2p stream to the peer's single handler (`RPC_HANDLER`, ``"p2pnode.rpc"``); the
method name travels in the envelope. On the stream the caller writes one framed request (see
`p2pnode.transport.codec`) and the receiver answers with one framed response, both written in chunks
of `CHUNK_BYTES`. A reader first reads the 4-byte header and the envelope, checks them against its size
limits, and only then allocates one buffer for the whole message and reads the tensor bytes into it,
so an oversized or malformed message is refused before its payload is read.

The peer id is the libp2p id (base58) of the underlying p2pd; a node passes the `P2P` replica of its DHT
(``await dht.replicate_p2p()``) so that its RPC handlers and its DHT records share one identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from p2pnode.errors import BadMessage, PeerUnreachable, TransportError
from p2pnode.transport import codec
from p2pnode.transport.base import Transport

logger = logging.getLogger(__name__)

#: Name of the one libp2p stream handler a transport registers.
RPC_HANDLER = "p2pnode.rpc"
#: Size of the pieces in which a message is written and read, in bytes (1 MiB). Near 1 MB avoids the
#: allocator churn measured with 4 MB pieces and keeps per-piece overhead small.
CHUNK_BYTES = 1 << 20
#: Default longest wait for the next bytes of a request, or for the caller to take the next piece of a
#: response, on the serving side, in seconds. A stalled peer releases its handler after this.
DEFAULT_IDLE_TIMEOUT = 30.0
#: Default longest wait for p2pd to register or remove the handler, in seconds.
DEFAULT_CONTROL_TIMEOUT = 10.0
#: Default budget of inbound request bytes held in receive buffers at once (all peers together), in
#: multiples of ``max_message_bytes``. Requests beyond it are answered ``unavailable``.
DEFAULT_INFLIGHT_MESSAGES = 2

_STREAM_ERRORS = (asyncio.IncompleteReadError, ConnectionError, OSError, P2PDaemonError)


class _Busy(TransportError):
    """The receive budget is spent; the request is refused with ``unavailable`` (not the sender's fault)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unavailable")


async def write_parts(writer: asyncio.StreamWriter, parts: Sequence[memoryview], idle_timeout: float) -> None:
    """Write an encoded message in pieces of `CHUNK_BYTES`.

    :param idle_timeout: longest wait, in seconds, for the other side to take one piece.
    :raises TimeoutError: the other side did not read for `idle_timeout` seconds.
    """
    for part in parts:
        view = part.cast("B") if part.format != "B" else part
        for offset in range(0, view.nbytes, CHUNK_BYTES):
            writer.write(view[offset:offset + CHUNK_BYTES])
            async with asyncio.timeout(idle_timeout):
                await writer.drain()


async def read_message(reader: asyncio.StreamReader, max_message_bytes: int, idle_timeout: float,
                       reserve: Any = None) -> bytearray:
    """Read one framed message, checking the limits before its payload is read.

    The header and envelope are read and checked first (`codec.parse_header`, `codec.parse_envelope`);
    then one buffer of the announced size is allocated and the tensor bytes are read into it in pieces.

    :param max_message_bytes: largest accepted message, in bytes.
    :param idle_timeout: longest wait for the next bytes, in seconds.
    :param reserve: optional callable ``reserve(nbytes)`` called before the buffer is allocated; it may
        raise to refuse the message (used for the receive budget).
    :raises BadMessage: the message is malformed or oversized (nothing after the envelope was read).
    :raises asyncio.IncompleteReadError: the stream ended inside the message.
    :raises TimeoutError: no bytes arrived for `idle_timeout` seconds.
    """
    async with asyncio.timeout(idle_timeout):
        head = await reader.readexactly(codec.HEADER.size)
    n = codec.parse_header(head, max_message_bytes)
    async with asyncio.timeout(idle_timeout):
        env_bytes = await reader.readexactly(n)
    env = codec.parse_envelope(env_bytes, max_message_bytes)
    start = codec.HEADER.size + n
    total = start + env.payload_bytes
    if reserve is not None:
        reserve(total)
    buf = bytearray(total)
    buf[:codec.HEADER.size] = head
    buf[codec.HEADER.size:start] = env_bytes
    view = memoryview(buf)
    pos = start
    while pos < total:
        async with asyncio.timeout(idle_timeout):
            chunk = await reader.read(min(CHUNK_BYTES, total - pos))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", total - pos)
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    return buf


class P2PTransport(Transport):
    """Request/response messaging over libp2p streams of hivemind's p2pd.

    Create it with `P2PTransport.create` (it registers the stream handler). Either pass a `P2P` that
    someone else owns (normally ``await dht.replicate_p2p()``), or let `create` start a p2pd of its own.

    :param p2p: the libp2p daemon handle to use.
    :param owns_p2p: whether `shutdown` also stops `p2p` (default False).
    :param max_message_bytes: largest message sent or accepted, in bytes (default 1 GiB).
    :param handler_name: libp2p protocol name of the handler (default ``"p2pnode.rpc"``).
    :param idle_timeout: serving side: longest wait for the next bytes of a request or for the caller to
        take the response, in seconds (default 30).
    :param max_inflight_bytes: inbound request bytes held at once, in bytes (default 2x
        ``max_message_bytes``); requests beyond it are answered with the ``unavailable`` error code.
    """

    def __init__(self, p2p: P2P, *, owns_p2p: bool = False,
                 max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                 handler_name: str = RPC_HANDLER, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_inflight_bytes: int | None = None) -> None:
        super().__init__(max_message_bytes=max_message_bytes)
        self._p2p = p2p
        self._owns_p2p = owns_p2p
        self._peer_id: str = p2p.peer_id.to_base58()
        self.handler_name = handler_name
        self.idle_timeout = idle_timeout
        self.max_inflight_bytes = (max_inflight_bytes if max_inflight_bytes is not None
                                   else DEFAULT_INFLIGHT_MESSAGES * max_message_bytes)
        self._inflight_bytes = 0
        self._maddrs: list[str] = []
        self._started = False
        self._closed = False
        #: Serving tasks (one per inbound stream), cancelled on shutdown.
        self._serving: set[asyncio.Task[Any]] = set()
        #: Writers of outbound calls in flight, closed on shutdown so that those calls fail promptly.
        self._outbound: set[asyncio.StreamWriter] = set()

    # -- construction and lifecycle ---------------------------------------------------------------
    @classmethod
    async def create(cls, p2p: P2P | None = None, *, max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                     handler_name: str = RPC_HANDLER, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                     max_inflight_bytes: int | None = None, owns_p2p: bool | None = None,
                     **p2p_kwargs: Any) -> P2PTransport:
        """Create and start a transport.

        :param p2p: an existing `P2P` (for example ``await dht.replicate_p2p()``); when None, a new p2pd
            is started with `p2p_kwargs` (default: listening on ``/ip4/127.0.0.1/tcp/0``) and owned by
            the transport.
        :param owns_p2p: whether `shutdown` stops the `P2P` (default: only when the transport started it).
        Other parameters: see the class.
        """
        own = p2p is None
        if p2p is None:
            p2p_kwargs.setdefault("host_maddrs", ["/ip4/127.0.0.1/tcp/0"])
            p2p = await P2P.create(**p2p_kwargs)
        elif p2p_kwargs:
            raise TypeError(f"P2P options {sorted(p2p_kwargs)} given together with an existing P2P")
        transport = cls(p2p, owns_p2p=own if owns_p2p is None else owns_p2p,
                        max_message_bytes=max_message_bytes, handler_name=handler_name,
                        idle_timeout=idle_timeout, max_inflight_bytes=max_inflight_bytes)
        try:
            await transport.start()
        except BaseException:
            await transport.shutdown()
            raise
        return transport

    @property
    def p2p(self) -> P2P:
        """The underlying hivemind `P2P` handle."""
        return self._p2p

    @property
    def peer_id(self) -> str:
        """Base58 libp2p peer id of this node."""
        return self._peer_id

    def addresses(self) -> list[str]:
        """Multiaddrs (with ``/p2p/<peer id>``) at which p2pd listens, as seen when the transport started."""
        return list(self._maddrs)

    async def refresh_addresses(self) -> list[str]:
        """Ask p2pd for its current visible multiaddrs (they may change behind NAT) and return them."""
        self._maddrs = [str(a) for a in await self._p2p.get_visible_maddrs(latest=True)]
        return self.addresses()

    async def start(self) -> None:
        """Register the stream handler with p2pd (idempotent)."""
        if self._started:
            return
        if self._closed:
            raise TransportError("transport is shut down", code="unavailable")
        async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
            await self._p2p.add_binary_stream_handler(self.handler_name, self._handle_stream)
            self._maddrs = [str(a) for a in await self._p2p.get_visible_maddrs()]
        self._started = True

    async def shutdown(self) -> None:
        """Stop serving, fail the calls in flight with `PeerUnreachable`, and stop p2pd if owned."""
        if self._closed:
            return
        self._closed = True
        if self._started and self._p2p.is_alive:
            # The daemon may already be gone (for example when the DHT stopped first): then there is
            # nothing to remove, and its socket errors are expected.
            with contextlib.suppress(TimeoutError, *_STREAM_ERRORS):
                async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
                    await self._p2p.remove_binary_stream_handler(self.handler_name)
        for writer in list(self._outbound):
            writer.close()
        tasks = [t for t in self._serving if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_p2p:
            await self._p2p.shutdown()

    # -- serving ----------------------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> None:
        if self._inflight_bytes + nbytes > self.max_inflight_bytes:
            raise _Busy(f"receive budget of {self.max_inflight_bytes} bytes is in use; retry later")
        self._inflight_bytes += nbytes

    async def _handle_stream(self, info: StreamInfo, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        try:
            await self.serve_one(info.peer_id.to_base58(), reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("unexpected error while serving a stream from %s", info.peer_id)
        finally:
            writer.close()
            if task is not None:
                self._serving.discard(task)

    async def serve_one(self, sender: str, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bool:
        """Read one request from `sender`, dispatch it and write the response.

        Used by the libp2p handler and by the direct channel. Returns False when the stream is finished
        (closed by the peer, broken, or a malformed request was answered and the stream must be closed).
        """
        reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            self._reserve(nbytes)
            reserved = nbytes

        try:
            try:
                data = await read_message(reader, self.max_message_bytes, self.idle_timeout, reserve)
            except BadMessage as e:
                # Refused before the payload was read: answer with the reason, then close the stream
                # (its remaining bytes are not read).
                self.reject(sender, e.code, str(e))
                await self._answer_error(writer, e.code, str(e))
                return False
            except _Busy as e:
                logger.warning("refusing a request from %s: %s", sender[-8:], e)
                await self._answer_error(writer, e.code, str(e))
                return False
            except asyncio.IncompleteReadError as e:
                if e.partial or e.expected != codec.HEADER.size:
                    logger.debug("stream from %s ended inside a request", sender[-8:])
                return False
            except (TimeoutError, ConnectionError, OSError) as e:
                logger.debug("stream from %s failed while reading a request: %r", sender[-8:], e)
                return False
            parts = await self._dispatch(sender, data)
            del data
        finally:
            self._inflight_bytes -= reserved
        try:
            await write_parts(writer, parts, self.idle_timeout)
        except (TimeoutError, ConnectionError, OSError) as e:
            # The caller gave up (timed out or was cancelled); it reports the failure on its side.
            logger.debug("could not answer %s: %r", sender[-8:], e)
            return False
        return True

    async def _answer_error(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            await write_parts(writer, self._error("", code, message), self.idle_timeout)

    # -- calling ----------------------------------------------------------------------------------
    async def _send(self, peer_id: str, method: str, parts: Sequence[memoryview], timeout: float
                    ) -> bytes | bytearray | memoryview:
        if self._closed:
            raise PeerUnreachable(f"cannot call {peer_id}: this transport is shut down")
        try:
            pid = PeerID.from_base58(peer_id)
        except ValueError as e:
            raise PeerUnreachable(f"invalid peer id {peer_id!r}") from e
        try:
            _, reader, writer = await self._p2p.call_binary_stream_handler(pid, self.handler_name)
        except _STREAM_ERRORS as e:
            raise PeerUnreachable(f"cannot open a stream to {peer_id}: {e}") from e
        self._outbound.add(writer)
        try:
            return await self.exchange(peer_id, reader, writer, parts, timeout)
        finally:
            # Also runs when the base class cancels a timed-out call: closing the socket makes p2pd
            # reset the libp2p stream, so the peer's handler stops too.
            self._outbound.discard(writer)
            writer.close()

    async def exchange(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       parts: Sequence[memoryview], timeout: float) -> bytearray:
        """Write a request and read its response on an open stream (used by both channels).

        The request is written by a separate task while the response is awaited, so that an early
        refusal (for example ``oversized``, sent before the payload is read) reaches the caller as the
        peer's error rather than as a broken pipe.

        :raises PeerUnreachable: the stream broke or ended before a whole response arrived.
        :raises BadMessage: the response is malformed or exceeds ``max_message_bytes`` (also counted).
        """
        write_task = asyncio.create_task(write_parts(writer, parts, timeout))
        try:
            return await read_message(reader, self.max_message_bytes, timeout)
        except BadMessage as e:
            self.reject(peer_id, e.code, f"response: {e}")
            raise
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
