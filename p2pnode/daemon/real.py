"""Wires a `Node` to the real network: a hivemind DHT (its own process and p2pd) on the given address,
a `P2PTransport` over the same libp2p identity, and a `DHTDirectory` for run-scoped peer records.

With a state dir (`DaemonSettings.state_dir`), the node locks it, keeps its identity key there (so
its peer id survives restarts), its secure-aggregation key (``secagg.key``, with ``--secagg``) and its
checkpoints. Without one, nothing is persisted: the node gets a fresh identity (its key file lives in a
temporary directory while the node runs) and writes no checkpoints.

The DHT process is owned by a `DHTSupervisor`, which restarts it (same identity, same port) when it or
its p2pd dies; the restart re-points the transport at the new p2pd and re-announces the node. With a
state dir, the pids of the DHT process and its p2pd are kept in ``children.json`` there, and a node
starting on that state dir first kills those that an earlier daemon left running
(`p2pnode.daemon.children`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hivemind
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import apply_admission, build_protocol, build_trainer
from p2pnode.daemon.checkpoint import CheckpointStore
from p2pnode.daemon.children import kill_leftovers
from p2pnode.daemon.identity import StateDirLock, load_or_create_identity, load_or_create_secagg_key
from p2pnode.daemon.limits import ThrottledTransport, TokenBucket, apply_cpu_threads, apply_gpu_memory_limit
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.daemon.statedir import ensure_state_dir
from p2pnode.daemon.supervisor import DHTSupervisor
from p2pnode.discovery import msgpack_guard
from p2pnode.discovery.dht import DHTDirectory
from p2pnode.discovery.signing import signed_dht_options
from p2pnode.discovery.validator import RunRecordValidator
from p2pnode.protocols.compute import ThreadCompute
from p2pnode.transport import Transport
from p2pnode.transport.p2p import P2PTransport

logger = logging.getLogger(__name__)

#: Seconds allowed for the DHT process (and its p2pd) to start and reach the initial peers.
DHT_START_TIMEOUT_S = 60.0


async def create_real_node(config: NodeConfig, settings: DaemonSettings | None = None) -> Node:
    """Start the DHT and libp2p daemon for `config` and return a `Node` ready to `start()`.

    :param settings: node-local settings; None (default) is ``DaemonSettings()`` without a state dir:
        signed records and state sync on, nothing persisted.
    :raises StateDirError: another node uses the state dir.
    :raises P2PNodeError: the DHT could not start (bad address, initial peers unreachable, ...).

    The trainer (and its data) is built first, then the DHT: hivemind's DHT forks a process, which must
    happen before this process starts its training thread. (Restarts fork too, later, always on the event
    loop's thread; see `p2pnode.daemon.supervisor`.)
    """
    settings = (settings if settings is not None else DaemonSettings()).validate()
    apply_cpu_threads(settings.cpu_threads)
    trainer = build_trainer(config)
    apply_gpu_memory_limit(trainer.device, gib=settings.max_gpu_memory_gib,
                           fraction=settings.max_gpu_memory_fraction)
    lock: StateDirLock | None = None
    scratch: Path | None = None
    dht_kwargs: dict[str, Any] = {}
    signer = None
    supervisor: DHTSupervisor | None = None
    try:
        if settings.state_dir is not None:
            ensure_state_dir(settings.state_dir)
            lock = StateDirLock(settings.state_dir).acquire()
            # A DHT process or p2pd of an earlier daemon of this state dir, still alive, would hold the
            # port and answer as this peer.
            await asyncio.to_thread(kill_leftovers, settings.state_dir)
            identity = load_or_create_identity(settings.state_dir)
            key_path = identity.path
            logger.info("identity %s (peer id %s)", key_path, identity.peer_id)
            # A key made just now cannot be in use elsewhere: skip p2pd's check (it costs a second p2pd).
            check_free = settings.check_identity_free and not identity.created
        else:
            # A key file for p2pd (and for signing), kept for the life of the node: a restarted DHT process
            # reads it again and keeps the peer id. A fresh one is never in use, so no check.
            scratch = Path(tempfile.mkdtemp(prefix="p2pnode-identity-"))
            key_path = load_or_create_identity(scratch).path
            check_free = False
        if settings.signed_records:
            dht_kwargs = signed_dht_options(str(key_path), check_if_identity_free=check_free)
            signer = dht_kwargs["record_validators"][0]
        else:
            dht_kwargs = {"identity_path": str(key_path), "check_if_identity_free": check_free}
        # The DHT process inherits both: the decoder guard and this run's record validator protect it from
        # the first message it receives (see p2pnode.discovery.dht), after every restart too.
        msgpack_guard.install()
        dht_kwargs["record_validators"] = [*dht_kwargs.pop("record_validators", []),
                                           RunRecordValidator(config.run_id, config.announce_ttl_s,
                                                              config.directory_max_subkeys)]
        directory_box: list[DHTDirectory] = []
        supervisor = DHTSupervisor(host=config.host, port=config.port, initial_peers=list(config.initial_peers),
                                   dht_options=dht_kwargs, start_timeout_s=DHT_START_TIMEOUT_S,
                                   state_dir=settings.state_dir,
                                   peer_hints=lambda: _peer_hints(directory_box))
        dht = await supervisor.start()
    except BaseException:
        if lock is not None:
            lock.release()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        p2p = await dht.replicate_p2p()
        p2p_transport = await P2PTransport.create(p2p, compression=config.compression, **config.transport_limits())
        transport: Transport = p2p_transport
        rate = settings.upload_bytes_per_s
        if rate is not None:
            transport = ThrottledTransport(p2p_transport, TokenBucket(rate))
            logger.info("upload capped at %.1f Mbit/s", settings.max_upload_mbps)
        directory = DHTDirectory(dht, config.run_id, config.config_hash, ttl=config.announce_ttl_s,
                                 peer_id=transport.peer_id, signer=signer,
                                 min_read_interval=config.directory_read_interval_s,
                                 max_subkeys=config.directory_max_subkeys)
        # On the inner transport: a throttling wrapper forwards calls and handlers to it.
        admission = apply_admission(config, p2p_transport, directory)
        if admission is not None:
            logger.info("admission %s: only admitted peers are served and used", config.admission)
        directory_box.append(directory)
        # The connection guard never drops the run's members, its DHT's routing peers or its bootstrap peers.
        guard = p2p_transport.guard
        guard.members = lambda: [p.peer_id for p in directory.last_peers]
        guard.dht_peers = directory.routing_peers
        guard.bootstrap = frozenset(_bootstrap_ids(config.initial_peers))
    except BaseException:
        await supervisor.close()
        if lock is not None:
            lock.release()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    compute = ThreadCompute()
    secagg_identity: Ed25519PrivateKey | None = None
    if config.secagg:
        # Kept next to identity.key so that peers that read this node's record keep the right key across
        # restarts; without a state dir a fresh key per start (announced in each new record).
        secagg_identity = (load_or_create_secagg_key(settings.state_dir) if settings.state_dir is not None
                           else Ed25519PrivateKey.generate())
        if not settings.signed_records:
            logger.warning("secure aggregation with unsigned records: members' keys are bound only to the "
                           "transport's authenticated sender, not signed end to end")
    protocol = build_protocol(config, trainer=trainer, transport=transport, directory=directory,
                              compute=compute, rng=random.Random(f"{config.seed}/{transport.peer_id}"),
                              secagg_identity=secagg_identity)
    checkpoints = None
    if settings.state_dir is not None:
        checkpoints = CheckpointStore.in_state_dir(settings.state_dir, keep=settings.keep_checkpoints)

    async def stop_dht() -> None:
        await supervisor.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.release()

    node = Node(config, trainer=trainer, transport=transport, directory=directory, protocol=protocol,
                compute=compute, on_shutdown=stop_dht, settings=settings, checkpoints=checkpoints,
                network=supervisor)

    async def rejoin(new_dht: hivemind.DHT) -> None:
        # The new p2pd has the same identity: point the transport and the directory at it, and put this
        # node's record back (the DHT process that stored it is gone, and so are the replicas it held).
        old = p2p_transport.p2p
        await p2p_transport.rebind(await new_dht.replicate_p2p())
        with contextlib.suppress(Exception):
            await old.shutdown()  # the replica of the dead daemon: removes its client socket file
        directory.rebind(new_dht)
        if node.state == "running":
            await directory.announce(node.info())

    supervisor.on_restart(rejoin)
    return node


def _bootstrap_ids(maddrs: Sequence[str]) -> list[str]:
    """The peer ids named by ``/p2p/<id>`` in bootstrap multiaddrs (those without one are skipped)."""
    parts = [m.rstrip("/").split("/") for m in maddrs]
    return [p[-1] for p in parts if len(p) >= 2 and p[-2] in ("p2p", "ipfs")]


def _peer_hints(directory_box: Sequence[DHTDirectory]) -> list[str]:
    """One multiaddr of each peer of the directory's last listing (the peers a restarted DHT rejoins)."""
    return [p.maddrs[0] for d in directory_box for p in d.last_peers if p.maddrs]
