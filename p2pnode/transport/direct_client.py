"""The sending side of the direct channel: one message's exchange on a pinned TLS connection, and reuse.

`p2pnode.transport.p2p.P2PTransport` asks the receiver for a `Ticket` over libp2p (the protocol is in
`p2pnode.transport.direct_server`) and hands it to `DirectClient.send`, which takes an idle connection
to that peer pinned to the ticket's fingerprint (`ConnectionPool`) or opens one, sends the token, the
framed request, and reads the framed response. Connections are kept for reuse (per peer, bounded, idle
ones closed); every message still carries a fresh ticket, so tokens stay one-time.

A peer that cannot be reached directly (no TCP connection within ``connect_timeout``, or a failed
handshake) is called over libp2p only for ``retry_s`` seconds (`DirectClient.reachable`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence

from p2pnode.errors import BadMessage, PeerUnreachable
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.framing import TLSIO, MessageIO, write_message
from p2pnode.transport.refusals import RejectCallback
from p2pnode.transport.ticket import Ticket
from p2pnode.transport.tls import TLSConnection

logger = logging.getLogger(__name__)

#: Default smallest message that takes the direct channel, in bytes (1 MiB): below it, the extra round
#: trip for the ticket costs more than the faster channel saves.
DEFAULT_DIRECT_THRESHOLD = 1 << 20
#: Default time during which a peer that could not be reached directly is only called over libp2p, in s.
DEFAULT_DIRECT_RETRY = 60.0
#: Default longest wait for a TCP connection to a peer's direct address, in seconds. Only the TCP
#: connect: it decides whether the address is reachable at all (else libp2p is used instead).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Default time a client keeps an idle connection for reuse, in seconds (below the server's, so that a
#: reused connection is rarely one the server is closing).
DEFAULT_CLIENT_IDLE = 30.0
#: Most idle connections kept per peer.
MAX_IDLE_PER_PEER = 4

_TLS_ERRORS = (asyncio.IncompleteReadError, OSError, ssl.SSLError)

#: Reads and checks one framed response from a peer: (peer id, channel) -> the message's bytes.
ReadResponse = Callable[[str, MessageIO], Awaitable[memoryview]]


class ConnectionPool:
    """Idle client connections for reuse, per peer (at most `max_idle_per_peer`, each for `idle_s` s)."""

    def __init__(self, max_idle_per_peer: int = MAX_IDLE_PER_PEER,
                 idle_s: float = DEFAULT_CLIENT_IDLE) -> None:
        self.max_idle_per_peer = max_idle_per_peer
        self.idle_s = idle_s
        self._idle: dict[str, list[TLSConnection]] = {}

    def get(self, peer_id: str, fingerprint: bytes) -> TLSConnection | None:
        """An idle connection to `peer_id` pinned to `fingerprint`, or None."""
        conns = self._idle.get(peer_id, [])
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if not conn.closed and now - conn.last_used < self.idle_s and conn.fingerprint == fingerprint:
                return conn
            conn.close()
        return None

    def put(self, peer_id: str, conn: TLSConnection) -> None:
        """Return a connection after a complete exchange."""
        conns = self._idle.setdefault(peer_id, [])
        now = time.monotonic()
        for old in [c for c in conns if now - c.last_used >= self.idle_s]:
            conns.remove(old)
            old.close()
        if conn.closed or len(conns) >= self.max_idle_per_peer:
            conn.close()
        else:
            conn.shrink()
            conns.append(conn)

    def close_all(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


class DirectClient:
    """Sends messages over peers' direct channels, given their tickets, and keeps the connections.

    :param read_response: reads and checks one response (the transport's: responses share its receive
        buffers and its refusal counters).
    :param reject: told of an invalid ticket (the transport's `Transport.reject`).
    :param connect_timeout: longest wait for the TCP connection to a peer's direct address, in s
        (default 5); the TLS handshake that follows may take the rest of the call's timeout.
    :param retry_s: after a failed direct connection, how long that peer is only called over libp2p, in
        seconds (default 60).
    """

    def __init__(self, read_response: ReadResponse, reject: RejectCallback, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, retry_s: float = DEFAULT_DIRECT_RETRY) -> None:
        self._read_response = read_response
        self._reject = reject
        self.connect_timeout = connect_timeout
        self.retry_s = retry_s
        self.pool = ConnectionPool()
        #: Connections of the exchanges in flight, closed by `close` so that those calls fail promptly.
        self.in_flight: set[TLSConnection] = set()
        #: Peers not to try directly before the given time (time.monotonic()).
        self._no_direct_until: dict[str, float] = {}
        #: Messages sent over the direct channel / sent over libp2p because the direct one failed.
        self.messages = 0
        self.fallbacks = 0
        self.closed = False

    def reachable(self, peer_id: str) -> bool:
        """Whether `peer_id` may be tried directly (no failed attempt within the last ``retry_s``)."""
        return self._no_direct_until.get(peer_id, 0.0) <= time.monotonic()

    def avoid(self, peer_id: str) -> None:
        """Call `peer_id` over libp2p only, for the next ``retry_s`` seconds."""
        self._no_direct_until[peer_id] = time.monotonic() + self.retry_s

    def read_ticket(self, peer_id: str, reply: memoryview, max_message_bytes: int) -> Ticket | memoryview | None:
        """The ticket in `peer_id`'s answer `reply` to a ticket request (asked over libp2p by the transport;
        `max_message_bytes`: the transport's largest accepted message, in bytes).

        None means "send this message over libp2p": the peer has no direct channel (it is then avoided for
        ``retry_s``) or its channel is at a limit. The `reply` itself is returned when the peer refused the
        message (for example oversized): that is the caller's error.

        :raises BadMessage: the answer or the ticket in it is malformed (counted through ``reject``).
        """
        try:
            env, _ = codec.decode(reply, max_message_bytes)
            if env.error == peer_pb2.UNKNOWN_METHOD or env.error == peer_pb2.UNAVAILABLE:
                self.avoid(peer_id)
                return None
            if env.error == peer_pb2.BUSY:
                return None  # the peer's direct channel is at a limit: this message goes over libp2p
            if env.error != peer_pb2.OK:
                return reply  # the peer refused this message (for example oversized): the caller's error
            return Ticket.from_bytes(codec.parse_body(env, peer_pb2.Envelope).body)
        except (BadMessage, ValueError) as e:
            code = e.code if isinstance(e, BadMessage) else "malformed"
            self._reject(peer_id, code, f"direct-channel ticket: {e}")
            raise BadMessage(f"{peer_id} sent an invalid direct-channel ticket: {e}", code=code) from e

    async def send(self, peer_id: str, ticket: Ticket, parts: Sequence[memoryview], timeout: float
                   ) -> memoryview | None:
        """Send the message `parts` with `ticket` and return the response; None means "use libp2p instead"
        (`peer_id` cannot be reached directly, and is avoided for ``retry_s``).

        :raises PeerUnreachable: a fresh connection broke during the exchange.
        """
        conn = self.pool.get(peer_id, ticket.fingerprint)
        if conn is not None:
            data = await self._exchange(peer_id, conn, ticket, parts, timeout, pooled=True)
            if data is not None:
                return data
        try:
            conn = await TLSConnection.connect(ticket.host, ticket.port, ticket.fingerprint,
                                               min(self.connect_timeout, timeout), timeout)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as e:
            # IncompleteReadError: the peer closed the connection during the handshake (its direct
            # channel is at its connection limit).
            logger.info("no direct connection to %s at %s:%d (%r); using libp2p for %.0f s",
                        peer_id[-8:], ticket.host, ticket.port, e, self.retry_s)
            self.avoid(peer_id)
            return None
        return await self._exchange(peer_id, conn, ticket, parts, timeout, pooled=False)

    async def _exchange(self, peer_id: str, conn: TLSConnection, ticket: Ticket,
                        parts: Sequence[memoryview], timeout: float, *, pooled: bool) -> memoryview | None:
        """Send the token, the request, and read the response on a direct connection.

        Returns None when a reused (`pooled`) connection turned out to be dead: it may have been closed
        by the peer while idle. The caller then retries once on a fresh connection with the same token;
        tokens are one-time, so the peer cannot handle the message twice.
        """
        self.in_flight.add(conn)
        done = False
        try:
            io = TLSIO(conn, timeout)
            await conn.write(memoryview(ticket.token), timeout)
            await write_message(io, parts)
            data = await self._read_response(peer_id, io)
            done = True
            self.messages += 1
            return data
        except _TLS_ERRORS as e:
            if pooled:
                return None
            raise PeerUnreachable(f"direct connection to {peer_id} broke: {e!r}") from e
        finally:
            self.in_flight.discard(conn)
            if done and not self.closed:
                self.pool.put(peer_id, conn)
            else:
                conn.close()

    def close(self) -> None:
        """Close the connections in flight and the idle ones; later exchanges close theirs when done."""
        self.closed = True
        for conn in list(self.in_flight):
            conn.close()
        self.pool.close_all()
