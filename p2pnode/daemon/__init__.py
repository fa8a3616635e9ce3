"""The daemon: `Node` (lifecycle and round loop) and the factory that builds a real networked node."""

from p2pnode.daemon.node import Node, NodeStatus

__all__ = ["Node", "NodeStatus"]
