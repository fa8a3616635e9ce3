"""Wires a `Node` to the in-memory network: the twin of `p2pnode.daemon.real` for the simulator and tests.

`create_memory_node` builds what `create_real_node` builds, with the simulator's seams in place of the
network: a `MemoryTransport` registered on a shared `MemoryNetwork` (latency, bandwidth, loss,
partitions, crashes), a `MemoryDirectory` on a shared `MemoryRegistry`, and by default a
`VirtualCompute` (training inline, charged on the virtual clock). The trainer, the admission policy
and the round protocol come from `p2pnode.daemon.build`, as in the daemon. Nothing is persisted: no
state dir, identity key or checkpoints (`DaemonSettings.in_memory()` unless told otherwise).
"""

from __future__ import annotations

import random

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import apply_admission, build_protocol, build_trainer, seeded_secagg_identity
from p2pnode.daemon.checkpoint import CheckpointStore
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.discovery.memory import MemoryDirectory, MemoryRegistry
from p2pnode.protocols.adversary import Attacker
from p2pnode.protocols.compute import Compute, VirtualCompute
from p2pnode.secagg.randomness import Randomness
from p2pnode.training.tasks import Task
from p2pnode.transport.compression import Compression
from p2pnode.transport.memory import MemoryNetwork


def create_memory_node(config: NodeConfig, settings: DaemonSettings | None = None, *, network: MemoryNetwork,
                       registry: MemoryRegistry, peer_id: str, task: Task | None = None,
                       compute: Compute | None = None, rng: random.Random | None = None, step_cost_s: float = 0.0,
                       compression: Compression | str | None = None, ttl_s: float | None = None,
                       authenticated: bool = True, secagg_key: bool = True,
                       secagg_randomness: Randomness | None = None, attacker: Attacker | None = None,
                       checkpoints: CheckpointStore | None = None) -> Node:
    """A `Node` of `config` on `network` and `registry` as `peer_id`, ready to `start()`.

    Args:
        config: the node's validated config.
        settings: node-local settings; None (default) is `DaemonSettings.in_memory()` (nothing persisted,
            no sync, no quorum).
        network: the in-memory network; the node's transport is registered on it (`ValueError` if
            `peer_id` is taken).
        registry: the shared directory registry.
        peer_id: the node's peer id.
        task: the task to train (default None: ``get_task(config.task)``; pass one to share its data).
        compute: where training runs, for the protocol and the node (default None: a `VirtualCompute`).
        rng: the protocol's randomness (default None: seeded by ``config.seed`` and `peer_id`).
        step_cost_s: modelled virtual seconds per training step (default 0).
        compression: the transport's wire compression (default None: ``config.compression``).
        ttl_s: seconds a directory record lives (default None: ``config.announce_ttl_s``).
        authenticated: whether the directory's records are authenticated (default True; False is
            ``--unsigned-records``).
        secagg_key: with ``config.secagg``, give the node its seeded secagg identity key
            (`seeded_secagg_identity`; default True); False leaves it without one.
        secagg_randomness: secret randomness of secure aggregation (default None: the OS CSPRNG).
        attacker: the node's forging (default None: built from ``config.attack``).
        checkpoints: where the node saves and resumes its checkpoints (default None: none).

    Returns:
        The node, not started.
    """
    transport = network.transport(peer_id, max_message_bytes=config.max_message_bytes,
                                  compression=config.compression if compression is None else compression)
    directory = MemoryDirectory(registry, peer_id=peer_id, run_id=config.run_id, config_hash=config.config_hash,
                                ttl_s=config.announce_ttl_s if ttl_s is None else ttl_s,
                                authenticated=authenticated)
    apply_admission(config, transport, directory)
    trainer = build_trainer(config, task)
    compute = compute if compute is not None else VirtualCompute()
    protocol = build_protocol(config, trainer=trainer, transport=transport, directory=directory, compute=compute,
                              rng=rng if rng is not None else random.Random(f"{config.seed}/{peer_id}"),
                              step_cost_s=step_cost_s, secagg_randomness=secagg_randomness,
                              secagg_identity=seeded_secagg_identity(config.seed, peer_id)
                              if config.secagg and secagg_key else None,
                              attacker=attacker)
    return Node(config, trainer=trainer, transport=transport, directory=directory, protocol=protocol,
                compute=compute, settings=settings, checkpoints=checkpoints)
