"""Limits of the libp2p transport, the direct channel and the DHT directory (`LimitSettings`; local, never
hashed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pnode.config.schema import setting
from p2pnode.errors import ConfigError


@dataclass
class LimitSettings:
    """Section ``limits``: defaults are `p2pnode.transport.p2p`'s and `p2pnode.transport.direct_server`'s (checked by a
    test)."""

    #: Largest message sent or accepted, in bytes.
    max_message_bytes: int = setting(
        default=1 << 30, section="limits", help="Largest message sent or accepted, in bytes.")
    #: Most subkeys (peer records) this node's DHT stores under the run's directory key (default 512,
    #: `p2pnode.discovery.quota.DEFAULT_MAX_SUBKEYS`); new ones beyond it are refused (``dht_refused_over_quota``),
    #: records already stored are always refreshed. Raise it for swarms of more than a few hundred peers.
    directory_max_subkeys: int = setting(
        default=512, section="limits",
        help="Most peer records this node's DHT stores under the run's key; new ones beyond it are refused "
             "(junk flood), stored ones are always refreshed.")
    #: Bytes of inbound messages being received at once, all peers together (None: 2 x `max_message_bytes`).
    max_inflight_bytes: int | None = setting(
        default=None, section="limits",
        help="Receive budget: bytes of inbound messages in flight, all peers together [2 x max message bytes].")
    #: The same, per peer (None: a quarter of `max_inflight_bytes`, at least one message).
    max_inflight_bytes_per_peer: int | None = setting(
        default=None, section="limits",
        help="Per-peer receive budget: bytes of one peer's inbound messages in flight [max(budget / 4, max "
             "message bytes)].")
    #: Inbound streams served at once, all peers together (default 128) and per peer (default 8).
    max_streams: int = setting(default=128, section="limits", help="Inbound streams served at once, all peers.")
    max_streams_per_peer: int = setting(default=8, section="limits", help="Inbound streams served at once per peer.")
    #: Slowest accepted sender, in bytes/s (default 64 KiB/s), after a grace of `receive_grace_s` (default 5).
    min_receive_rate: float = setting(
        default=64.0 * 1024, section="limits",
        help="Slowest accepted inbound rate, in bytes/s, averaged after the grace period; slower senders are "
             "cut off.")
    receive_grace_s: float = setting(
        default=5.0, section="limits", help="Seconds of a message before --min-receive-rate applies.")
    #: Bytes of large receive buffers kept for reuse (default 512 MiB; 0: off).
    receive_pool_bytes: int = setting(
        default=512 << 20, section="limits", help="Bytes of large receive buffers kept for reuse (0: off).")
    #: Direct TLS channel for bulk tensors (docs/architecture.md): on (default), from `direct_threshold` bytes
    #: (default 1 MiB); a peer whose direct connection failed is called over libp2p for `direct_retry_s`
    #: (default 60); a connection attempt may take `direct_connect_timeout_s` (default 5).
    direct: bool = setting(
        default=True, section="limits", flag="--direct/--no-direct",
        help="Send large messages over a direct TLS channel when the peer is reachable (libp2p otherwise).")
    direct_threshold: int = setting(
        default=1 << 20, section="limits", help="Smallest message, in bytes, sent over the direct channel.")
    direct_retry_s: float = setting(
        default=60.0, section="limits",
        help="Seconds a peer whose direct connection failed is called over libp2p only.")
    direct_connect_timeout_s: float = setting(
        default=5.0, section="limits", help="Seconds allowed to open a direct connection.")
    #: Caps of the direct channel's listener, which anyone who reaches its address can connect to (defaults
    #: are `p2pnode.transport.direct_server`'s): connections at once (128), of them in their TLS handshake (64),
    #: admitted connections per peer (8), unused tickets per peer (32) and in all (4096); and the longest
    #: TLS handshake plus first token (None: the larger of 30 s and the transport's idle timeout).
    direct_max_connections: int = setting(
        default=128, section="limits", help="Direct channel: most connections at once (in their handshake, "
                                            "serving or idle).")
    direct_max_pending: int = setting(
        default=64, section="limits", help="Direct channel: most connections still in their TLS handshake; "
                                           "beyond it the oldest is closed.")
    direct_max_connections_per_peer: int = setting(
        default=8, section="limits", help="Direct channel: most admitted connections of one peer.")
    direct_max_tickets_per_peer: int = setting(
        default=32, section="limits", help="Direct channel: most unused tickets of one peer (beyond it, its "
                                           "messages go over libp2p).")
    direct_max_tickets: int = setting(
        default=4096, section="limits", help="Direct channel: most unused tickets of all peers; the oldest "
                                             "are dropped beyond it.")
    direct_handshake_timeout_s: float | None = setting(
        default=None, section="limits",
        help="Direct channel: seconds allowed for a client's TLS handshake and first token [30].")

    #: Refusal budget (`p2pnode.transport.tarpit`): a peer refused on the wire more than `tarpit_refusals`
    #: times (default 20; 0: off) within `tarpit_window_s` (default 10 s) has its streams held unread for
    #: `tarpit_hold_s` (default 5 s) each, then closed, for `tarpit_window_s`.
    tarpit_refusals: int = setting(
        default=20, section="limits",
        help="Refusals of one peer (unknown method, malformed, not admitted, replayed, ...) allowed within "
             "--tarpit-window before its streams are held unread (0: off).")
    tarpit_window_s: float = setting(
        default=10.0, section="limits", help="Seconds of the refusal budget's window, and of the penalty.")
    tarpit_hold_s: float = setting(
        default=5.0, section="limits",
        help="Seconds each stream of a peer past its refusal budget is held unread before it is closed.")
    #: The same budget per remote host (the IP of a stream's multiaddr; an IPv6 address by its /64): past
    #: `tarpit_host_refusals` (default 40; 0: off) within `tarpit_window_s`, a peer of that host is held at
    #: its first refusal, so that identities of one host share one budget (peers of the host that are not
    #: refused are untouched). At most `tarpit_max_held` streams (default None: max_streams / 4) are held at
    #: once; a tarpitted peer's streams beyond that are closed at once (``tarpit_full``).
    tarpit_host_refusals: int = setting(
        default=40, section="limits",
        help="Refusals of all peers of one remote host (IP; IPv6 by /64) allowed within --tarpit-window "
             "before each of its peers is held at its first refusal (0: off).")
    #: The same budget for the whole node: past `tarpit_node_refusals` (default 200; 0: off) refusals of all
    #: peers within `tarpit_window_s`, each peer the node does not know (see the connection guard below) is
    #: held at its first refusal for a window, wherever it connects from; known peers keep their own budget.
    tarpit_node_refusals: int = setting(
        default=200, section="limits",
        help="Refusals of all peers together allowed within --tarpit-window before each peer the node does not "
             "know (not in its directory, not served or called lately) is held at its first refusal (0: off).")
    tarpit_max_held: int | None = setting(
        default=None, section="limits",
        help="Most streams the refusal budget holds at once, all peers together; beyond it a held peer's "
             "streams are closed at once [max_streams / 4].")
    #: Connection guard (`p2pnode.transport.connection_guard`): every `conn_guard_interval_s` (default 5 s;
    #: 0: off) p2pd's connections are listed, and peers the node does not know (not in the directory view,
    #: the DHT's routing table or the bootstrap list, not served or called in the last 10 min) are
    #: disconnected beyond `conn_max_per_host` of one remote host (default 4; IPv6 by /64; 0: no cap) and
    #: `conn_max_outsiders` in all (default 64; 0: no cap); under admission (secret, allowlist) also one still
    #: unknown `conn_admission_grace_s` (default 30 s) after it connected. Known peers are never counted.
    conn_guard_interval_s: float = setting(
        default=5.0, section="limits",
        help="Seconds between two sweeps of the libp2p connections by the connection guard (0: off).")
    conn_max_per_host: int = setting(
        default=4, section="limits",
        help="Most connected peers of one remote host (IP; IPv6 by /64) that the node does not know (not in "
             "its directory, DHT routing table or bootstrap list, not served lately); beyond it they are "
             "disconnected (0: no cap).")
    conn_max_outsiders: int = setting(
        default=64, section="limits",
        help="Most connected peers that the node does not know, all hosts together (0: no cap).")
    conn_admission_grace_s: float = setting(
        default=30.0, section="limits",
        help="Under admission: seconds a connected peer may stay unknown (no proved request, not in the "
             "directory or the DHT's routing table) before it is disconnected.")

    def transport_limits(self) -> dict[str, Any]:
        """The keyword arguments of `P2PTransport` that the ``limits`` section sets."""
        return {"max_message_bytes": self.max_message_bytes, "max_inflight_bytes": self.max_inflight_bytes,
                "max_inflight_bytes_per_peer": self.max_inflight_bytes_per_peer, "max_streams": self.max_streams,
                "max_streams_per_peer": self.max_streams_per_peer, "min_receive_rate": self.min_receive_rate,
                "receive_grace_s": self.receive_grace_s, "receive_pool_bytes": self.receive_pool_bytes,
                "direct": self.direct, "direct_threshold": self.direct_threshold,
                "direct_retry_s": self.direct_retry_s, "direct_connect_timeout": self.direct_connect_timeout_s,
                "direct_max_connections": self.direct_max_connections,
                "direct_max_pending": self.direct_max_pending,
                "direct_max_connections_per_peer": self.direct_max_connections_per_peer,
                "direct_max_tickets_per_peer": self.direct_max_tickets_per_peer,
                "direct_max_tickets": self.direct_max_tickets,
                "direct_handshake_timeout": self.direct_handshake_timeout_s,
                "tarpit_refusals": self.tarpit_refusals, "tarpit_window_s": self.tarpit_window_s,
                "tarpit_hold_s": self.tarpit_hold_s, "tarpit_host_refusals": self.tarpit_host_refusals,
                "tarpit_node_refusals": self.tarpit_node_refusals, "tarpit_max_held": self.tarpit_max_held,
                "conn_guard_interval_s": self.conn_guard_interval_s,
                "conn_max_per_host": self.conn_max_per_host, "conn_max_outsiders": self.conn_max_outsiders,
                "conn_admission_grace_s": self.conn_admission_grace_s}

    def _validate_limits(self) -> None:
        for key in ("max_message_bytes", "max_streams", "max_streams_per_peer", "direct_threshold",
                    "direct_max_connections", "direct_max_pending", "direct_max_connections_per_peer",
                    "direct_max_tickets_per_peer", "direct_max_tickets"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        for key in ("max_inflight_bytes", "max_inflight_bytes_per_peer"):
            v = getattr(self, key)
            if v is not None and v < self.max_message_bytes:
                raise ConfigError(f"{key}={v}: must be >= max_message_bytes={self.max_message_bytes} (or unset), "
                                  "else no message of the largest size could ever be received")
        for key in ("min_receive_rate", "receive_grace_s", "receive_pool_bytes", "direct_retry_s", "tarpit_refusals",
                    "tarpit_hold_s", "tarpit_host_refusals", "tarpit_node_refusals", "conn_guard_interval_s",
                    "conn_max_per_host", "conn_max_outsiders", "conn_admission_grace_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        if self.tarpit_max_held is not None and self.tarpit_max_held < 0:
            raise ConfigError(f"tarpit_max_held={self.tarpit_max_held}: must be >= 0 (or unset)")
        if not self.tarpit_window_s > 0:
            raise ConfigError(f"tarpit_window_s={self.tarpit_window_s}: must be > 0")
        if not self.direct_connect_timeout_s > 0:
            raise ConfigError(f"direct_connect_timeout_s={self.direct_connect_timeout_s}: must be > 0")
        if self.direct_handshake_timeout_s is not None and not self.direct_handshake_timeout_s > 0:
            raise ConfigError(f"direct_handshake_timeout_s={self.direct_handshake_timeout_s}: must be > 0 (or unset)")
