"""p2pnode: train one model together across volunteers' machines, with no central server.

Layers (imports point downward only)::

    cli/, simulator/     entry points
    daemon/              Node: lifecycle, round loop
    protocols/           gossip (and later modest, secagg rounds) over Transport + PeerDirectory
    training/            tasks (model + data), local trainer, device selection
    aggregation/, attacks/   pure tensor math
    discovery/           PeerDirectory: hivemind DHT (real) / in-memory (simulator)
    transport/           Transport: hivemind P2P (real) / in-memory with a virtual clock (simulator)
    proto/               generated from protos/p2pnode/proto/*.proto
    errors, log          leaves anyone may import
"""

__version__ = "0.1.0"
