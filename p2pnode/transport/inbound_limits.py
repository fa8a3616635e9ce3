"""`InboundLimits`: the receive budget and the stream counts of a transport's inbound requests.

Bookkeeping only: the transport asks before it reads or serves, and refuses and counts itself
(`p2pnode.transport.p2p.P2PTransport`, reason ``busy``):

- inbound requests hold at most ``max_inflight_bytes`` of receive buffers at once (all peers), and one
  peer at most ``max_inflight_bytes_per_peer`` (default a quarter of that, but never less than one
  largest message): `reserve` raises `OverBudget`;
- at most ``max_streams`` inbound streams are served at once, at most ``max_streams_per_peer`` of one
  peer (`open_stream`).
"""

from __future__ import annotations

from p2pnode.errors import TransportError

#: Default budget of inbound request bytes held in receive buffers at once (all peers together), in
#: multiples of ``max_message_bytes``. Requests beyond it are answered ``busy``.
DEFAULT_INFLIGHT_MESSAGES = 2
#: Default most inbound streams served at once, all peers together / of one peer.
DEFAULT_MAX_STREAMS = 128
DEFAULT_MAX_STREAMS_PER_PEER = 8


class OverBudget(TransportError):
    """The receive budget is spent; the request is refused with ``busy`` (retry later)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="busy")


class InboundLimits:
    """What inbound requests hold now, all peers together and per peer, against the limits.

    :param max_message_bytes: largest message accepted, in bytes (the unit of the default budgets).
    :param max_inflight_bytes: inbound request bytes held at once, in bytes (default
        `DEFAULT_INFLIGHT_MESSAGES` x `max_message_bytes`).
    :param max_inflight_bytes_per_peer: inbound request bytes one peer may hold at once, in bytes
        (default: a quarter of `max_inflight_bytes`, but at least one largest message, so that a message
        of `max_message_bytes` can always be received).
    :param max_streams: inbound streams served at once, all peers together (default 128).
    :param max_streams_per_peer: inbound streams of one peer served at once (default 8).
    """

    def __init__(self, max_message_bytes: int, max_inflight_bytes: int | None = None,
                 max_inflight_bytes_per_peer: int | None = None, *, max_streams: int = DEFAULT_MAX_STREAMS,
                 max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER) -> None:
        self.max_inflight_bytes = (max_inflight_bytes if max_inflight_bytes is not None
                                   else DEFAULT_INFLIGHT_MESSAGES * max_message_bytes)
        self.max_inflight_bytes_per_peer = (
            max_inflight_bytes_per_peer if max_inflight_bytes_per_peer is not None
            else min(self.max_inflight_bytes, max(self.max_inflight_bytes // 4, max_message_bytes)))
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        #: Bytes of receive buffers reserved by inbound requests now, all peers together.
        self.inflight_bytes = 0
        self._inflight_by_peer: dict[str, int] = {}
        #: Inbound streams served now, all peers together / per peer.
        self.streams = 0
        self.streams_by_peer: dict[str, int] = {}

    # -- receive budget -------------------------------------------------------------------------------
    def reserve(self, peer_id: str, nbytes: int) -> None:
        """Reserve `nbytes` of receive buffers for a request of `peer_id`.

        :raises OverBudget: the peer's share or the whole budget would be passed; nothing is reserved.
        """
        mine = self._inflight_by_peer.get(peer_id, 0)
        if mine + nbytes > self.max_inflight_bytes_per_peer:
            raise OverBudget(f"this peer holds {mine} bytes of receive buffers; a request of {nbytes} more "
                             f"would pass its share of {self.max_inflight_bytes_per_peer}; retry later")
        if self.inflight_bytes + nbytes > self.max_inflight_bytes:
            raise OverBudget(f"receive budget of {self.max_inflight_bytes} bytes is in use; retry later")
        self.inflight_bytes += nbytes
        self._inflight_by_peer[peer_id] = mine + nbytes

    def release(self, peer_id: str, nbytes: int) -> None:
        """Give back a reservation of `peer_id` (0 bytes: nothing was reserved)."""
        self.inflight_bytes -= nbytes
        left = self._inflight_by_peer.get(peer_id, 0) - nbytes
        if left > 0:
            self._inflight_by_peer[peer_id] = left
        else:
            self._inflight_by_peer.pop(peer_id, None)

    # -- streams --------------------------------------------------------------------------------------
    @property
    def streams_full(self) -> bool:
        """Whether ``max_streams`` streams are served now (a new one gets nothing but a close)."""
        return self.streams >= self.max_streams

    def open_stream(self, peer_id: str) -> int:
        """Count a new stream of `peer_id` as served; return how many of its streams were served before.

        The caller refuses the stream when that is ``max_streams_per_peer`` or more, and calls
        `close_stream` either way.
        """
        mine = self.streams_by_peer.get(peer_id, 0)
        self.streams += 1
        self.streams_by_peer[peer_id] = mine + 1
        return mine

    def close_stream(self, peer_id: str) -> None:
        """The end of a stream counted by `open_stream`."""
        self.streams -= 1
        left = self.streams_by_peer.get(peer_id, 1) - 1
        if left > 0:
            self.streams_by_peer[peer_id] = left
        else:
            self.streams_by_peer.pop(peer_id, None)
