"""Where the node listens, whom it joins, and how it uses the peer directory (`NetworkSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode.config.schema import setting


@dataclass
class NetworkSettings:
    """Section ``network``: listen address, initial peers, the wait for peers, directory records (local)."""

    #: Listen address and port (0 picks a free port) of the libp2p host.
    host: str = setting(default="127.0.0.1", section="network", help="Address to listen on.")
    port: int = setting(default=0, section="network", help="Port to listen on (0: any free).")
    #: Multiaddrs of peers to join.
    initial_peers: list[str] = setting(
        default_factory=list, section="network", help="Multiaddr of a peer to join (repeatable).",
        flag="--initial-peer", metavar="MULTIADDR")
    #: Before the first round, wait until this many peers are visible (0: start at once).
    wait_for_peers: int = setting(
        default=0, section="network",
        help="Before the first round, wait until this many peers are visible (at most --wait-timeout s).")
    #: Longest wait for `wait_for_peers`, in seconds; then the node starts with whom it sees.
    wait_timeout_s: float = setting(
        default=60.0, section="network",
        help="Longest wait for --wait-for-peers, in seconds; then the node starts with whom it sees.")
    #: Seconds a directory record lives unless refreshed.
    announce_ttl_s: float = setting(
        default=60.0, section="network", help="Seconds a directory record lives unless refreshed.")
    #: Shortest time between two reads of the peer directory from the DHT, in seconds (default 3): callers in
    #: between (every round's partner choice) use the last read's view. See `DHTDirectory`.
    directory_read_interval_s: float = setting(
        default=3.0, section="network",
        help="Shortest time, in seconds, between two reads of the peer directory from the DHT; rounds in "
             "between choose partners from the last read (0: read every round).")
