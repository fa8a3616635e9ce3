"""`P2PTransport`: the real transport, over hivemind's libp2p daemon (p2pd), with a direct TLS fast path.

Every request is one libp2p stream to the peer's single handler (`RPC_HANDLER`, ``"p2pnode.rpc"``); the
method name travels in the envelope. On the stream the caller writes one framed request (see
`p2pnode.transport.codec`) and the receiver answers with one framed response, both written in pieces
of `CHUNK_BYTES`. A reader first reads the 4-byte header and the envelope, checks them against its size
limits, and only then maps one buffer for the whole message and reads the tensor bytes into it, so an
oversized or malformed message is refused before its payload is read. A buffer of at least
`LAZY_MIN_BYTES` is an anonymous private mapping (`lazy_buffer`): its pages cost memory only when bytes
are written into them, so an announced message costs resident memory at the rate its bytes arrive, not
at its announced size (the receive budget still reserves the announced size, as accounting).

Messages of at least ``direct_threshold`` bytes (default 1 MiB) take the direct channel when both peers
enable it (`p2pnode.transport.direct`): a ticket is asked for over libp2p, then the message travels over
a pinned TLS 1.3 connection. If the peer does not offer the channel or cannot be reached directly,
the message goes over libp2p instead (and that peer is not tried directly again for
``direct_retry_s``).

Limits against hostile peers (each refusal is counted in ``stats.rejected`` under the reason given):

- inbound requests hold at most ``max_inflight_bytes`` of receive buffers at once (all peers), and one
  peer at most ``max_inflight_bytes_per_peer`` (default a quarter of that, but never less than one
  largest message): ``busy``;
- at most ``max_streams`` inbound streams are served at once, at most ``max_streams_per_peer`` of one
  peer (``busy``);
- a payload that arrives below ``min_receive_rate`` (default 64 KiB/s, measured over windows of 3 s after
  a grace of 5 s) is refused and its reservation released (``too_slow``); so is a request that stalls
  for ``idle_timeout``; a stream that ends inside a request is counted as ``truncated``;
- a request's method name is read before the rest of its envelope (`read_envelope`): a name longer than
  `codec.MAX_METHOD_BYTES` or not served here is refused at once (``unknown_method``), and at most
  `UNKNOWN_METHOD_DRAIN_BYTES` more of the stream are read before it closes;
- `Transport.admits` is asked before a request's payload is read and before a direct-channel ticket is
  issued (``not_admitted``); the direct channel has limits of its own (`direct.DirectServer`, set by the
  ``direct_max_*`` and ``direct_handshake_timeout`` parameters);
- a receive buffer whose message was refused is dropped from the reuse pool, so that large malformed
  messages do not leave the pool holding memory;
- a peer refused more than ``tarpit_refusals`` times within ``tarpit_window_s`` (wire refusals and streams
  beyond its stream limit, see `tarpit.Tarpit`; default 20 per 10 s) has its streams held unread for
  ``tarpit_hold_s`` (default 5 s), then closed, until ``tarpit_window_s`` after that refusal (``tarpit``);
  held streams count against ``max_streams_per_peer``, and its streams beyond that limit are closed at once.

The peer id is the libp2p id (base58) of the underlying p2pd; a node passes the `P2P` replica of its DHT
(``await dht.replicate_p2p()``) so that its RPC handlers and its DHT records share one identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import mmap
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from p2pnode.errors import BadMessage, PeerUnreachable, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.base import Transport
from p2pnode.transport.codec import Message
from p2pnode.transport.compression import Compression
from p2pnode.transport.direct import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_PEER,
    MAX_PENDING_HANDSHAKES,
    MAX_TICKETS,
    MAX_TICKETS_PER_PEER,
    Busy,
    ConnectionPool,
    DirectServer,
    Ticket,
    TLSConnection,
)
from p2pnode.transport.rate import DEFAULT_GRACE_S, DEFAULT_MIN_RATE, RateGuard, TooSlow
from p2pnode.transport.refusals import clip
from p2pnode.transport.tarpit import (
    DEFAULT_HOLD_S,
    DEFAULT_MAX_REFUSALS,
    DEFAULT_WINDOW_S,
    STREAMS_PER_PEER,
    Tarpit,
)

logger = logging.getLogger(__name__)

#: Name of the one libp2p stream handler a transport registers.
RPC_HANDLER = "p2pnode.rpc"
#: Method (inside the envelope) that asks a peer for a direct-channel ticket.
DIRECT_TICKET_METHOD = "_p2pnode.direct_ticket"
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
#: Default smallest message that takes the direct channel, in bytes (1 MiB): below it, the extra round
#: trip for the ticket costs more than the faster channel saves.
DEFAULT_DIRECT_THRESHOLD = 1 << 20
#: Longest time a refused request's remaining bytes are read and dropped before the stream closes, in s.
REFUSAL_DRAIN_S = 5.0
#: Most bytes read and dropped after a request refused for its method (``unknown_method``), before the
#: stream closes (64 KiB). An honest caller reads the refusal while it writes and closes at once; one that
#: keeps writing a large request to a method this node lacks may see the stream reset instead. Without the
#: bound a flood of requests with megabyte method names cost their whole size in reads (see
#: docs/benchmarks.md, hostile swarm).
UNKNOWN_METHOD_DRAIN_BYTES = 64 << 10
#: Default time during which a peer that could not be reached directly is only called over libp2p, in s.
DEFAULT_DIRECT_RETRY = 60.0
#: Default most bytes of receive buffers kept for reuse (512 MiB); 0 turns reuse off.
DEFAULT_RECEIVE_POOL_BYTES = 512 << 20
#: Messages smaller than this get a fresh buffer (reuse pays off for large ones only), in bytes.
POOLED_MIN_BYTES = 1 << 20
#: Receive buffers of at least this many bytes are anonymous mappings whose pages are touched only as
#: bytes arrive (`lazy_buffer`); smaller ones are plain `bytearray`s (a mapping costs two system calls,
#: not worth it for so few bytes; a peer holds at most ``max_streams_per_peer`` of them at once).
LAZY_MIN_BYTES = 256 << 10
#: Default most inbound streams served at once, all peers together / of one peer.
DEFAULT_MAX_STREAMS = 128
DEFAULT_MAX_STREAMS_PER_PEER = 8
#: Longest time a stream refused for the per-peer stream limit is drained before it closes, in seconds.
BUSY_DRAIN_S = 1.0
#: Seconds an answered libp2p stream waits at most for the caller to close it (`serve_one`).
ANSWER_LINGER_S = 5.0

_STREAM_ERRORS = (asyncio.IncompleteReadError, ConnectionError, OSError, P2PDaemonError)
_TLS_ERRORS = (asyncio.IncompleteReadError, OSError, ssl.SSLError)


class _Busy(TransportError):
    """The receive budget is spent; the request is refused with ``busy`` (retry later)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="busy")


# -- framing over either channel --------------------------------------------------------------------
class StreamIO:
    """A libp2p stream (reader and writer from p2pd) as a message source and sink.

    :param idle_timeout: longest wait for the next bytes, or for the peer to take the next piece, in s.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 idle_timeout: float) -> None:
        self.reader, self.writer, self.idle_timeout = reader, writer, idle_timeout
        #: Bytes read from the stream so far (`drain` included), in bytes.
        self.bytes_read = 0

    async def readexactly(self, n: int) -> bytes:
        async with asyncio.timeout(self.idle_timeout):
            data = await self.reader.readexactly(n)
        self.bytes_read += n
        return data

    async def readinto(self, view: memoryview, rate: RateGuard | None = None) -> None:
        pos, total = 0, view.nbytes
        while pos < total:
            try:
                async with asyncio.timeout(self.idle_timeout if rate is None else rate.wait_s(self.idle_timeout)):
                    chunk = await self.reader.read(min(CHUNK_BYTES, total - pos))
            except TimeoutError:
                if rate is None:
                    raise
                rate.progress(0)  # raises TooSlow when the window that just ended was too slow
                if rate.idle_for() >= self.idle_timeout:
                    raise
                continue
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(view[:pos]), total)
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
            self.bytes_read += len(chunk)
            if rate is not None:
                rate.progress(len(chunk))

    async def write(self, view: memoryview) -> None:
        for offset in range(0, view.nbytes, CHUNK_BYTES):
            self.writer.write(view[offset:offset + CHUNK_BYTES])
            async with asyncio.timeout(self.idle_timeout):
                await self.writer.drain()

    async def drain(self, seconds: float, max_bytes: int | None = None) -> int:
        """Read and drop what the peer still sends, until it closes the stream, `seconds` pass or (when
        given) `max_bytes` are read; return the bytes dropped.

        After an early refusal the caller is still sending its payload. Closing at once would make p2pd
        reset the stream, and a reset can overtake the refusal we wrote: the caller would see a broken
        stream instead of the reason. The caller closes as soon as it has read the refusal.
        """
        dropped = 0
        with contextlib.suppress(TimeoutError, OSError, asyncio.IncompleteReadError):
            async with asyncio.timeout(seconds):
                while max_bytes is None or dropped < max_bytes:
                    chunk = await self.reader.read(CHUNK_BYTES if max_bytes is None
                                                   else min(CHUNK_BYTES, max_bytes - dropped))
                    if not chunk:
                        break
                    dropped += len(chunk)
        self.bytes_read += dropped
        return dropped


class TLSIO:
    """A direct-channel connection as a message source and sink (see `StreamIO`)."""

    def __init__(self, conn: TLSConnection, idle_timeout: float) -> None:
        self.conn, self.idle_timeout = conn, idle_timeout

    async def readexactly(self, n: int) -> bytes:
        return await self.conn.readexactly(n, self.idle_timeout)

    async def readinto(self, view: memoryview, rate: RateGuard | None = None) -> None:
        await self.conn.readinto(view, self.idle_timeout, rate)

    async def write(self, view: memoryview) -> None:
        await self.conn.write(view, self.idle_timeout)


MessageIO = StreamIO | TLSIO


#: A receive buffer: a `bytearray` (small) or an anonymous private mapping (large, see `lazy_buffer`).
Buffer = bytearray | mmap.mmap


def lazy_buffer(nbytes: int) -> memoryview:
    """A writable, zero-filled buffer of `nbytes` bytes that costs resident memory only where it is written.

    From `LAZY_MIN_BYTES` on, the buffer is an anonymous private mapping: the kernel hands out its pages
    (zeroed) on the first write to each, so a message announced at 1 GiB whose sender then stalls costs
    the bytes it sent, not 1 GiB. (``bytearray(n)`` zero-fills, so touches, every page at once.) The
    mapping is unmapped when the last reference to it (a memoryview, a tensor built on it) is gone.
    """
    if nbytes < LAZY_MIN_BYTES:
        return memoryview(bytearray(nbytes))
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))


class ReceiveBuffers:
    """Receive buffers that are reused once nothing refers to them any more.

    A fresh 100 MB buffer costs about as much CPU as receiving it over a plain socket (zero-filling and
    page faults), so large buffers are kept and handed out again. A buffer is free when its only
    reference is this pool's: tensors decoded from a message keep a reference to its buffer (through
    the memoryview they were built on), so a buffer whose tensors a handler kept is never overwritten.

    :param max_bytes: most bytes kept for reuse (default 512 MiB); 0 turns reuse off.
    """

    def __init__(self, max_bytes: int = DEFAULT_RECEIVE_POOL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._bufs: list[Buffer] = []
        self.reused = 0
        #: Buffers dropped from the pool because their message was refused or broke off.
        self.discarded = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers the pool keeps (free or in use)."""
        return sum(len(b) for b in self._bufs)

    def discard(self, view: memoryview) -> None:
        """Drop the buffer under `view` from the pool: its message was refused or never completed.

        A refused message says nothing about the sizes honest peers send; keeping its buffer would let
        large malformed messages leave the pool holding up to ``max_bytes``. The memory is freed once
        the caller's last reference to `view` is gone.
        """
        obj = view.obj
        for i, buf in enumerate(self._bufs):
            if buf is obj:
                del self._bufs[i]
                self.discarded += 1
                return

    def trim(self, max_bytes: int = 0) -> int:
        """Drop free buffers, oldest first, until at most `max_bytes` are kept; return the bytes dropped."""
        dropped, i = 0, 0
        total = self.held_bytes
        while i < len(self._bufs) and total > max_bytes:
            if sys.getrefcount(self._bufs[i]) == 2:
                total -= len(self._bufs[i])
                dropped += len(self._bufs[i])
                del self._bufs[i]
            else:
                i += 1
        return dropped

    def take(self, nbytes: int) -> memoryview:
        """A writable buffer of exactly `nbytes` bytes (its contents are undefined).

        A new buffer is a `lazy_buffer`: it costs memory as it is written. A reused one was written
        before, so it costs nothing more.
        """
        if nbytes < POOLED_MIN_BYTES or nbytes > self.max_bytes:
            return lazy_buffer(nbytes)
        best = -1
        for i in range(len(self._bufs)):
            size = len(self._bufs[i])
            # 2 references: this list and getrefcount's argument. Sizes up to 2x avoid wasting a huge
            # buffer on a small message.
            if (nbytes <= size <= 2 * nbytes and sys.getrefcount(self._bufs[i]) == 2
                    and (best < 0 or size < len(self._bufs[best]))):
                best = i
        if best >= 0:
            self.reused += 1
            return memoryview(self._bufs[best])[:nbytes]
        view = lazy_buffer(nbytes)
        self._admit(view.obj)  # type: ignore[arg-type]
        return view

    def _admit(self, buf: Buffer) -> None:
        total = sum(len(b) for b in self._bufs)
        if total + len(buf) > self.max_bytes:
            # Drop free buffers, oldest first, until the new one fits.
            i = 0
            while i < len(self._bufs) and total + len(buf) > self.max_bytes:
                if sys.getrefcount(self._bufs[i]) == 2:
                    total -= len(self._bufs[i])
                    del self._bufs[i]
                else:
                    i += 1
        if total + len(buf) <= self.max_bytes:
            self._bufs.append(buf)


async def write_message(io: MessageIO, parts: Sequence[memoryview]) -> None:
    """Write an encoded message (its parts in order)."""
    for part in parts:
        await io.write(part.cast("B") if part.format != "B" else part)


async def read_message(io: MessageIO, max_message_bytes: int,
                       reserve: Callable[[int], None] | None = None,
                       buffers: ReceiveBuffers | None = None, rate: RateGuard | None = None,
                       admit: Callable[[peer_pb2.Envelope], None] | None = None,
                       known_method: Callable[[str], bool] | None = None) -> memoryview:
    """Read one framed message, checking the limits before its payload is read.

    The header and envelope are read and checked first (`codec.parse_header`, `codec.parse_envelope`);
    then one buffer of the announced size is mapped (`lazy_buffer`: it costs memory as bytes arrive, not
    at once) and the tensor bytes are read into it.

    :param max_message_bytes: largest accepted message, in bytes.
    :param reserve: optional ``reserve(nbytes)``, called before the buffer is allocated; it may raise to
        refuse the message (used for the receive budget).
    :param buffers: where to take the buffer from (default: a fresh one); a buffer whose message does
        not arrive completely is dropped from it.
    :param rate: minimum-rate check of the payload (started when the payload starts).
    :param admit: optional ``admit(envelope)``, called before anything else is done with the message; it
        raises `BadMessage` to refuse it (admission control: an outsider's payload is never read).
    :param known_method: optional ``known_method(name)`` (serving side): an envelope that starts with its
        method name (every one of ours does) is refused as ``unknown_method`` once the name is read, if the
        name is unknown or longer than `codec.MAX_METHOD_BYTES`, before the rest of the envelope is read
        (`read_envelope`).
    :raises BadMessage: the message is malformed or oversized (nothing after the envelope was read).
    :raises rate.TooSlow: the payload arrived below the minimum rate.
    :raises asyncio.IncompleteReadError: the stream ended inside the message.
    :raises TimeoutError: no bytes arrived for the channel's idle timeout.
    """
    head = await io.readexactly(codec.HEADER.size)
    n = codec.parse_header(head, max_message_bytes)
    env_bytes = await read_envelope(io, n, known_method)
    env = codec.parse_envelope(env_bytes, max_message_bytes)
    if admit is not None:
        admit(env)
    start = codec.HEADER.size + n
    total = start + env.payload_bytes
    if reserve is not None:
        reserve(total)
    buf = buffers.take(total) if buffers is not None else lazy_buffer(total)
    buf[:codec.HEADER.size] = head
    buf[codec.HEADER.size:start] = env_bytes
    if rate is not None:
        rate.restart()  # the rate is the payload's: the header and envelope were checked already
    try:
        await io.readinto(buf[start:], rate)
    except BaseException:
        if buffers is not None:
            buffers.discard(buf)
        raise
    return buf


async def read_envelope(io: MessageIO, n: int, known_method: Callable[[str], bool] | None = None) -> bytes:
    """Read an envelope of `n` bytes; with `known_method`, refuse an unknown method after reading its name.

    The envelope's first bytes say where its method name lies (`codec.method_prefix`): a name longer than
    `codec.MAX_METHOD_BYTES` is refused from its length alone, an unknown one once its bytes are read, so a
    request with a 2 MB method name costs 3 bytes read, not 2 MB. An envelope that does not start with its
    method (no encoder of ours writes one) is read whole and checked after parsing, as before.

    :raises BadMessage: ``unknown_method``.
    """
    if known_method is None or n < 3:
        return await io.readexactly(n)
    first = await io.readexactly(3)
    where = codec.method_prefix(first)
    if where is None or where[0] + where[1] > n:
        return first + await io.readexactly(n - len(first))  # malformed or reordered: the parser decides
    start, length = where
    read = first + await io.readexactly(start + length - len(first)) if start + length > len(first) else first
    try:
        name = read[start:start + length].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMessage(f"method name is not UTF-8: {e}", code="malformed") from e
    if not known_method(name):
        raise BadMessage(f"unknown method {clip(repr(name), 100)}", code="unknown_method")
    return read + await io.readexactly(n - len(read))


class P2PTransport(Transport):
    """Request/response messaging over libp2p streams of hivemind's p2pd, with a direct TLS fast path.

    Create it with `P2PTransport.create` (it registers the stream handler). Either pass a `P2P` that
    someone else owns (normally ``await dht.replicate_p2p()``), or let `create` start a p2pd of its own.

    :param p2p: the libp2p daemon handle to use.
    :param owns_p2p: whether `shutdown` also stops `p2p` (default False).
    :param max_message_bytes: largest message sent or accepted, in bytes (default 1 GiB).
    :param handler_name: libp2p protocol name of the handler (default ``"p2pnode.rpc"``).
    :param idle_timeout: serving side: longest wait for the next bytes of a request or for the caller to
        take the response, in seconds (default 30).
    :param max_inflight_bytes: inbound request bytes held at once, in bytes (default 2x
        ``max_message_bytes``); requests beyond it are answered with the ``busy`` error code.
    :param max_inflight_bytes_per_peer: inbound request bytes one peer may hold at once, in bytes
        (default: a quarter of `max_inflight_bytes`, but at least one largest message, so that a message
        of ``max_message_bytes`` can always be received); beyond it: ``busy``.
    :param max_streams: inbound libp2p streams served at once, all peers together (default 128); a
        stream beyond it is closed at once (``busy``).
    :param max_streams_per_peer: inbound libp2p streams of one peer served at once (default 8); a stream
        beyond it is answered ``busy``.
    :param min_receive_rate: smallest accepted rate of a request's payload, in bytes per second (default
        64 KiB/s; 0: off); a slower sender is refused with ``too_slow`` and its reservation released.
    :param receive_grace_s: time after a payload starts during which any rate is accepted, in seconds
        (default 5).
    :param direct: offer and use the direct TLS channel for large messages (default True).
    :param direct_threshold: smallest message sent over the direct channel, in bytes (default 1 MiB).
    :param direct_host: IP address the direct channel listens on (default: the first non-loopback IPv4
        address among the visible libp2p multiaddrs, else 127.0.0.1).
    :param direct_advertise_host: IP address given to peers (default: `direct_host`; required when
        listening on 0.0.0.0).
    :param direct_port: TCP port of the direct channel (default 0: any free port).
    :param direct_connect_timeout: longest wait for the TCP connection to a peer's direct address, in s
        (default 5); the TLS handshake that follows may take the rest of the call's timeout.
    :param direct_retry_s: after a failed direct connection, how long that peer is only called over
        libp2p, in seconds (default 60).
    :param direct_max_connections: the direct channel's most connections at once, all states (default
        128), see `direct.DirectServer`.
    :param direct_max_pending: its most connections still in their TLS handshake (default 64).
    :param direct_max_connections_per_peer: its most admitted connections of one peer (default 8).
    :param direct_max_tickets_per_peer: its most unused tickets of one peer (default 32).
    :param direct_max_tickets: its most unused tickets of all peers together (default 4096).
    :param direct_handshake_timeout: longest wait for a direct connection's TLS handshake and first token,
        in seconds (default None: the larger of `idle_timeout` and 30).
    :param receive_pool_bytes: most bytes of large receive buffers kept for reuse (default 512 MiB;
        0: off), see `ReceiveBuffers`.
    :param compression: the node's wire format for models and updates (default ``none``), see
        `Transport`.
    :param tarpit_refusals: wire refusals of one peer allowed within `tarpit_window_s` before its streams
        are held (default 20; 0: off), see `tarpit.Tarpit`.
    :param tarpit_window_s: the window, and the penalty, in seconds (default 10).
    :param tarpit_hold_s: how long each stream of a peer in the tarpit is held unread before it is
        closed, in seconds (default 5).
    """

    def __init__(self, p2p: P2P, *, owns_p2p: bool = False,
                 max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                 handler_name: str = RPC_HANDLER, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_inflight_bytes: int | None = None, direct: bool = True,
                 direct_threshold: int = DEFAULT_DIRECT_THRESHOLD, direct_host: str | None = None,
                 direct_advertise_host: str | None = None, direct_port: int = 0,
                 direct_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 direct_retry_s: float = DEFAULT_DIRECT_RETRY,
                 direct_max_connections: int = MAX_CONNECTIONS, direct_max_pending: int = MAX_PENDING_HANDSHAKES,
                 direct_max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
                 direct_max_tickets_per_peer: int = MAX_TICKETS_PER_PEER, direct_max_tickets: int = MAX_TICKETS,
                 direct_handshake_timeout: float | None = None,
                 receive_pool_bytes: int = DEFAULT_RECEIVE_POOL_BYTES,
                 max_inflight_bytes_per_peer: int | None = None,
                 max_streams: int = DEFAULT_MAX_STREAMS, max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
                 min_receive_rate: float = DEFAULT_MIN_RATE, receive_grace_s: float = DEFAULT_GRACE_S,
                 compression: Compression | str | None = None, tarpit_refusals: int = DEFAULT_MAX_REFUSALS,
                 tarpit_window_s: float = DEFAULT_WINDOW_S, tarpit_hold_s: float = DEFAULT_HOLD_S) -> None:
        super().__init__(max_message_bytes=max_message_bytes, compression=compression)
        #: Refusals per peer; peers past their budget have their streams held (`_handle_stream`).
        self.tarpit = Tarpit(tarpit_refusals, tarpit_window_s, tarpit_hold_s)
        self._p2p = p2p
        self._owns_p2p = owns_p2p
        self._peer_id: str = p2p.peer_id.to_base58()
        self.handler_name = handler_name
        self.idle_timeout = idle_timeout
        self.max_inflight_bytes = (max_inflight_bytes if max_inflight_bytes is not None
                                   else DEFAULT_INFLIGHT_MESSAGES * max_message_bytes)
        self.max_inflight_bytes_per_peer = (
            max_inflight_bytes_per_peer if max_inflight_bytes_per_peer is not None
            else min(self.max_inflight_bytes, max(self.max_inflight_bytes // 4, max_message_bytes)))
        self._inflight_bytes = 0
        self._inflight_by_peer: dict[str, int] = {}
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self._streams = 0
        self._streams_by_peer: dict[str, int] = {}
        self.min_receive_rate = min_receive_rate
        self.receive_grace_s = receive_grace_s
        self.buffers = ReceiveBuffers(receive_pool_bytes)
        self._maddrs: list[str] = []
        self._started = False
        self._closed = False
        #: Serving tasks (one per inbound stream), cancelled on shutdown.
        self._serving: set[asyncio.Task[Any]] = set()
        #: Writers of outbound calls in flight, closed on shutdown so that those calls fail promptly.
        self._outbound: set[asyncio.StreamWriter] = set()
        # Direct channel.
        self.direct_enabled = direct
        self.direct_threshold = direct_threshold
        self._direct_host = direct_host
        self._direct_advertise_host = direct_advertise_host
        self._direct_port = direct_port
        self.direct_connect_timeout = direct_connect_timeout
        self.direct_retry_s = direct_retry_s
        #: Keyword arguments of the `DirectServer` (its limits), see the class doc.
        self.direct_limits: dict[str, Any] = {
            "max_connections": direct_max_connections, "max_pending": direct_max_pending,
            "max_connections_per_peer": direct_max_connections_per_peer,
            "max_tickets_per_peer": direct_max_tickets_per_peer, "max_tickets": direct_max_tickets,
            "handshake_timeout": (max(idle_timeout, DEFAULT_HANDSHAKE_TIMEOUT) if direct_handshake_timeout is None
                                  else direct_handshake_timeout)}
        self._direct: DirectServer | None = None
        self._pool = ConnectionPool()
        self._outbound_tls: set[TLSConnection] = set()
        #: Peers not to try directly before the given time (time.monotonic()).
        self._no_direct_until: dict[str, float] = {}
        #: Messages sent over the direct channel / sent over libp2p because the direct one failed.
        self.direct_messages = 0
        self.direct_fallbacks = 0

    # -- construction and lifecycle ---------------------------------------------------------------
    @classmethod
    async def create(cls, p2p: P2P | None = None, *, owns_p2p: bool | None = None,
                     **options: Any) -> P2PTransport:
        """Create and start a transport.

        :param p2p: an existing `P2P` (for example ``await dht.replicate_p2p()``); when None, a new p2pd
            is started (listening on ``/ip4/127.0.0.1/tcp/0`` unless ``host_maddrs`` is given) and owned
            by the transport.
        :param owns_p2p: whether `shutdown` stops the `P2P` (default: only when the transport started it).
        :param options: the class's keyword parameters (``max_message_bytes``, ``direct``, ...); any other
            keyword goes to `P2P.create` (only when `p2p` is None).
        """
        own = p2p is None
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "p2p", "owns_p2p"}
        mine = {k: v for k, v in options.items() if k in names}
        p2p_kwargs = {k: v for k, v in options.items() if k not in names}
        if p2p is None:
            p2p_kwargs.setdefault("host_maddrs", ["/ip4/127.0.0.1/tcp/0"])
            p2p = await P2P.create(**p2p_kwargs)
        elif p2p_kwargs:
            raise TypeError(f"unknown options {sorted(p2p_kwargs)} (P2P options need p2p=None)")
        transport = cls(p2p, owns_p2p=own if owns_p2p is None else owns_p2p, **mine)
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

    @property
    def direct_address(self) -> tuple[str, int] | None:
        """(host, port) the direct channel gives to peers, or None when it is off."""
        return None if self._direct is None else (self._direct.advertise_host, self._direct.port)

    def addresses(self) -> list[str]:
        """Multiaddrs (with ``/p2p/<peer id>``) at which p2pd listens, as seen when the transport started."""
        return list(self._maddrs)

    async def refresh_addresses(self) -> list[str]:
        """Ask p2pd for its current visible multiaddrs (they may change behind NAT) and return them."""
        self._maddrs = [str(a) for a in await self._p2p.get_visible_maddrs(latest=True)]
        return self.addresses()

    async def start(self) -> None:
        """Register the stream handler with p2pd and start the direct channel (idempotent)."""
        if self._started:
            return
        if self._closed:
            raise TransportError("transport is shut down", code="unavailable")
        async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
            self._maddrs = [str(a) for a in await self._p2p.get_visible_maddrs()]
        if self.direct_enabled:
            host = self._direct_host or _first_ipv4(self._maddrs)
            self._direct = DirectServer(host=host, port=self._direct_port,
                                        advertise_host=self._direct_advertise_host,
                                        idle_timeout=2 * self.idle_timeout, on_reject=self.reject,
                                        **self.direct_limits)
            await self._direct.start(self._serve_direct)
            self.register(DIRECT_TICKET_METHOD, peer_pb2.Envelope, self._issue_ticket)
        async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
            await self._p2p.add_binary_stream_handler(self.handler_name, self._handle_stream)
        self._started = True

    async def rebind(self, p2p: P2P) -> None:
        """Move to `p2p`, a new libp2p daemon of the same identity (the old one died and was restarted).

        Registers the stream handler there, refreshes the addresses, and closes the calls in flight on
        the old daemon (they fail with `PeerUnreachable`). The caller shuts the old `P2P` down when it
        owns it; this transport owns `p2p` only if it owned the old one.

        :raises TransportError: `p2p` has another peer id, or did not take the handler in time.
        """
        if p2p.peer_id.to_base58() != self._peer_id:
            raise TransportError(f"cannot rebind to {p2p.peer_id}: this transport is {self._peer_id}")
        self._p2p = p2p
        for writer in list(self._outbound):
            writer.close()
        if self._started and not self._closed:
            async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
                self._maddrs = [str(a) for a in await p2p.get_visible_maddrs()]
                await p2p.add_binary_stream_handler(self.handler_name, self._handle_stream)

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
        for conn in list(self._outbound_tls):
            conn.close()
        self._pool.close_all()
        if self._direct is not None:
            await self._direct.shutdown()
        tasks = [t for t in self._serving if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_p2p:
            await self._p2p.shutdown()

    # -- serving ----------------------------------------------------------------------------------
    @property
    def inflight_bytes(self) -> int:
        """Bytes of receive buffers reserved by inbound requests now."""
        return self._inflight_bytes

    def _reserve(self, peer_id: str, nbytes: int) -> None:
        mine = self._inflight_by_peer.get(peer_id, 0)
        if mine + nbytes > self.max_inflight_bytes_per_peer:
            raise _Busy(f"this peer holds {mine} bytes of receive buffers; a request of {nbytes} more would "
                        f"pass its share of {self.max_inflight_bytes_per_peer}; retry later")
        if self._inflight_bytes + nbytes > self.max_inflight_bytes:
            raise _Busy(f"receive budget of {self.max_inflight_bytes} bytes is in use; retry later")
        self._inflight_bytes += nbytes
        self._inflight_by_peer[peer_id] = mine + nbytes

    def _release(self, peer_id: str, nbytes: int) -> None:
        self._inflight_bytes -= nbytes
        left = self._inflight_by_peer.get(peer_id, 0) - nbytes
        if left > 0:
            self._inflight_by_peer[peer_id] = left
        else:
            self._inflight_by_peer.pop(peer_id, None)

    async def _handle_stream(self, info: StreamInfo, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        sender = info.peer_id.to_base58()
        if self._streams >= self.max_streams:
            # Beyond the total, a stream gets nothing but a close: answering a flood would cost more.
            self.reject(sender, "busy", f"{self._streams} inbound streams are being served; the limit is "
                                        f"{self.max_streams}")
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        mine = self._streams_by_peer.get(sender, 0)
        self._streams += 1
        self._streams_by_peer[sender] = mine + 1
        io = StreamIO(reader, writer, self.idle_timeout)
        try:
            if self.tarpit.holds(sender):
                # Past its refusal budget: nothing is read or answered; the stream waits, then closes.
                self.reject(sender, "tarpit", f"refused more than {self.tarpit.max_refusals} times in "
                                              f"{self.tarpit.window_s:g} s; streams held for {self.tarpit.hold_s:g} s")
                if mine < self.max_streams_per_peer:
                    await asyncio.sleep(self.tarpit.hold_s)
            elif mine >= self.max_streams_per_peer:
                message = (f"{mine} streams of this peer are being served; the limit is "
                           f"{self.max_streams_per_peer}; retry later")
                self.reject(sender, "busy", message)
                self.tarpit.note(sender, STREAMS_PER_PEER)
                await self._answer_error(io, "busy", message, drain_s=BUSY_DRAIN_S)
            else:
                await self.serve_one(sender, io)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("unexpected error while serving a stream from %s", info.peer_id)
        finally:
            writer.close()
            self._streams -= 1
            left = self._streams_by_peer.get(sender, 1) - 1
            if left > 0:
                self._streams_by_peer[sender] = left
            else:
                self._streams_by_peer.pop(sender, None)
            if task is not None:
                self._serving.discard(task)

    def reject(self, peer_id: str, reason: str, message: str) -> None:
        super().reject(peer_id, reason, message)
        self.tarpit.note(peer_id, reason)

    async def _serve_direct(self, sender: str, conn: TLSConnection) -> bool:
        return await self.serve_one(sender, TLSIO(conn, self.idle_timeout))

    async def serve_one(self, sender: str, io: MessageIO) -> bool:
        """Read one request from `sender`, dispatch it and write the response.

        Returns False when the channel must be closed (closed or broken by the peer, or a refused
        request whose remaining bytes were not read).
        """
        reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            self._reserve(sender, nbytes)
            reserved = nbytes

        try:
            try:
                data = await read_message(io, self.max_message_bytes, reserve, self.buffers,
                                          RateGuard(self.min_receive_rate, grace_s=self.receive_grace_s),
                                          admit=lambda env: self.check_admission(sender, env),
                                          known_method=self._routes.__contains__)
            except TooSlow as e:
                # The payload was cut off: the reservation goes back now, and a slow sender is not drained.
                self.reject(sender, e.code, str(e))
                await self._answer_error(io, e.code, str(e), drain_s=0.0)
                return False
            except BadMessage as e:
                # Refused before the payload was read: answer with the reason, then close.
                self.reject(sender, e.code, str(e))
                self._count_refused_read(io)
                await self._answer_error(io, e.code, str(e), drain_bytes=(
                    UNKNOWN_METHOD_DRAIN_BYTES if e.code == "unknown_method" else None))
                return False
            except _Busy as e:
                self.reject(sender, e.code, str(e))
                await self._answer_error(io, e.code, str(e))
                return False
            except asyncio.IncompleteReadError as e:
                if e.partial or e.expected != codec.HEADER.size:
                    self.reject(sender, "truncated", f"the stream ended inside a request, after {len(e.partial)} "
                                                     f"of {e.expected} bytes of one of its parts")
                return False
            except TimeoutError:
                self.reject(sender, "too_slow", f"no bytes of a request for {io.idle_timeout:.0f} s")
                return False
            except (OSError, ssl.SSLError) as e:
                logger.debug("stream from %s failed while reading a request: %r", sender[-8:], e)
                return False
            # Admission was checked on the envelope before the payload was read (`read_message`'s `admit`).
            parts, ok = await self._dispatch_checked(sender, data, admitted=True)
            if not ok:
                self.buffers.discard(data)
            del data
        finally:
            self._release(sender, reserved)
        try:
            await write_message(io, parts)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            # The caller gave up (timed out or was cancelled); it reports the failure on its side.
            logger.debug("could not answer %s: %r", sender[-8:], e)
            return False
        if isinstance(io, StreamIO):
            # Close only once the caller has read the answer and closed its side: a close while p2pd still
            # holds the answer's tail can make it reset the stream, and the caller then reads a truncated
            # answer (seen with 16 MiB answers on a loaded machine).
            await io.drain(min(self.idle_timeout, ANSWER_LINGER_S))
        return True

    def _count_refused_read(self, io: MessageIO) -> None:
        if isinstance(io, StreamIO):
            self.stats.refused_bytes_read += io.bytes_read

    async def _answer_error(self, io: MessageIO, code: str, message: str, drain_s: float = REFUSAL_DRAIN_S,
                            drain_bytes: int | None = None) -> None:
        """Answer a request refused before its payload was read (then drain a libp2p stream for at most
        `drain_s` seconds and, when given, `drain_bytes` bytes, see `StreamIO.drain`; counted in
        ``stats.refused_bytes_drained``)."""
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            await write_message(io, self._error("", code, message))
        if isinstance(io, StreamIO) and drain_s > 0:
            self.stats.refused_bytes_drained += await io.drain(min(self.idle_timeout, drain_s), drain_bytes)
        # On the direct channel, refusals of size happen at the ticket; a message that differs from its
        # ticket is not worth draining: the connection is closed and the caller sees it break.

    async def _issue_ticket(self, sender: str, request: Message[peer_pb2.Envelope]
                            ) -> Message[peer_pb2.Envelope]:
        """Direct channel: check the envelope of the message the sender wants to send, then admit it."""
        codec.parse_envelope(request.body.SerializeToString(), self.max_message_bytes)  # BadMessage if not ok
        # Tickets only for admitted peers: the ticket request passed `_dispatch`'s check, and the message
        # it announces must carry a valid proof too.
        self.check_admission(sender, request.body)
        if self._direct is None:
            raise TransportError("direct channel is off", code="unavailable")
        try:
            ticket = self._direct.issue(sender)
        except Busy as e:
            self.reject(sender, "busy", f"direct-channel ticket: {e}")
            raise
        return Message(peer_pb2.Envelope(method=DIRECT_TICKET_METHOD, body=ticket.to_bytes()))

    # -- calling ----------------------------------------------------------------------------------
    async def _send(self, peer_id: str, method: str, parts: Sequence[memoryview], timeout: float
                    ) -> bytes | bytearray | memoryview:
        if self._closed:
            raise PeerUnreachable(f"cannot call {peer_id}: this transport is shut down")
        if (self.direct_enabled and codec.encoded_size(parts) >= self.direct_threshold
                and self._no_direct_until.get(peer_id, 0.0) <= time.monotonic()):
            deadline = time.monotonic() + timeout
            data = await self._send_direct(peer_id, parts, timeout)
            if data is not None:
                return data
            self.direct_fallbacks += 1
            timeout = max(0.0, deadline - time.monotonic())
        return await self._send_libp2p(peer_id, parts, timeout)

    async def _send_libp2p(self, peer_id: str, parts: Sequence[memoryview], timeout: float) -> memoryview:
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
            return await self._exchange_stream(peer_id, StreamIO(reader, writer, timeout), parts)
        finally:
            # Also runs when the base class cancels a timed-out call: closing the socket makes p2pd
            # reset the libp2p stream, so the peer's handler stops too.
            self._outbound.discard(writer)
            writer.close()

    async def _exchange_stream(self, peer_id: str, io: StreamIO, parts: Sequence[memoryview]) -> memoryview:
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

    async def _read_response(self, peer_id: str, io: MessageIO) -> memoryview:
        try:
            return await read_message(io, self.max_message_bytes, buffers=self.buffers)
        except BadMessage as e:
            self.reject(peer_id, e.code, f"response: {e}")
            raise

    async def _send_direct(self, peer_id: str, parts: Sequence[memoryview], timeout: float
                           ) -> memoryview | None:
        """Send over the direct channel; None means "use libp2p instead" (the peer has no direct channel
        or cannot be reached directly). A refusal of the ticket is returned as the peer's response."""
        head = parts[0]
        inner = peer_pb2.Envelope.FromString(bytes(head[codec.HEADER.size:]))
        request = self.encode_request(peer_id, DIRECT_TICKET_METHOD, Message(inner))
        reply = await self._send_libp2p(peer_id, request, timeout)
        try:
            env, _ = codec.decode(reply, self.max_message_bytes)
            if env.error == peer_pb2.UNKNOWN_METHOD or env.error == peer_pb2.UNAVAILABLE:
                self._no_direct_until[peer_id] = time.monotonic() + self.direct_retry_s
                return None
            if env.error == peer_pb2.BUSY:
                return None  # the peer's direct channel is at a limit: this message goes over libp2p
            if env.error != peer_pb2.OK:
                return reply  # the peer refused this message (for example oversized): the caller's error
            ticket = Ticket.from_bytes(codec.parse_body(env, peer_pb2.Envelope).body)
        except (BadMessage, ValueError) as e:
            code = e.code if isinstance(e, BadMessage) else "malformed"
            self.reject(peer_id, code, f"direct-channel ticket: {e}")
            raise BadMessage(f"{peer_id} sent an invalid direct-channel ticket: {e}", code=code) from e

        conn = self._pool.get(peer_id, ticket.fingerprint)
        if conn is not None:
            data = await self._direct_exchange(peer_id, conn, ticket, parts, timeout, pooled=True)
            if data is not None:
                return data
        try:
            conn = await TLSConnection.connect(ticket.host, ticket.port, ticket.fingerprint,
                                               min(self.direct_connect_timeout, timeout), timeout)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as e:
            # IncompleteReadError: the peer closed the connection during the handshake (its direct
            # channel is at its connection limit).
            logger.info("no direct connection to %s at %s:%d (%r); using libp2p for %.0f s",
                        peer_id[-8:], ticket.host, ticket.port, e, self.direct_retry_s)
            self._no_direct_until[peer_id] = time.monotonic() + self.direct_retry_s
            return None
        return await self._direct_exchange(peer_id, conn, ticket, parts, timeout, pooled=False)

    async def _direct_exchange(self, peer_id: str, conn: TLSConnection, ticket: Ticket,
                               parts: Sequence[memoryview], timeout: float, *,
                               pooled: bool) -> memoryview | None:
        """Send the token, the request, and read the response on a direct connection.

        Returns None when a reused (`pooled`) connection turned out to be dead: it may have been closed
        by the peer while idle. The caller then retries once on a fresh connection with the same token;
        tokens are one-time, so the peer cannot handle the message twice.
        """
        self._outbound_tls.add(conn)
        done = False
        try:
            io = TLSIO(conn, timeout)
            await conn.write(memoryview(ticket.token), timeout)
            await write_message(io, parts)
            data = await self._read_response(peer_id, io)
            done = True
            self.direct_messages += 1
            return data
        except _TLS_ERRORS as e:
            if pooled:
                return None
            raise PeerUnreachable(f"direct connection to {peer_id} broke: {e!r}") from e
        finally:
            self._outbound_tls.discard(conn)
            if done and not self._closed:
                self._pool.put(peer_id, conn)
            else:
                conn.close()


def _first_ipv4(maddrs: Sequence[str]) -> str:
    """The IPv4 address of the first non-loopback ``/ip4/...`` multiaddr, else of the first loopback one,
    else 127.0.0.1. (p2pd listening on 0.0.0.0 lists every interface, loopback included.)"""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for maddr in maddrs:
        fields = maddr.split("/")
        if len(fields) > 2 and fields[1] == "ip4":
            with contextlib.suppress(ValueError):
                ip = ipaddress.ip_address(fields[2])
                if not ip.is_unspecified:
                    found.append(ip)
    for ip in sorted(found, key=lambda ip: ip.is_loopback):  # stable: keeps p2pd's order otherwise
        return str(ip)
    return "127.0.0.1"


def _task_error(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception of a finished task (None if it succeeded, was cancelled or is still running)."""
    if not task.done() or task.cancelled():
        return None
    return task.exception()
