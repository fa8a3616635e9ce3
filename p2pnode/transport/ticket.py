"""`Ticket`: permission to send one message on a peer's direct channel, and its wire form.

A receiver issues a ticket (`direct_server.DirectServer.issue`) in answer to a sender's ticket request
over libp2p, whose streams authenticate the peer ids; the sender connects to the ticket's address,
pins the certificate fingerprint and sends the token first (`direct_client.DirectClient`). On the wire
a ticket is ``token (32 bytes) | fingerprint (32 bytes) | port (u16, big-endian) | host`` (the host an
IP address in ASCII, at most 64 bytes).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

#: Length of a ticket's one-time token, in bytes.
TOKEN_BYTES = 32
#: Length of a certificate fingerprint (SHA-256), in bytes.
FINGERPRINT_BYTES = 32

_TICKET = struct.Struct("!32s32sH")


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
