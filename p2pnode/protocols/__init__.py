"""Round protocols: async state machines over the Transport and PeerDirectory seams.

The daemon and the simulator run these same classes.
"""

from p2pnode.protocols.base import RoundProtocol, RoundReport
from p2pnode.protocols.gossip import GossipProtocol, GossipSettings

__all__ = ["GossipProtocol", "GossipSettings", "RoundProtocol", "RoundReport"]
