"""A direct TLS 1.3 data channel for bulk messages, authenticated through the libp2p channel.

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

The socket is driven by the event loop; TLS runs on an `ssl.SSLObject` over memory buffers, so that
the data is encrypted and decrypted in pieces of about 1 MiB with one system call per piece (asyncio's
TLS streams were measured at 60-70 % of this on the same machine).

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
  back when it goes idle: idle and half-open connections cost kilobytes, not megabytes.

Refusals are reported through ``on_reject(peer, reason, message)`` (the transport counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pnode.errors import TransportError

if TYPE_CHECKING:
    from p2pnode.transport.rate import RateGuard

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32
FINGERPRINT_BYTES = 32
#: Default lifetime of an unused ticket, in seconds.
DEFAULT_TICKET_TTL = 30.0
#: Default longest wait for a TCP connection to a peer's direct address, in seconds. Only the TCP
#: connect: it decides whether the address is reachable at all (else libp2p is used instead).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Default longest wait for a TLS handshake plus the first token, in seconds. Generous: a peer whose
#: event loop is busy moving other tensors may take seconds on a loaded machine, and a handshake given up
#: on one side only breaks a call that the other side already started.
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
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
#: Default time a client keeps an idle connection for reuse, in seconds (below the server's, so that a
#: reused connection is rarely one the server is closing).
DEFAULT_CLIENT_IDLE = 30.0
#: Default most outstanding tickets (all peers together); the oldest are dropped beyond it.
MAX_TICKETS = 4096
#: Most idle connections kept per peer.
MAX_IDLE_PER_PEER = 4
#: Size of the pieces encrypted and sent, or received and decrypted, at once, in bytes.
PIECE_BYTES = 1 << 20
#: Size of a connection's receive buffer until a large payload arrives (handshakes, tokens, headers).
SMALL_PIECE_BYTES = 64 << 10

_TICKET = struct.Struct("!32s32sH")


class PinMismatch(ssl.SSLError):
    """The server's certificate is not the one the ticket named."""


class Busy(TransportError):
    """The direct channel is at one of its limits; the caller should use libp2p for this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="busy")


@dataclass(frozen=True)
class Ticket:
    """Permission to send one message on a peer's direct channel.

    :param host: IP address to connect to.
    :param port: TCP port.
    :param token: one-time random token (32 bytes) bound to the sender's peer id.
    :param fingerprint: SHA-256 of the server certificate (DER), 32 bytes.
    """

    host: str
    port: int
    token: bytes
    fingerprint: bytes

    def to_bytes(self) -> bytes:
        return _TICKET.pack(self.token, self.fingerprint, self.port) + self.host.encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> Ticket:
        """Parse a ticket; raises ValueError when it is malformed (the host must be an IP address)."""
        if not _TICKET.size < len(data) <= _TICKET.size + 64:
            raise ValueError(f"ticket of {len(data)} bytes")
        token, fingerprint, port = _TICKET.unpack_from(data)
        host = str(ipaddress.ip_address(data[_TICKET.size:].decode("ascii")))
        if port == 0:
            raise ValueError("ticket names port 0")
        return cls(host, port, token, fingerprint)


def make_certificate(lifetime_days: int = 30) -> tuple[bytes, bytes, bytes]:
    """A fresh self-signed ECDSA P-256 certificate: (certificate PEM, private key PEM, fingerprint).

    The fingerprint is the SHA-256 of the certificate's DER encoding.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pnode direct channel")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=lifetime_days))
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3-only server context holding the certificate (written to a private temp dir to load it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="p2pnode-tls-") as tmp:  # created with mode 0700
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def client_context() -> ssl.SSLContext:
    """TLS 1.3-only client context. The server is authenticated by pinning (see `TLSConnection.connect`),
    not by a CA, so chain and host name checks are off here."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TLSConnection:
    """One TLS connection over a non-blocking socket, driven by the event loop through memory BIOs.

    Reads and writes must not overlap (the channel is strictly request then response).

    :param sock: a connected non-blocking socket.
    :param sslobj: the TLS state over `incoming` / `outgoing`.
    """

    def __init__(self, sock: socket.socket, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self._sock = sock
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._loop = asyncio.get_running_loop()
        # Small until a large payload arrives: half-open and idle connections must stay cheap.
        self._scratch = bytearray(SMALL_PIECE_BYTES)
        self.closed = False
        self.last_used = time.monotonic()
        #: SHA-256 of the server certificate this (client) connection was pinned to.
        self.fingerprint = b""

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    async def connect(cls, host: str, port: int, fingerprint: bytes, connect_timeout: float,
                      handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> TLSConnection:
        """Connect, complete a TLS 1.3 handshake and check the server certificate's fingerprint.

        :param connect_timeout: longest wait for the TCP connection, in seconds.
        :param handshake_timeout: longest wait for the TLS handshake after that, in seconds (default 30).
        :raises OSError: the connection could not be made.
        :raises ssl.SSLError: the handshake failed (`PinMismatch`: wrong certificate).
        :raises TimeoutError: no connection within `connect_timeout`, or no handshake within
            `handshake_timeout`.
        """
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn: TLSConnection | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(connect_timeout):
                await loop.sock_connect(sock, (host, port))
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            sslobj = client_context().wrap_bio(incoming, outgoing, server_side=False)
            conn = cls(sock, sslobj, incoming, outgoing)
            async with asyncio.timeout(handshake_timeout):
                await conn._handshake()
            cert = conn._ssl.getpeercert(binary_form=True) or b""
            actual = hashlib.sha256(cert).digest()
            if not hmac.compare_digest(actual, fingerprint):
                raise PinMismatch(f"certificate of {host}:{port} does not match the ticket's fingerprint")
            conn.fingerprint = actual
            return conn
        except BaseException:
            if conn is not None:
                conn.close()
            else:
                sock.close()
            raise

    @classmethod
    async def accept(cls, sock: socket.socket, ctx: ssl.SSLContext, timeout: float) -> TLSConnection:
        """Complete the server side of a TLS handshake on an accepted socket (within `timeout` s)."""
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        conn = cls(sock, ctx.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)
        try:
            async with asyncio.timeout(timeout):
                await conn._handshake()
        except BaseException:
            conn.close()
            raise
        return conn

    async def _handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    # -- I/O --------------------------------------------------------------------------------------
    async def _flush(self) -> None:
        if self._out.pending:
            await self._loop.sock_sendall(self._sock, self._out.read())

    async def _fill(self) -> None:
        """Receive more ciphertext into the TLS state (whatever the socket holds, up to `PIECE_BYTES`)."""
        # A receive low-water mark (SO_RCVLOWAT) to wake up less often was tried and dropped: it saved
        # 5-8 % CPU in one process but stalled multi-node exchanges until the idle timeout.
        n = await self._loop.sock_recv_into(self._sock, self._scratch)
        if n == 0:
            raise asyncio.IncompleteReadError(b"", None)
        self._in.write(memoryview(self._scratch)[:n])

    def shrink(self) -> None:
        """Give back the large receive buffer (when the connection goes idle)."""
        if len(self._scratch) > SMALL_PIECE_BYTES:
            self._scratch = bytearray(SMALL_PIECE_BYTES)

    async def readinto(self, view: memoryview, idle_timeout: float, rate: RateGuard | None = None) -> None:
        """Fill `view` completely with decrypted bytes.

        :param idle_timeout: longest wait for more bytes from the network, in seconds.
        :param rate: optional minimum-rate check of the bytes as they arrive (raises `rate.TooSlow`).
        :raises asyncio.IncompleteReadError: the peer closed the connection first.
        :raises TimeoutError: nothing arrived for `idle_timeout` seconds.
        """
        pos, total = 0, view.nbytes
        if total - pos > SMALL_PIECE_BYTES and len(self._scratch) < PIECE_BYTES:
            self._scratch = bytearray(PIECE_BYTES)
        while pos < total:
            try:
                # With a buffer, read() returns the number of bytes written into it.
                n = cast(int, self._ssl.read(total - pos, view[pos:]))
            except ssl.SSLWantReadError:
                if rate is None:
                    async with asyncio.timeout(idle_timeout):
                        await self._fill()
                    continue
                try:
                    async with asyncio.timeout(rate.wait_s(idle_timeout)):
                        await self._fill()
                except TimeoutError:
                    rate.progress(0)
                    if rate.idle_for() >= idle_timeout:
                        raise
                continue
            except ssl.SSLZeroReturnError as e:
                raise asyncio.IncompleteReadError(bytes(view[:pos]), total) from e
            if n == 0:
                raise asyncio.IncompleteReadError(bytes(view[:pos]), total)
            pos += n
            if rate is not None:
                rate.progress(n)
        self.last_used = time.monotonic()

    async def readexactly(self, n: int, idle_timeout: float) -> bytes:
        """Read exactly `n` decrypted bytes (see `readinto`)."""
        buf = bytearray(n)
        await self.readinto(memoryview(buf), idle_timeout)
        return bytes(buf)

    async def write(self, view: memoryview, idle_timeout: float) -> None:
        """Encrypt and send `view` in pieces of `PIECE_BYTES`.

        :param idle_timeout: longest wait for the peer to take one piece, in seconds.
        """
        view = view.cast("B") if view.format != "B" else view
        for offset in range(0, view.nbytes, PIECE_BYTES):
            self._ssl.write(view[offset:offset + PIECE_BYTES])
            async with asyncio.timeout(idle_timeout):
                await self._flush()
        self.last_used = time.monotonic()

    def close(self) -> None:
        """Close the socket at once (no TLS close_notify: either side treats EOF as the end)."""
        if not self.closed:
            self.closed = True
            self._sock.close()


#: Serves one message on a connection; returns False when the connection must be closed.
ServeCallback = Callable[[str, TLSConnection], Awaitable[bool]]
#: Told of every refused connection or token: (peer id, or "ip:<address>" before a token; reason; message).
RejectCallback = Callable[[str, str, str], None]


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
    :param on_reject: told of each refused connection or token (see `RejectCallback`).
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


def close_quietly(conn: TLSConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
