"""The transport seam: every protocol talks to peers only through `Transport`.

Two implementations run the same framing and dispatch code in this module:

- `p2pnode.transport.p2p.P2PTransport`: hivemind's libp2p daemon (real network);
- `p2pnode.transport.memory.MemoryTransport`: an in-memory network on a virtual clock (simulator).

A concrete transport only moves encoded bytes (`_send`) and hands received bytes to `_dispatch`.

`_dispatch` is where both implementations refuse hostile requests the same way: malformed or oversized
frames (`codec`), replays and stale send times (`replay.ReplayGuard`, on the transport's `clock`:
virtual in the simulator), peers that `admits` says no to, and unknown methods. Every refusal is
counted by reason in `TrafficStats.rejected` and logged clipped and rate-limited (`refusals`).
Admission (`p2pnode.transport.admission`): with `Transport.admission` set, every request and response
carries a proof bound to both ends and to the envelope's nonce, and `_dispatch`, the one place all
requests pass, refuses a request that `admits` says no to before its handler runs (``not_admitted``);
`call` likewise refuses a response from a peer that is not admitted, or whose proof does not name the
request it answers.

Responses are checked for replay too (`call`): a response must carry a nonce and a send time within the
window, and a nonce not seen from that peer before (``replayed``, ``stale_clock``, ``no_nonce``, counted
like requests). A response arrives on the caller's own libp2p stream or pinned TLS connection, so only
the answering peer itself can send an old one; with admission its proof must also name this request's
nonce. Error responses carry no proof and are not checked: they are refusals, used only to report why.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message as ProtoMessage

from p2pnode.errors import BadMessage, PeerUnreachable, RemoteError, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.admission import NOT_ADMITTED, Admission
from p2pnode.transport.clock import wall_time
from p2pnode.transport.codec import Message
from p2pnode.transport.compression import Compression, parse_compression
from p2pnode.transport.refusals import RefusalLog, clip
from p2pnode.transport.replay import DEFAULT_WINDOW_S, ReplayGuard

logger = logging.getLogger(__name__)

#: A request handler: (sender peer id, request) -> response. Raise `BadMessage` to refuse a request.
Handler = Callable[[str, Message[Any]], Awaitable[Message[Any]]]

_ERROR_CODES: dict[str, int] = {
    "unknown_method": peer_pb2.UNKNOWN_METHOD,
    "malformed": peer_pb2.MALFORMED,
    "oversized": peer_pb2.OVERSIZED,
    "bad_shape": peer_pb2.BAD_SHAPE,
    "non_finite": peer_pb2.NON_FINITE,
    "wrong_run": peer_pb2.WRONG_RUN,
    "unavailable": peer_pb2.UNAVAILABLE,
    "internal": peer_pb2.INTERNAL,
    "stale": peer_pb2.STALE,
    "not_admitted": peer_pb2.NOT_ADMITTED,
    "replayed": peer_pb2.REPLAYED,
    "stale_clock": peer_pb2.REPLAYED,
    "no_nonce": peer_pb2.REPLAYED,
    "busy": peer_pb2.BUSY,
    "too_slow": peer_pb2.BUSY,
    # Compressed tensors whose header or payload does not add up (`compression`): malformed on the wire,
    # counted under their own reason here.
    "bad_compression": peer_pb2.MALFORMED,
    "bad_blocks": peer_pb2.MALFORMED,
    "bad_scale": peer_pb2.MALFORMED,
    "bad_index": peer_pb2.MALFORMED,
}
#: Reason name of each error code a caller sees (the first name listed for a code above).
_ERROR_NAMES: dict[int, str] = {}
for _name, _code in _ERROR_CODES.items():
    _ERROR_NAMES.setdefault(_code, _name)


#: Suffix of the answers' entries in `TrafficStats.sent_by_method`.
REPLY_SUFFIX = " reply"


@dataclass
class TrafficStats:
    """Counters of one transport. Bytes count whole encoded messages (envelopes and tensor bytes).

    The ``tensor_*`` counters cover the tensor bytes of messages this node encoded (sent) and decoded
    (received): ``wire`` as they travelled (compressed where compressed), ``raw`` their size uncompressed
    (the dtype's itemsize times numel), so ``raw / wire`` is the compression achieved. They are not part
    of `as_dict`, whose keys older readers rely on; see `tensor_dict`.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0
    failed_calls: int = 0
    #: Messages this node refused, by reason code (``malformed``, ``oversized``, ``bad_shape``,
    #: ``replayed``, ``stale_clock``, ``no_nonce``, ``busy``, ``too_slow``, ``truncated``,
    #: ``bad_token``, ``handshake_timeout``, ``bad_compression``, ``bad_blocks``, ``bad_scale``,
    #: ``bad_index``, ``tarpit`` (the real transport: streams of a peer past its refusal budget, held
    #: unread, see `tarpit`), ``conn_host_cap`` / ``conn_total_cap`` / ``conn_not_admitted`` (the real transport:
    #: libp2p connections of unknown peers dropped, see `connection_guard`), ...).
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Bytes of refused requests that were read before the refusal (libp2p streams: the header and what
    #: of the envelope was needed to refuse it), and bytes read and dropped after refusals
    #: (`framing.StreamIO.drain`). Not part of `as_dict`.
    refused_bytes_read: int = 0
    refused_bytes_drained: int = 0
    tensor_wire_bytes_sent: int = 0
    tensor_raw_bytes_sent: int = 0
    tensor_wire_bytes_received: int = 0
    tensor_raw_bytes_received: int = 0
    #: Sent traffic by method: ``method`` for requests, ``method + REPLY_SUFFIX`` for the answers this node
    #: gave (errors included). Each value is [messages, bytes, tensor bytes as they travelled]; bytes minus
    #: tensor bytes is what the envelopes (headers, bodies, tensor specs) cost. Not part of `as_dict`; see
    #: `method_dict`.
    sent_by_method: dict[str, list[int]] = field(default_factory=dict)

    def method_dict(self) -> dict[str, dict[str, int]]:
        """`sent_by_method` by name: ``{method: {"messages", "bytes", "tensor_bytes", "envelope_bytes"}}``."""
        return {m: {"messages": n, "bytes": b, "tensor_bytes": t, "envelope_bytes": b - t}
                for m, (n, b, t) in sorted(self.sent_by_method.items())}

    def _by_method(self, method: str, parts: Sequence[memoryview]) -> None:
        size = codec.encoded_size(parts)
        row = self.sent_by_method.setdefault(method, [0, 0, 0])
        row[0] += 1
        row[1] += size
        row[2] += size - parts[0].nbytes

    def tensor_dict(self) -> dict[str, int]:
        """The ``tensor_*`` byte counters by name."""
        return {"tensor_wire_bytes_sent": self.tensor_wire_bytes_sent,
                "tensor_raw_bytes_sent": self.tensor_raw_bytes_sent,
                "tensor_wire_bytes_received": self.tensor_wire_bytes_received,
                "tensor_raw_bytes_received": self.tensor_raw_bytes_received}

    def _sent(self, parts: Sequence[memoryview], raw: int) -> None:
        self.tensor_wire_bytes_sent += codec.encoded_size(parts) - parts[0].nbytes
        self.tensor_raw_bytes_sent += raw

    def _received(self, env: peer_pb2.Envelope, tensors: dict[str, Any]) -> None:
        self.tensor_wire_bytes_received += env.payload_bytes
        self.tensor_raw_bytes_received += sum(t.numel() * t.element_size() for t in tensors.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "rejected": dict(sorted(self.rejected.items())),
        }


@dataclass
class _Route:
    request_type: type[ProtoMessage]
    handler: Handler


class Transport(ABC):
    """Request/response messaging between peers, with tensors as raw bytes.

    :param max_message_bytes: largest message this node sends or accepts, in bytes (default 1 GiB).
    :param replay_window_s: acceptance window of requests' send times, in seconds (default 300), see
        `replay.ReplayGuard`.
    :param compression: the node's wire format for models and updates (default ``none``), see
        `compression`. The transport applies a message's own `Message.compression` (or its pre-compressed
        tensors) and nothing else; protocols that send models or updates read this as their default, so
        that one setting reaches all of them. What a node receives is decoded by its headers, whatever
        this says.
    """

    def __init__(self, *, max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                 replay_window_s: float = DEFAULT_WINDOW_S,
                 compression: Compression | str | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        self.compression: Compression = parse_compression(compression)
        self.stats = TrafficStats()
        self._routes: dict[str, _Route] = {}
        #: Called as on_reject(peer_id, reason, message) whenever this node refuses a message (the
        #: message clipped, see `refusals.clip`).
        self.on_reject: Callable[[str, str, str], None] | None = None
        #: Seconds of the clock that stamps requests' ``sent_at`` and judges peers' (wall time; the virtual
        #: clock on the simulator's loop, see `clock.wall_time`).
        self.clock: Callable[[], float] = wall_time
        self.replay = ReplayGuard(replay_window_s)
        self.refusal_log = RefusalLog(logger, lambda: self.clock())
        #: Who this node serves and whose responses it accepts; None (default): everyone (an open run).
        self.admission: Admission | None = None

    # -- identity and lifecycle -------------------------------------------------------------------
    @property
    @abstractmethod
    def peer_id(self) -> str:
        """This node's peer id (base58 libp2p id for the real transport)."""

    def addresses(self) -> list[str]:
        """Addresses at which other peers can reach this node (multiaddrs for the real transport)."""
        return []

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start listening. Handlers may be registered before or after."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop listening and release resources; calls in flight fail with `PeerUnreachable`."""

    # -- admission --------------------------------------------------------------------------------
    def admits(self, peer_id: str, envelope: peer_pb2.Envelope) -> bool:
        """Whether a request from `peer_id` with this `envelope` is admitted (always, without `admission`).

        Cheap and synchronous (one HMAC): it runs for every request, before anything else is done with it.
        """
        adm = self.admission
        return adm is None or adm.admits(peer_id, self.peer_id, envelope.method, envelope.nonce,
                                         envelope.admission)

    def check_admission(self, peer_id: str, envelope: peer_pb2.Envelope) -> None:
        """Raise `BadMessage` (``not_admitted``) when `admits` says no."""
        if not self.admits(peer_id, envelope):
            raise BadMessage("this node serves only peers admitted to the run (its secret or allowlist)",
                             code=NOT_ADMITTED)

    def encode_request(self, peer_id: str, method: str, request: Message[Any]) -> list[memoryview]:
        """Encode a request to `peer_id`, with this node's admission proof."""
        return self._encode_request(peer_id, method, request)[0]

    def _encode_request(self, peer_id: str, method: str, request: Message[Any]
                        ) -> tuple[list[memoryview], int, bytes]:
        """`encode_request`, the request's tensor bytes uncompressed, and its nonce."""
        nonce = secrets.token_bytes(codec.NONCE_BYTES)
        proof = b"" if self.admission is None else self.admission.proof(self.peer_id, peer_id, method, nonce)
        parts, raw = codec.encode_sized(method, request.body, request.tensors, nonce=nonce, sent_at=self.clock(),
                                        admission=proof, compression=request.compression,
                                        compressed=request.compressed)
        return parts, raw, nonce

    # -- serving ----------------------------------------------------------------------------------
    def register(self, method: str, request_type: type[ProtoMessage], handler: Handler) -> None:
        """Serve `method`: requests are parsed as `request_type` and passed to `handler`."""
        if method in self._routes:
            raise ValueError(f"method {method!r} is already registered")
        self._routes[method] = _Route(request_type, handler)

    def serves(self, method: str) -> bool:
        """Whether a handler is registered for `method` (a request for another is ``unknown_method``)."""
        return method in self._routes

    def reject(self, peer_id: str, reason: str, message: str) -> None:
        """Count and log a refused message (also used by protocols for checks they make themselves).

        Every refusal is counted; the log line is clipped and rate-limited per (peer, reason), see
        `refusals.RefusalLog`.
        """
        self.stats.rejected[reason] += 1
        self.refusal_log.log(self.peer_id, peer_id, reason, message)
        if self.on_reject is not None:
            self.on_reject(peer_id, reason, clip(message, 1000))

    def check_request(self, peer_id: str, env: peer_pb2.Envelope, *, admitted: bool = False) -> None:
        """Refuse a request that is replayed, stale or unstamped, or whose sender is not admitted.

        Args:
            peer_id: the authenticated sender.
            env: the request's envelope.
            admitted: the caller checked `admits` for this very envelope already (the real transport does
                so before it reads a payload): the HMAC is not computed a second time.

        Raises `BadMessage` with reason ``not_admitted``, ``no_nonce``, ``malformed``, ``stale_clock``
        or ``replayed``; otherwise remembers the request's nonce.
        """
        if not admitted:
            self.check_admission(peer_id, env)
        self._check_replay(peer_id, env)

    def _check_replay(self, peer_id: str, env: peer_pb2.Envelope) -> None:
        refusal = self.replay.check(peer_id, env.nonce, env.sent_at if env.HasField("sent_at") else None,
                                    self.clock())
        if refusal is not None:
            raise BadMessage(refusal[1], code=refusal[0])

    def check_response(self, peer_id: str, method: str, env: peer_pb2.Envelope, request_nonce: bytes) -> None:
        """Refuse a response that is not admitted (its proof must name the request, `request_nonce`), or
        that is replayed, stale or unstamped (the same guard as requests, see the module doc).

        Raises `BadMessage` with reason ``not_admitted``, ``no_nonce``, ``malformed``, ``stale_clock``
        or ``replayed``; otherwise remembers the response's nonce.
        """
        adm = self.admission
        if adm is not None and not adm.admits_response(peer_id, self.peer_id, method, env.nonce, request_nonce,
                                                       env.admission):
            raise BadMessage("the response carries no valid admission proof for this request", code=NOT_ADMITTED)
        self._check_replay(peer_id, env)

    async def _dispatch(self, peer_id: str, data: bytes | bytearray | memoryview) -> list[memoryview]:
        """Decode a request, run its handler and encode the response (or an error envelope)."""
        return (await self._dispatch_checked(peer_id, data))[0]

    async def _dispatch_checked(self, peer_id: str, data: bytes | bytearray | memoryview, *, admitted: bool = False
                                ) -> tuple[list[memoryview], bool]:
        """`_dispatch`, and whether the handler answered (False: the answer is an error envelope).

        `admitted`: the request's envelope passed `check_admission` already (see `check_request`).
        """
        self.stats.bytes_received += len(data)
        method = ""
        ok = False
        try:
            env, tensors = codec.decode(data, self.max_message_bytes)
            method = env.method
            self.check_request(peer_id, env, admitted=admitted)
            route = self._routes.get(method)
            if route is None:
                # Clipped before repr: a peer's method name may be megabytes (repr and clip copy it whole).
                raise BadMessage(f"unknown method {clip(repr(method[:100]), 100)}"
                                 + (f"...({len(method)} characters)" if len(method) > 100 else ""),
                                 code="unknown_method")
            self.stats._received(env, tensors)
            request = Message(codec.parse_body(env, route.request_type), tensors)
            response = await route.handler(peer_id, request)
            nonce = secrets.token_bytes(codec.NONCE_BYTES)
            proof = (b"" if self.admission is None
                     else self.admission.response_proof(self.peer_id, peer_id, method, nonce, env.nonce))
            parts, raw = codec.encode_sized(method, response.body, response.tensors, nonce=nonce,
                                            sent_at=self.clock(), admission=proof,
                                            compression=response.compression, compressed=response.compressed)
            self.stats._sent(parts, raw)
            ok = True
        except BadMessage as e:
            self.reject(peer_id, e.code, str(e))
            parts = self._error(method, e.code, str(e))
        except TransportError as e:
            parts = self._error(method, e.code if e.code in _ERROR_CODES else "internal", str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("handler %s failed for a request from %s", clip(repr(method[:200])), peer_id[-8:])
            parts = self._error(method, "internal", f"{type(e).__name__}: {e}")
        self.stats.bytes_sent += codec.encoded_size(parts)
        # A peer's method name is counted only when this node serves it (a made-up one would grow the map).
        self.stats._by_method((method if method in self._routes else "?") + REPLY_SUFFIX, parts)
        return parts, ok

    @staticmethod
    def _error(method: str, code: str, message: str) -> list[memoryview]:
        # An error answer never echoes a peer's method name back in full (it may be megabytes).
        return codec.encode(method if len(method) <= 256 else "", peer_pb2.Ping(),
                            error=_ERROR_CODES.get(code, peer_pb2.INTERNAL), error_message=message[:1000])

    # -- calling ----------------------------------------------------------------------------------
    @abstractmethod
    async def _send(self, peer_id: str, method: str, parts: Sequence[memoryview], timeout: float
                    ) -> bytes | bytearray | memoryview:
        """Deliver an encoded request to `peer_id` and return its encoded response.

        Raises `PeerUnreachable` when the peer cannot be reached or does not answer within `timeout`.
        """

    async def call(self, peer_id: str, method: str, request: Message[Any], response_type: type[codec.B],
                   timeout: float) -> Message[codec.B]:
        """Send `request` to `peer_id` and wait at most `timeout` seconds for its response.

        Raises `PeerUnreachable` (no answer in time), `RemoteError` (the peer refused) or `BadMessage`
        (the response is malformed; also counted in `stats.rejected`).
        """
        parts, raw, nonce = self._encode_request(peer_id, method, request)
        size = codec.encoded_size(parts)
        if size > self.max_message_bytes:
            raise TransportError(f"request of {size} bytes exceeds max_message_bytes={self.max_message_bytes}",
                                 code="oversized")
        self.stats.calls += 1
        self.stats.bytes_sent += size
        self.stats._sent(parts, raw)
        self.stats._by_method(method, parts)
        try:
            data = await asyncio.wait_for(self._send(peer_id, method, parts, timeout), timeout)
            # On Python 3.11 `wait_for` returns the result, swallowing the cancellation, when the caller is
            # cancelled just as the call completes. A round loop cancelled that way ran on for ever
            # (benchmarks/hostile.py then never stopped its swarm). The cancellation is passed on here.
            # (`asyncio.timeout` would not swallow it, but it also turns a call that completes at its very
            # deadline into a timeout, which changes the simulator's deterministic runs.)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
        except TimeoutError as e:
            self.stats.failed_calls += 1
            raise PeerUnreachable(f"{peer_id} did not answer {method} within {timeout:.1f} s") from e
        except TransportError:
            self.stats.failed_calls += 1
            raise
        self.stats.bytes_received += len(data)
        try:
            env, tensors = codec.decode(data, self.max_message_bytes)
            if env.error != peer_pb2.OK:
                self.stats.failed_calls += 1
                raise RemoteError(f"{peer_id} refused {method}: {env.error_message}",
                                  code=_ERROR_NAMES.get(env.error, "internal"))
            # A response from a peer outside the run (one that this node was led to call), an old one or one
            # that answers another request is never used.
            self.check_response(peer_id, method, env, nonce)
            self.stats._received(env, tensors)
            return Message(codec.parse_body(env, response_type), tensors)
        except BadMessage as e:
            self.stats.failed_calls += 1
            self.reject(peer_id, e.code, str(e))
            raise
