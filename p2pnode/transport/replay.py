"""Refusal of replayed requests: every envelope carries a random nonce and its send time.

A receiver accepts a request only when

- it carries a nonce and a send time (``Envelope.nonce``, ``Envelope.sent_at``): requests of nodes that
  predate them are refused with reason ``no_nonce`` (the wire changed within one version, so a mixed
  swarm is not supported; the refusal says why);
- its send time lies within ``window_s`` of the receiver's clock (else ``stale_clock``): a capture older
  than the window is worthless, so the receiver only has to remember nonces for that long;
- its nonce was not seen within the window (else ``replayed``).

Memory is bounded. Each peer may hold at most ``max_per_peer`` remembered nonces, all peers together
``max_entries``. When a peer goes over its share, its oldest nonces are forgotten and the peer's *floor*
rises to their send time: its requests sent at or before the floor are refused as ``replayed`` from
then on, since the guard can no longer tell. A peer that floods (or sets its clock ahead) therefore only
raises its own floor, never another peer's. When all peers together are at ``max_entries``, the peer
holding the most nonces pays the same way.

Peer ids are the transport's authenticated sender ids, so a peer cannot spend another's share.
The guard takes the current time as an argument: the transport's clock (virtual in the simulator).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

#: Default acceptance window: how far a request's send time may lie from the receiver's clock, in s.
DEFAULT_WINDOW_S = 300.0
#: Default most nonces remembered per peer.
DEFAULT_MAX_PER_PEER = 8192
#: Default most nonces remembered in total (about 150 bytes each).
DEFAULT_MAX_ENTRIES = 131072
#: Shortest and longest accepted nonce, in bytes.
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64


@dataclass
class _PeerNonces:
    #: nonce -> the time after which a replay of it fails the window check anyway (sent_at + window).
    seen: collections.OrderedDict[bytes, float] = field(default_factory=collections.OrderedDict)
    #: Requests sent at or before this time are refused: nonces of that age were forgotten.
    floor: float = -math.inf


class ReplayGuard:
    """Remembers the nonces of accepted requests for the acceptance window.

    Args:
        window_s: acceptance window, in seconds (default 300): a request is accepted when
            ``|sent_at - now| <= window_s``.
        max_per_peer: most nonces remembered per peer (default 8192).
        max_entries: most nonces remembered in total (default 131072).
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, *, max_per_peer: int = DEFAULT_MAX_PER_PEER,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.window_s = window_s
        self.max_per_peer = max_per_peer
        self.max_entries = max_entries
        self._peers: dict[str, _PeerNonces] = {}
        self._owner: dict[bytes, str] = {}
        self._next_collect = -math.inf

    def __len__(self) -> int:
        """Number of nonces remembered."""
        return len(self._owner)

    def check(self, peer_id: str, nonce: bytes, sent_at: float | None, now: float) -> tuple[str, str] | None:
        """Accept (and remember) a request, or say why not.

        Args:
            peer_id: the authenticated sender.
            nonce: the envelope's nonce (empty when it has none).
            sent_at: the envelope's send time in seconds, or None when it has none.
            now: the receiver's clock, in seconds.

        Returns:
            None when the request is accepted, else ``(reason, message)`` with reason ``no_nonce``,
            ``malformed``, ``stale_clock`` or ``replayed``.
        """
        if not nonce or sent_at is None:
            return ("no_nonce", "request carries no nonce or send time (the sender runs an older version; "
                                "this one refuses unstamped requests)")
        if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
            return ("malformed", f"nonce of {len(nonce)} bytes; allowed {MIN_NONCE_BYTES}-{MAX_NONCE_BYTES}")
        if not math.isfinite(sent_at) or abs(sent_at - now) > self.window_s:
            return ("stale_clock", f"sent at {sent_at:.3f}, {sent_at - now:+.1f} s from this node's clock; "
                                   f"accepted within +-{self.window_s:.0f} s (check the clocks)")
        owner = self._owner.get(nonce)
        if owner is not None and self._peers[owner].seen.get(nonce, -math.inf) >= now:
            return ("replayed", "nonce already seen" + ("" if owner == peer_id else " from another peer"))
        peer = self._peers.get(peer_id)
        if peer is not None and sent_at <= peer.floor:
            return ("replayed", f"sent at {sent_at:.3f}, not after {peer.floor:.3f}: this node no longer "
                                "remembers nonces that old from this peer")
        if owner is not None:  # expired entry of the same nonce: forget it before reuse
            self._forget(owner, nonce)
        if peer is None:
            peer = self._peers[peer_id] = _PeerNonces()
        self._expire(peer, now)
        peer.seen[nonce] = sent_at + self.window_s
        self._owner[nonce] = peer_id
        while len(peer.seen) > self.max_per_peer:
            self._evict_oldest(peer_id, peer)
        if len(self._owner) > self.max_entries or now >= self._next_collect:
            # Also once per window: peers that went quiet are dropped, so Sybil ids that each sent one
            # request do not pile up.
            self._collect(now)
            self._next_collect = now + self.window_s
            while len(self._owner) > self.max_entries:
                biggest = max(self._peers, key=lambda p: len(self._peers[p].seen))
                self._evict_oldest(biggest, self._peers[biggest])
        return None

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _forget(self, peer_id: str, nonce: bytes) -> None:
        self._peers[peer_id].seen.pop(nonce, None)
        self._owner.pop(nonce, None)

    def _expire(self, peer: _PeerNonces, now: float) -> None:
        """Forget the peer's oldest nonces whose replays would fail the window check anyway."""
        while peer.seen:
            nonce, expires = next(iter(peer.seen.items()))
            if expires >= now:
                break
            del peer.seen[nonce]
            self._owner.pop(nonce, None)

    def _evict_oldest(self, peer_id: str, peer: _PeerNonces) -> None:
        nonce, expires = peer.seen.popitem(last=False)
        self._owner.pop(nonce, None)
        peer.floor = max(peer.floor, expires - self.window_s)

    def _collect(self, now: float) -> None:
        """Expire every peer's old nonces; drop peers with none left whose floor no longer matters."""
        for peer_id in list(self._peers):
            peer = self._peers[peer_id]
            self._expire(peer, now)
            if not peer.seen and peer.floor < now - self.window_s:
                del self._peers[peer_id]
