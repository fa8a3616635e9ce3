"""Wires a `Node` to the real network: a hivemind DHT (its own process and p2pd) on the given address,
a `P2PTransport` over the same libp2p identity, and a `DHTDirectory` for run-scoped peer records."""

from __future__ import annotations

import asyncio
import logging
import random

import hivemind

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import build_protocol, build_trainer
from p2pnode.daemon.node import Node
from p2pnode.discovery.dht import DHTDirectory
from p2pnode.errors import P2PNodeError
from p2pnode.protocols.compute import ThreadCompute
from p2pnode.transport.p2p import P2PTransport

logger = logging.getLogger(__name__)

#: Seconds allowed for the DHT process (and its p2pd) to start and reach the initial peers.
DHT_START_TIMEOUT_S = 60.0


def _host_maddr(host: str, port: int) -> str:
    family = "ip6" if ":" in host else "ip4"
    return f"/{family}/{host}/tcp/{port}"


async def create_real_node(config: NodeConfig) -> Node:
    """Start the DHT and libp2p daemon for `config` and return a `Node` ready to `start()`.

    The trainer (and its data) is built first, then the DHT: hivemind's DHT forks a process, which must
    happen before this process starts its training thread.
    """
    trainer = build_trainer(config)
    try:
        dht = hivemind.DHT(start=True, host_maddrs=[_host_maddr(config.host, config.port)],
                           initial_peers=list(config.initial_peers), await_ready=True,
                           startup_timeout=DHT_START_TIMEOUT_S)
    except Exception as e:
        raise P2PNodeError(f"could not start the DHT on {config.host}:{config.port} with initial peers "
                           f"{config.initial_peers or 'none'}: {e}") from e
    try:
        p2p = await dht.replicate_p2p()
        transport = await P2PTransport.create(p2p, max_message_bytes=config.max_message_bytes)
        directory = DHTDirectory(dht, config.run_id, config.config_hash, ttl=config.announce_ttl_s,
                                 peer_id=transport.peer_id)
    except BaseException:
        dht.shutdown()
        raise
    compute = ThreadCompute()
    protocol = build_protocol(config, trainer=trainer, transport=transport, directory=directory,
                              compute=compute, rng=random.Random(f"{config.seed}/{transport.peer_id}"))

    async def stop_dht() -> None:
        await asyncio.to_thread(dht.shutdown)
        await asyncio.to_thread(dht.join, 10.0)

    return Node(config, trainer=trainer, transport=transport, directory=directory, protocol=protocol,
                compute=compute, on_shutdown=stop_dht)
