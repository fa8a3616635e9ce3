"""TLS 1.3 for the direct channel: a self-signed certificate, the contexts, and `TLSConnection`.

The server's certificate is fresh per node and self-signed; a client accepts it only if it has the
SHA-256 fingerprint that the server's ticket named (`p2pnode.transport.ticket`). The ticket comes over
libp2p, whose streams authenticate the peer ids, so the receiver's libp2p identity vouches for the
certificate and no CA is involved (see `p2pnode.transport.direct_server` for the whole protocol).

The socket is driven by the event loop; TLS runs on an `ssl.SSLObject` over memory buffers, so that
the data is encrypted and decrypted in pieces of about 1 MiB with one system call per piece (asyncio's
TLS streams were measured at 60-70 % of this on the same machine).

A connection allocates its 1 MiB decryption buffer only when a large payload arrives, and gives it
back when it goes idle (`TLSConnection.shrink`): idle and half-open connections cost kilobytes, not
megabytes.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import os
import socket
import ssl
import tempfile
import time
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from p2pnode.transport.rate import RateGuard

#: Default longest wait for a TLS handshake plus the first token, in seconds. Generous: a peer whose
#: event loop is busy moving other tensors may take seconds on a loaded machine, and a handshake given up
#: on one side only breaks a call that the other side already started.
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
#: Size of the pieces encrypted and sent, or received and decrypted, at once, in bytes.
PIECE_BYTES = 1 << 20
#: Size of a connection's receive buffer until a large payload arrives (handshakes, tokens, headers).
SMALL_PIECE_BYTES = 64 << 10


class PinMismatch(ssl.SSLError):
    """The server's certificate is not the one the ticket named."""


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
