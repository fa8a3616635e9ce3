"""A direct TLS 1.3 data channel for bulk messages, authenticated through libp2p; its listening side.

Why: messages through p2pd cross three sockets and two Go daemons; on the measured 2-core machine that
reaches 10-20 % of a plain TCP socket (see ``docs/benchmarks.md``). Peers that can reach each
other directly move large messages over one TLS 1.3 connection instead; libp2p stays the control path
and the fallback (peers behind NAT).

How a sender gets a connection (`p2pnode.transport.p2p.P2PTransport` drives this):

1. Over libp2p, whose streams authenticate the peer ids, the sender asks the receiver for a *ticket*
   for one message, showing the message's envelope. The receiver checks the envelope against its limits
   (so an oversized message is refused before any byte of it is sent) and answers with its direct
   address, a fresh random one-time token bound to the sender's peer id, and the SHA-256 fingerprint of
   its self-signed certificate (`Ticket`).
2. The sender connects with TLS 1.3 and accepts the connection only if the server's certificate has that
   fingerprint (pinning: the certificate is vouched for by the receiver's libp2p identity, no CA is
   involved). Only then does it send the token, which tells the receiver which peer is on the other end;
   then the framed message; the receiver answers with the framed response on the same connection.
3. Connections are kept for reuse (per peer, bounded, idle ones closed); every later message still
   carries a fresh ticket for that same peer, so tokens stay one-time and each message is checked
   against the limits before it is sent.

This module is the listening side (`DirectServer`: the listener and the tickets). The TLS state is
`p2pnode.transport.tls` (certificate, contexts, `TLSConnection`), the ticket's wire form
`p2pnode.transport.ticket`, the sending side `p2pnode.transport.direct_client` (`DirectClient`).

Limits against hostile clients (the listener is reachable by anyone who can reach the address):

- at most ``max_connections`` connections at once, of which at most ``max_pending`` are still in their
  handshake (not yet admitted by a token); a new connection beyond them first evicts the oldest one
  still in its handshake (a slowloris has to outrun honest handshakes, which take milliseconds), else
  the oldest idle admitted one, else it is closed (``busy``);
- a handshake plus first token must complete within ``handshake_timeout`` (``handshake_timeout``), an
  admitted connection waits at most ``idle_timeout`` for its next token;
- at most ``max_connections_per_peer`` admitted connections and ``max_tickets_per_peer`` unused tickets
  per peer (tickets beyond are refused with `Busy`, so the caller uses libp2p for that message);
- a connection allocates its 1 MiB decryption buffer only when a large payload arrives, and gives it
  back when it goes idle (`tls.TLSConnection.shrink`): idle and half-open connections cost kilobytes, not megabytes.

Refusals are reported through ``on_reject(peer, reason, message)`` (the transport counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from p2pnode.errors import TransportError
from p2pnode.transport.refusals import RejectCallback
from p2pnode.transport.ticket import TOKEN_BYTES, Ticket
from p2pnode.transport.tls import DEFAULT_HANDSHAKE_TIMEOUT, TLSConnection, make_certificate, server_context

logger = logging.getLogger(__name__)

#: Default lifetime of an unused ticket, in seconds.
DEFAULT_TICKET_TTL = 30.0
#: Default most connections still in their handshake (not yet admitted by a token).
MAX_PENDING_HANDSHAKES = 64
#: Default most connections at once (in their handshake, serving, or idle).
MAX_CONNECTIONS = 128
#: Default most admitted connections of one peer at once.
MAX_CONNECTIONS_PER_PEER = 8
#: Default most unused tickets of one peer.
MAX_TICKETS_PER_PEER = 32
#: Default time a server keeps an idle connection open waiting for the next token, in seconds.
DEFAULT_SERVER_IDLE = 60.0
#: Default most outstanding tickets (all peers together); the oldest are dropped beyond it.
MAX_TICKETS = 4096


class Busy(TransportError):
    """The direct channel is at one of its limits; the caller should use libp2p for this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="busy")


#: Serves one message on a connection; returns False when the connection must be closed.
ServeCallback = Callable[[str, TLSConnection], Awaitable[bool]]


@dataclass
class _Pending:
    peer_id: str
    expires: float


@dataclass
class _Conn:
    """What the server knows about one accepted connection."""

    address: str
    #: When the connection entered its current state (time.monotonic()).
    since: float
    #: The peer its first token named; None while in its handshake.
    peer: str | None = None
    #: Waiting for a token (in its handshake, or admitted and idle between messages).
    idle: bool = True


class DirectServer:
    """The listening side: a TLS 1.3 listener and the tickets that admit peers to it.

    :param host: IP address to listen on (default ``"127.0.0.1"``).
    :param port: TCP port (default 0: any free port).
    :param advertise_host: IP address written into tickets (default: `host`; set it when listening on
        ``0.0.0.0``).
    :param ticket_ttl: lifetime of an unused ticket, in seconds (default 30).
    :param handshake_timeout: longest wait for a client's handshake and first token, in seconds
        (default 30).
    :param idle_timeout: how long an idle connection waits for its next token, in seconds (default 60).
    :param max_connections: most connections at once, all states (default 128).
    :param max_pending: most connections still in their handshake (default 64).
    :param max_connections_per_peer: most admitted connections of one peer (default 8).
    :param max_tickets_per_peer: most unused tickets of one peer (default 32).
    :param max_tickets: most unused tickets of all peers together (default 4096); the oldest are dropped
        beyond it.
    :param on_reject: told of each refused connection or token: (peer id, or ``"ip:<address>"`` before a
        token; reason; message), see `refusals.RejectCallback`.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 ticket_ttl: float = DEFAULT_TICKET_TTL, handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 idle_timeout: float = DEFAULT_SERVER_IDLE, max_connections: int = MAX_CONNECTIONS,
                 max_pending: int = MAX_PENDING_HANDSHAKES,
                 max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
                 max_tickets_per_peer: int = MAX_TICKETS_PER_PEER, max_tickets: int = MAX_TICKETS,
                 on_reject: RejectCallback | None = None) -> None:
        for name, value in (("max_connections", max_connections), ("max_pending", max_pending),
                            ("max_connections_per_peer", max_connections_per_peer),
                            ("max_tickets_per_peer", max_tickets_per_peer), ("max_tickets", max_tickets)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        if ipaddress.ip_address(self.advertise_host).is_unspecified:
            raise ValueError("advertise_host must be a reachable address; set it when listening on 0.0.0.0")
        self.ticket_ttl = ticket_ttl
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_pending = min(max_pending, max_connections)
        self.max_connections_per_peer = max_connections_per_peer
        self.max_tickets_per_peer = max_tickets_per_peer
        self.max_tickets = max_tickets
        self.on_reject = on_reject
        cert_pem, key_pem, self.fingerprint = make_certificate()
        self._ctx = server_context(cert_pem, key_pem)
        self._tickets: dict[bytes, _Pending] = {}
        self._tickets_per_peer: dict[str, int] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        #: Every accepted connection's task and state, in the order they were accepted.
        self._connections: dict[asyncio.Task[None], _Conn] = {}
        self._serve: ServeCallback | None = None
        #: Connections closed because of a bad, expired, reused or foreign token.
        self.refused_tokens = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self, serve: ServeCallback) -> None:
        """Listen and serve each admitted message with `serve(peer_id, connection)`."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._serve = serve
        self._accept_task = asyncio.create_task(self._accept_loop(), name="direct-accept")

    async def shutdown(self) -> None:
        """Stop listening and close every connection."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        tasks = [*self._connections] + ([self._accept_task] if self._accept_task else [])
        for task in self._connections:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._tickets.clear()
        self._tickets_per_peer.clear()

    # -- state ----------------------------------------------------------------------------------------
    @property
    def pending_handshakes(self) -> int:
        """Connections still in their handshake (no token yet)."""
        return sum(1 for c in self._connections.values() if c.peer is None)

    def connections_of(self, peer_id: str) -> int:
        """Admitted connections of `peer_id`."""
        return sum(1 for c in self._connections.values() if c.peer == peer_id)

    def _reject(self, who: str, reason: str, message: str) -> None:
        if self.on_reject is not None:
            self.on_reject(who, reason, message)
        else:
            logger.warning("direct channel: refused %s: %s (%s)", who[-8:], message, reason)

    def _evict(self, *, pending: bool, peer: str | None = None) -> bool:
        """Close the oldest connection in a handshake (`pending`) or the oldest idle admitted one (of `peer`
        when given). Returns whether one was found."""
        now_candidates = [(c.since, t) for t, c in self._connections.items()
                          if (c.peer is None) == pending and c.idle and not t.done()
                          and (peer is None or c.peer == peer)]
        if not now_candidates:
            return False
        _, task = min(now_candidates, key=lambda x: x[0])
        state = self._connections.pop(task)
        task.cancel()
        if pending:
            self._reject(f"ip:{state.address}", "busy", f"handshake evicted: {self.max_pending} connections "
                                                        "are in their handshake")
        return True

    # -- tickets --------------------------------------------------------------------------------------
    def issue(self, peer_id: str) -> Ticket:
        """A one-time ticket for `peer_id` (expires after ``ticket_ttl`` seconds).

        :raises Busy: the peer holds ``max_tickets_per_peer`` unused tickets, or all its
            ``max_connections_per_peer`` connections are busy.
        """
        now = time.monotonic()
        if self._tickets_per_peer.get(peer_id, 0) >= self.max_tickets_per_peer:
            self._drop_expired(now)
            if self._tickets_per_peer.get(peer_id, 0) >= self.max_tickets_per_peer:
                raise Busy(f"{self.max_tickets_per_peer} unused direct-channel tickets are outstanding")
        conns = [c for c in self._connections.values() if c.peer == peer_id]
        if len(conns) >= self.max_connections_per_peer and not any(c.idle for c in conns):
            raise Busy(f"{len(conns)} direct connections of this peer are busy")
        if len(self._tickets) >= self.max_tickets:
            self._drop_expired(now)
            while len(self._tickets) >= self.max_tickets:  # dicts keep insertion order: drop the oldest
                self._pop_ticket(next(iter(self._tickets)))
        token = secrets.token_bytes(TOKEN_BYTES)
        self._tickets[token] = _Pending(peer_id, now + self.ticket_ttl)
        self._tickets_per_peer[peer_id] = self._tickets_per_peer.get(peer_id, 0) + 1
        return Ticket(self.advertise_host, self.port, token, self.fingerprint)

    def _pop_ticket(self, token: bytes) -> _Pending | None:
        pending = self._tickets.pop(token, None)
        if pending is not None:
            left = self._tickets_per_peer.get(pending.peer_id, 1) - 1
            if left > 0:
                self._tickets_per_peer[pending.peer_id] = left
            else:
                self._tickets_per_peer.pop(pending.peer_id, None)
        return pending

    def _drop_expired(self, now: float) -> None:
        for token in [t for t, p in self._tickets.items() if p.expires < now]:
            self._pop_ticket(token)

    def redeem(self, token: bytes) -> str | None:
        """The peer a valid token was issued to (consuming the token), or None."""
        pending = self._pop_ticket(token)
        if pending is None or pending.expires < time.monotonic():
            return None
        return pending.peer_id

    # -- serving --------------------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, addr = await loop.sock_accept(self._listener)
            except OSError as e:  # for example EMFILE: back off instead of spinning
                logger.warning("direct channel: accept failed: %r", e)
                await asyncio.sleep(0.5)
                continue
            address = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            if self.pending_handshakes >= self.max_pending:
                self._evict(pending=True)
            if len(self._connections) >= self.max_connections and not self._evict(pending=True) \
                    and not self._evict(pending=False):
                self._reject(f"ip:{address}", "busy", f"{len(self._connections)} direct connections are open; "
                                                      f"the limit is {self.max_connections}")
                sock.close()
                continue
            state = _Conn(address, time.monotonic())
            task = asyncio.create_task(self._connection(sock, state))
            self._connections[task] = state
            task.add_done_callback(lambda t: self._connections.pop(t, None))

    async def _connection(self, sock: socket.socket, state: _Conn) -> None:
        who = f"ip:{state.address}"
        # One deadline for the handshake and the first token together.
        deadline = state.since + self.handshake_timeout
        try:
            conn = await TLSConnection.accept(sock, self._ctx, self.handshake_timeout)
        except TimeoutError:
            self._reject(who, "handshake_timeout", f"no TLS handshake within {self.handshake_timeout:.0f} s")
            sock.close()
            return
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            logger.info("direct channel: a handshake failed: %r", e)
            sock.close()
            return
        try:
            while True:
                state.idle, state.since = True, time.monotonic()
                conn.shrink()
                wait = max(0.0, deadline - time.monotonic()) if state.peer is None else self.idle_timeout
                try:
                    token = await conn.readexactly(TOKEN_BYTES, wait)
                except TimeoutError:
                    if state.peer is None:
                        self._reject(who, "handshake_timeout",
                                     f"no token within {self.handshake_timeout:.0f} s of connecting")
                    return  # else idle: the normal end of a connection
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                    return  # closed or broken: the normal end of a connection
                peer = self.redeem(token)
                if peer is None or (state.peer is not None and peer != state.peer):
                    self.refused_tokens += 1
                    self._reject(state.peer or who, "bad_token",
                                 "invalid, expired, reused or foreign direct-channel token")
                    return
                if state.peer is None:
                    if self.connections_of(peer) >= self.max_connections_per_peer \
                            and not self._evict(pending=False, peer=peer):
                        self._reject(peer, "busy", f"{self.max_connections_per_peer} direct connections of "
                                                   "this peer are open")
                        return
                    state.peer = peer
                state.idle = False
                assert self._serve is not None
                if not await self._serve(peer, conn):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("direct channel: unexpected error while serving %s", (state.peer or "?")[-8:])
        finally:
            conn.close()


def first_ipv4(maddrs: Sequence[str]) -> str:
    """The default host of a direct channel: the IPv4 address of the first non-loopback ``/ip4/...``
    multiaddr, else of the first loopback one, else 127.0.0.1. (p2pd listening on 0.0.0.0 lists every
    interface, loopback included.)"""
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
