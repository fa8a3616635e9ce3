"""Round protocols: async state machines over the Transport and PeerDirectory seams.

The daemon and the simulator run these same classes: ``gossip`` (push-pull gossip learning),
``modest`` (decentralized sampling), and the baselines ``fl`` (one fixed server) and ``dpsgd``
(neighbour averaging every round). Each is a `RoundProtocol` (`p2pnode.protocols.base`): that interface
and the `ProtocolHooks` object are all the daemon and the simulator use of them. See docs/protocols.md.
"""

from p2pnode.protocols.base import (
    LocalOuterState,
    ProtocolHooks,
    ProtocolSnapshot,
    RoundExtra,
    RoundProtocol,
    RoundReport,
)
from p2pnode.protocols.dpsgd import DpsgdProtocol, DpsgdSettings
from p2pnode.protocols.fl import FLProtocol
from p2pnode.protocols.gossip import GossipProtocol, GossipSettings
from p2pnode.protocols.modest import AggregationEvent, ModestProtocol, ModestSettings, candidate_order

__all__ = [
    "AggregationEvent",
    "DpsgdProtocol",
    "DpsgdSettings",
    "FLProtocol",
    "GossipProtocol",
    "GossipSettings",
    "LocalOuterState",
    "ModestProtocol",
    "ModestSettings",
    "ProtocolHooks",
    "ProtocolSnapshot",
    "RoundExtra",
    "RoundProtocol",
    "RoundReport",
    "candidate_order",
]
