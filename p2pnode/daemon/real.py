"""Wires a `Node` to the real network: a hivemind DHT (its own process and p2pd) on the given address,
a `P2PTransport` over the same libp2p identity, and a `DHTDirectory` for run-scoped peer records.

With a state dir (`DaemonSettings.state_dir`), the node locks it, keeps its identity key there (so
its peer id survives restarts), its secure-aggregation key (``secagg.key``, with ``--secagg``) and its
checkpoints. Without one, nothing is persisted: the node gets a
fresh identity and writes no checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import hivemind
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import apply_admission, build_protocol, build_trainer
from p2pnode.daemon.checkpoint import CheckpointStore
from p2pnode.daemon.identity import StateDirLock, load_or_create_identity, load_or_create_secagg_key
from p2pnode.daemon.limits import ThrottledTransport, TokenBucket, apply_cpu_threads, apply_gpu_memory_limit
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.daemon.statedir import ensure_state_dir
from p2pnode.discovery import msgpack_guard
from p2pnode.discovery.dht import DHTDirectory, RunRecordValidator, signed_dht_options
from p2pnode.errors import P2PNodeError
from p2pnode.protocols.compute import ThreadCompute
from p2pnode.transport import Transport
from p2pnode.transport.p2p import P2PTransport

logger = logging.getLogger(__name__)

#: Seconds allowed for the DHT process (and its p2pd) to start and reach the initial peers.
DHT_START_TIMEOUT_S = 60.0


def _host_maddr(host: str, port: int) -> str:
    family = "ip6" if ":" in host else "ip4"
    return f"/{family}/{host}/tcp/{port}"


async def create_real_node(config: NodeConfig, settings: DaemonSettings | None = None) -> Node:
    """Start the DHT and libp2p daemon for `config` and return a `Node` ready to `start()`.

    :param settings: node-local settings; None (default) is ``DaemonSettings()`` without a state dir:
        signed records and state sync on, nothing persisted.
    :raises StateDirError: another node uses the state dir.
    :raises P2PNodeError: the DHT could not start (bad address, initial peers unreachable, ...).

    The trainer (and its data) is built first, then the DHT: hivemind's DHT forks a process, which must
    happen before this process starts its training thread.
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
    try:
        if settings.state_dir is not None:
            ensure_state_dir(settings.state_dir)
            lock = StateDirLock(settings.state_dir).acquire()
            identity = load_or_create_identity(settings.state_dir)
            key_path = identity.path
            logger.info("identity %s (peer id %s)", key_path, identity.peer_id)
            # A key made just now cannot be in use elsewhere: skip p2pd's check (it costs a second p2pd).
            check_free = settings.check_identity_free and not identity.created
        elif settings.signed_records:
            # Signing needs the key as a file for p2pd; a fresh one is never in use, so no check.
            scratch = Path(tempfile.mkdtemp(prefix="p2pnode-identity-"))
            key_path = load_or_create_identity(scratch).path
            check_free = False
        if settings.signed_records:
            dht_kwargs = signed_dht_options(str(key_path), check_if_identity_free=check_free)
            signer = dht_kwargs["record_validators"][0]
        elif settings.state_dir is not None:
            dht_kwargs = {"identity_path": str(key_path), "check_if_identity_free": check_free}
        # hivemind forks the DHT process. Collect garbage first, so that the child never finalizes objects
        # of this process that are not fork-safe (grpc's hang when finalized in a forked child).
        gc.collect()
        # The child inherits both: the decoder guard and this run's record validator protect it from the
        # first message it receives (see p2pnode.discovery.dht).
        msgpack_guard.install()
        validators = [*dht_kwargs.pop("record_validators", []),
                      RunRecordValidator(config.run_id, config.announce_ttl_s)]
        try:
            dht = hivemind.DHT(start=True, host_maddrs=[_host_maddr(config.host, config.port)],
                               initial_peers=list(config.initial_peers), await_ready=True,
                               startup_timeout=DHT_START_TIMEOUT_S, record_validators=validators, **dht_kwargs)
        except Exception as e:
            raise P2PNodeError(f"could not start the DHT on {config.host}:{config.port} with initial peers "
                               f"{config.initial_peers or 'none'}: {e}") from e
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    finally:
        if scratch is not None:  # p2pd has read the key, and the signer holds it in memory
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        p2p = await dht.replicate_p2p()
        p2p_transport = await P2PTransport.create(p2p, max_message_bytes=config.max_message_bytes)
        transport: Transport = p2p_transport
        rate = settings.upload_bytes_per_s
        if rate is not None:
            transport = ThrottledTransport(p2p_transport, TokenBucket(rate))
            logger.info("upload capped at %.1f Mbit/s", settings.max_upload_mbps)
        directory = DHTDirectory(dht, config.run_id, config.config_hash, ttl=config.announce_ttl_s,
                                 peer_id=transport.peer_id, signer=signer)
        # On the inner transport: a throttling wrapper forwards calls and handlers to it.
        admission = apply_admission(config, p2p_transport, directory)
        if admission is not None:
            logger.info("admission %s: only admitted peers are served and used", config.admission)
    except BaseException:
        dht.shutdown()
        if lock is not None:
            lock.release()
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
        await asyncio.to_thread(dht.shutdown)
        await asyncio.to_thread(dht.join, 10.0)
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.release()

    return Node(config, trainer=trainer, transport=transport, directory=directory, protocol=protocol,
                compute=compute, on_shutdown=stop_dht, settings=settings, checkpoints=checkpoints)
