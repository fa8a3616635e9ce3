"""`P2PTransport`: the real transport, over hivemind's libp2p daemon (p2pd), with a direct TLS fast path.

Every request is one libp2p stream to the peer's single handler (`RPC_HANDLER`, ``"p2pnode.rpc"``); the
method name travels in the envelope. On the stream the caller writes one framed request and the
receiver answers with one framed response (`p2pnode.transport.framing`: the header and envelope are
checked against the size limits before a buffer is mapped and the payload read into it;
`p2pnode.transport.receive_buffers`: the buffers cost memory as bytes arrive, and large ones are reused).
Inbound streams are admitted by `stream_server.StreamServer` (stream limits, tarpit); calls go out
through `stream_client.StreamClient`.

Messages of at least ``direct_threshold`` bytes (default 1 MiB) take the direct channel when both peers
enable it (`p2pnode.transport.direct_server`, `p2pnode.transport.direct_client`): a ticket is asked for
over libp2p, then the message travels over a pinned TLS 1.3 connection. If the peer does not offer the
channel or cannot be reached directly, the message goes over libp2p instead (and that peer is not tried
directly again for ``direct_retry_s``).

Limits against hostile peers (each refusal is counted in ``stats.rejected`` under the reason given):

- inbound requests hold at most ``max_inflight_bytes`` of receive buffers at once (all peers), and one
  peer at most ``max_inflight_bytes_per_peer`` (default a quarter of that, but never less than one
  largest message): ``busy``;
- at most ``max_streams`` inbound streams are served at once, at most ``max_streams_per_peer`` of one
  peer (``busy``); the bookkeeping of both is `inbound_limits.InboundLimits`;
- a request is read, dispatched and answered by `request_server.RequestServer`, which refuses payloads
  below ``min_receive_rate`` (``too_slow``), stalled or cut-off requests (``too_slow``, ``truncated``),
  unknown methods from their name alone (``unknown_method``) and peers that `Transport.admits` says no to
  (``not_admitted``, also asked before a direct-channel ticket is issued);
- the direct channel has limits of its own (`direct_server.DirectServer`, set by the ``direct_max_*``
  and ``direct_handshake_timeout`` parameters);
- a peer refused more than ``tarpit_refusals`` times within ``tarpit_window_s`` (wire refusals and streams
  beyond its stream limit, see `tarpit.Tarpit`; default 20 per 10 s) has its streams held unread for
  ``tarpit_hold_s`` (default 5 s), then closed, until ``tarpit_window_s`` after that refusal (``tarpit``);
  held streams count against ``max_streams_per_peer``, and its streams beyond that limit are closed at once;
  refusals are also counted per remote host (the IP of the stream's multiaddr): past ``tarpit_host_refusals``
  (default 40) a host's peers are held at their first refusal, so sybils of one host share one budget; at
  most ``tarpit_max_held`` streams (default a quarter of ``max_streams``) are held at once, all peers
  together, and a tarpitted peer's streams beyond that are closed at once (``tarpit_full``);
- every ``conn_guard_interval_s`` (default 5 s) the connections of p2pd are swept
  (`connection_guard.ConnectionGuard`): peers the node does not know (not in its directory view, DHT
  routing table or bootstrap list, not served or called lately) beyond ``conn_max_per_host`` of one remote
  host (default 4) or ``conn_max_outsiders`` in total (default 64) are disconnected (``conn_host_cap``,
  ``conn_total_cap``), and under admission so is one still unknown ``conn_admission_grace_s`` (default
  30 s) after it connected (``conn_not_admitted``).

The peer id is the libp2p id (base58) of the underlying p2pd; a node passes the `P2P` replica of its DHT
(``await dht.replicate_p2p()``) so that its RPC handlers and its DHT records share one identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

from hivemind.p2p import P2P

from p2pnode.errors import BadMessage, PeerUnreachable, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.base import Transport
from p2pnode.transport.codec import Message
from p2pnode.transport.compression import Compression
from p2pnode.transport.connection_guard import (
    DEFAULT_ADMISSION_GRACE_S,
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_OUTSIDERS,
    DEFAULT_MAX_PER_HOST,
    ConnectionGuard,
)
from p2pnode.transport.direct_client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DIRECT_RETRY,
    DEFAULT_DIRECT_THRESHOLD,
    DirectClient,
)
from p2pnode.transport.direct_server import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_PEER,
    MAX_PENDING_HANDSHAKES,
    MAX_TICKETS,
    MAX_TICKETS_PER_PEER,
    Busy,
    DirectServer,
    first_ipv4,
)
from p2pnode.transport.framing import TLSIO, MessageIO, read_message
from p2pnode.transport.inbound_limits import DEFAULT_MAX_STREAMS, DEFAULT_MAX_STREAMS_PER_PEER, InboundLimits
from p2pnode.transport.rate import DEFAULT_GRACE_S, DEFAULT_MIN_RATE
from p2pnode.transport.receive_buffers import DEFAULT_RECEIVE_POOL_BYTES, ReceiveBuffers
from p2pnode.transport.request_server import RequestServer
from p2pnode.transport.stream_client import STREAM_ERRORS, StreamClient
from p2pnode.transport.stream_server import StreamServer
from p2pnode.transport.tarpit import (
    DEFAULT_HOLD_S,
    DEFAULT_MAX_HOST_REFUSALS,
    DEFAULT_MAX_NODE_REFUSALS,
    DEFAULT_MAX_REFUSALS,
    DEFAULT_WINDOW_S,
    STREAMS_PER_PEER,
    Tarpit,
)
from p2pnode.transport.ticket import Ticket
from p2pnode.transport.tls import DEFAULT_HANDSHAKE_TIMEOUT, TLSConnection

logger = logging.getLogger(__name__)

#: Name of the one libp2p stream handler a transport registers.
RPC_HANDLER = "p2pnode.rpc"
#: Method (inside the envelope) that asks a peer for a direct-channel ticket.
DIRECT_TICKET_METHOD = "_p2pnode.direct_ticket"
#: Default longest wait for the next bytes of a request, or for the caller to take the next piece of a
#: response, on the serving side, in seconds. A stalled peer releases its handler after this.
DEFAULT_IDLE_TIMEOUT = 30.0
#: Default longest wait for p2pd to register or remove the handler, in seconds.
DEFAULT_CONTROL_TIMEOUT = 10.0

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
        128), see `direct_server.DirectServer`.
    :param direct_max_pending: its most connections still in their TLS handshake (default 64).
    :param direct_max_connections_per_peer: its most admitted connections of one peer (default 8).
    :param direct_max_tickets_per_peer: its most unused tickets of one peer (default 32).
    :param direct_max_tickets: its most unused tickets of all peers together (default 4096).
    :param direct_handshake_timeout: longest wait for a direct connection's TLS handshake and first token,
        in seconds (default None: the larger of `idle_timeout` and 30).
    :param receive_pool_bytes: most bytes of large receive buffers kept for reuse (default 512 MiB;
        0: off), see `receive_buffers.ReceiveBuffers`.
    :param compression: the node's wire format for models and updates (default ``none``), see
        `Transport`.
    :param tarpit_refusals: wire refusals of one peer allowed within `tarpit_window_s` before its streams
        are held (default 20; 0: off), see `tarpit.Tarpit`.
    :param tarpit_window_s: the window, and the penalty, in seconds (default 10).
    :param tarpit_hold_s: how long each stream of a peer in the tarpit is held unread before it is
        closed, in seconds (default 5).
    :param tarpit_host_refusals: refusals of all peers of one remote host allowed within `tarpit_window_s`
        (default 40; 0: no per-host count); past it, each peer of that host is put in the tarpit by its
        first refusal, for `tarpit_window_s`.
    :param tarpit_node_refusals: refusals of all peers together allowed within `tarpit_window_s` (default 200;
        0: no node-wide count); past it, each peer the connection guard does not know is put in the tarpit by
        its first refusal, for `tarpit_window_s` (identities spread over many hosts).
    :param tarpit_max_held: most streams held by the tarpit at once, all peers together (default None: a
        quarter of `max_streams`); a tarpitted peer's stream beyond it is closed at once (``tarpit_full``).
    :param conn_guard_interval_s: time between two sweeps of p2pd's connections by the connection guard
        (`connection_guard.ConnectionGuard`), in seconds (default 5; 0: no guard).
    :param conn_max_per_host: most connected peers of one remote host that the node does not know (default
        4; 0: no cap); beyond it the newest are disconnected (``conn_host_cap``).
    :param conn_max_outsiders: most connected peers the node does not know, all hosts together (default 64;
        0: no cap; ``conn_total_cap``).
    :param conn_admission_grace_s: under admission, how long a peer may stay connected without being known
        (a proved request, the directory, the DHT's routing table), in seconds (default 30;
        ``conn_not_admitted``).
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
                 tarpit_window_s: float = DEFAULT_WINDOW_S, tarpit_hold_s: float = DEFAULT_HOLD_S,
                 tarpit_host_refusals: int = DEFAULT_MAX_HOST_REFUSALS,
                 tarpit_node_refusals: int = DEFAULT_MAX_NODE_REFUSALS, tarpit_max_held: int | None = None,
                 conn_guard_interval_s: float = DEFAULT_INTERVAL_S, conn_max_per_host: int = DEFAULT_MAX_PER_HOST,
                 conn_max_outsiders: int = DEFAULT_MAX_OUTSIDERS,
                 conn_admission_grace_s: float = DEFAULT_ADMISSION_GRACE_S) -> None:
        super().__init__(max_message_bytes=max_message_bytes, compression=compression)
        #: Refusals per peer and per host; peers past their budget have their streams held (`StreamServer.handle`).
        self.tarpit = Tarpit(tarpit_refusals, tarpit_window_s, tarpit_hold_s, max_host_refusals=tarpit_host_refusals,
                             max_node_refusals=tarpit_node_refusals)
        self._p2p = p2p
        self._owns_p2p = owns_p2p
        self._peer_id: str = p2p.peer_id.to_base58()
        self.handler_name = handler_name
        self.idle_timeout = idle_timeout
        #: Receive budget and stream counts of inbound requests.
        self.inbound = InboundLimits(max_message_bytes, max_inflight_bytes, max_inflight_bytes_per_peer,
                                     max_streams=max_streams, max_streams_per_peer=max_streams_per_peer)
        self.buffers = ReceiveBuffers(receive_pool_bytes)
        #: Reads, dispatches and answers inbound requests on either channel.
        self.requests = RequestServer(self, self.inbound, self.buffers, idle_timeout=idle_timeout,
                                      min_receive_rate=min_receive_rate, receive_grace_s=receive_grace_s)
        self._maddrs: list[str] = []
        self._started = False
        self._closed = False
        #: Admits inbound libp2p streams (stream limits, tarpit) and keeps their serving tasks.
        self.streams = StreamServer(self.inbound, self.tarpit, self.requests, self.reject, idle_timeout,
                                    max_held=max_streams // 4 if tarpit_max_held is None else tarpit_max_held)
        #: Disconnects the peers the node does not know beyond the connection caps (started with the
        #: transport; the node tells it its directory, DHT and bootstrap peers).
        self.guard = ConnectionGuard(lambda: self._p2p, self.reject, self.tarpit, interval_s=conn_guard_interval_s,
                                     max_per_host=conn_max_per_host, max_outsiders=conn_max_outsiders,
                                     admission_grace_s=conn_admission_grace_s,
                                     admission=lambda: self.admission is not None,
                                     on_drop=self.streams.release_holds)
        # While the node is alarmed (past its node-wide refusal budget), the peers it knows keep their own.
        self.tarpit.exempt = self.guard.known
        #: The calling side of libp2p streams (and the streams of the calls in flight).
        self.stream_client = StreamClient(p2p, handler_name, self._read_response)
        # Direct channel.
        self.direct_enabled = direct
        self.direct_threshold = direct_threshold
        self._direct_host = direct_host
        self._direct_advertise_host = direct_advertise_host
        self._direct_port = direct_port
        #: Keyword arguments of the `DirectServer` (its limits), see the class doc.
        self.direct_limits: dict[str, Any] = {
            "max_connections": direct_max_connections, "max_pending": direct_max_pending,
            "max_connections_per_peer": direct_max_connections_per_peer,
            "max_tickets_per_peer": direct_max_tickets_per_peer, "max_tickets": direct_max_tickets,
            "handshake_timeout": (max(idle_timeout, DEFAULT_HANDSHAKE_TIMEOUT) if direct_handshake_timeout is None
                                  else direct_handshake_timeout)}
        self._direct: DirectServer | None = None
        #: The sending side of the direct channel (connections, peers to call over libp2p only, counts).
        self.direct_client = DirectClient(self._read_response, self.reject, connect_timeout=direct_connect_timeout,
                                          retry_s=direct_retry_s)

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
    def direct_messages(self) -> int:
        """Messages sent over the direct channel."""
        return self.direct_client.messages

    @property
    def direct_fallbacks(self) -> int:
        """Messages sent over libp2p because the direct channel failed for them."""
        return self.direct_client.fallbacks

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
            host = self._direct_host or first_ipv4(self._maddrs)
            self._direct = DirectServer(host=host, port=self._direct_port,
                                        advertise_host=self._direct_advertise_host,
                                        idle_timeout=2 * self.idle_timeout, on_reject=self.reject,
                                        **self.direct_limits)
            await self._direct.start(self._serve_direct)
            self.register(DIRECT_TICKET_METHOD, peer_pb2.Envelope, self._issue_ticket)
        async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
            await self._p2p.add_binary_stream_handler(self.handler_name, self.streams.handle)
        self._started = True
        self.guard.start()

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
        self.stream_client.p2p = p2p
        self.stream_client.close_all()
        if self._started and not self._closed:
            async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
                self._maddrs = [str(a) for a in await p2p.get_visible_maddrs()]
                await p2p.add_binary_stream_handler(self.handler_name, self.streams.handle)

    async def shutdown(self) -> None:
        """Stop serving, fail the calls in flight with `PeerUnreachable`, and stop p2pd if owned."""
        if self._closed:
            return
        self._closed = True
        await self.guard.stop()
        if self._started and self._p2p.is_alive:
            # The daemon may already be gone (for example when the DHT stopped first): then there is
            # nothing to remove, and its socket errors are expected.
            with contextlib.suppress(TimeoutError, *STREAM_ERRORS):
                async with asyncio.timeout(DEFAULT_CONTROL_TIMEOUT):
                    await self._p2p.remove_binary_stream_handler(self.handler_name)
        self.stream_client.close_all()
        self.direct_client.close()
        if self._direct is not None:
            await self._direct.shutdown()
        await self.streams.cancel_all()
        if self._owns_p2p:
            await self._p2p.shutdown()

    # -- serving ----------------------------------------------------------------------------------
    @property
    def inflight_bytes(self) -> int:
        """Bytes of receive buffers reserved by inbound requests now."""
        return self.inbound.inflight_bytes

    def reject(self, peer_id: str, reason: str, message: str) -> None:
        if reason != STREAMS_PER_PEER:
            # (``streams_per_peer`` is no refusal of its own: the stream was counted as ``busy`` already.)
            super().reject(peer_id, reason, message)
        if self.tarpit.note(peer_id, reason):
            # Past its budget: its streams refused for its stream limit stop draining now, not in a second.
            self.streams.stop_drains(peer_id)

    async def _dispatch_checked(self, peer_id: str, data: bytes | bytearray | memoryview, *, admitted: bool = False
                                ) -> tuple[list[memoryview], bool]:
        parts, ok = await super()._dispatch_checked(peer_id, data, admitted=admitted)
        if ok:
            # Its request passed the admission, replay and method checks: a peer of the run.
            self.guard.note_known(peer_id)
        return parts, ok

    async def _serve_direct(self, sender: str, conn: TLSConnection) -> bool:
        return await self.requests.serve_one(sender, TLSIO(conn, self.idle_timeout))

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
        self.guard.note_known(peer_id)
        if (self.direct_enabled and codec.encoded_size(parts) >= self.direct_threshold
                and self.direct_client.reachable(peer_id)):
            deadline = time.monotonic() + timeout
            data = await self._send_direct(peer_id, parts, timeout)
            if data is not None:
                return data
            self.direct_client.fallbacks += 1
            timeout = max(0.0, deadline - time.monotonic())
        return await self.stream_client.call(peer_id, parts, timeout)

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
        reply = await self.stream_client.call(peer_id, request, timeout)
        ticket = self.direct_client.read_ticket(peer_id, reply, self.max_message_bytes)
        if not isinstance(ticket, Ticket):
            return ticket  # None: use libp2p for this message; else the peer's refusal of it
        return await self.direct_client.send(peer_id, ticket, parts, timeout)

