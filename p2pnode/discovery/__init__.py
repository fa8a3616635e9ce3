"""Discovery seam: run-scoped peer records (hivemind DHT for real peers, in-memory in the simulator)."""

from p2pnode.discovery.base import PeerDirectory, PeerInfo

__all__ = ["PeerDirectory", "PeerInfo"]
