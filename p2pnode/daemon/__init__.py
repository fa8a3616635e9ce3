"""The daemon: `Node` (lifecycle and round loop) and the factory that builds a real networked node.

`Node` and `NodeStatus` are imported lazily, on first access: the control clients (``p2pnode status``,
``health`` ...) import `p2pnode.daemon.statedir` only, and must not pay for importing torch through
`p2pnode.daemon.node` (about a second per Docker HEALTHCHECK probe).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pnode.daemon.node import Node, NodeStatus

__all__ = ["Node", "NodeStatus"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from p2pnode.daemon import node

        return getattr(node, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
