"""Where the model of a node's first round comes from: the newest checkpoint of its run config
(`resume_from_checkpoint`), else the most advanced peers when they are ahead (`sync_from_peers`, late joiner
state sync, `p2pnode.protocols.statesync`), else the task's initial model.

Both log under the node's logger (``p2pnode.daemon.node``), with the node's other start-up lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from p2pnode.daemon.checkpoint import Checkpoint
from p2pnode.daemon.trainer_state import restore
from p2pnode.discovery import PeerInfo
from p2pnode.protocols import LocalOuterState
from p2pnode.protocols.statesync import SyncResult, fetch_state

if TYPE_CHECKING:
    from p2pnode.daemon.node import Node

logger = logging.getLogger("p2pnode.daemon.node")

#: Capability announced in the directory by nodes that serve their model to joiners.
STATESYNC_CAPABILITY = "statesync"
#: How often the directory is polled while waiting for peers, in seconds.
PEER_POLL_S = 0.5


async def resume_from_checkpoint(node: Node) -> None:
    """Load the newest valid checkpoint of this run config into `node` (unless ``--no-resume``, which sets
    earlier ones aside); without one the node starts from the task's initial model."""
    store = node.checkpoints
    cfg = node.config
    ckpt: Checkpoint | None = None
    if store is not None and not node.settings.resume:
        moved = await asyncio.to_thread(store.set_aside, cfg.config_hash)
        if moved is not None:
            logger.info("--no-resume: earlier checkpoints of this run moved to %s", moved)
    elif store is not None:
        await asyncio.to_thread(store.remove_temporary)
        ckpt = await asyncio.to_thread(store.load_latest, cfg.config_hash, run_id=cfg.run_id, task=cfg.task)
    if ckpt is None:
        logger.info("starting from round %d with the task's initial model", node.round,
                    extra={"event": {"event": "resume", "round": node.round, "source": "fresh"}})
        return
    found = ckpt
    await node.compute.run(lambda: restore(node.trainer, found))
    if isinstance(node.protocol, LocalOuterState):
        # The node's own DiLoCo momentum (gossip, dpsgd); none in an older checkpoint: it starts afresh.
        node.protocol.load_outer_state(found.outer)
    elif found.outer:
        logger.warning("the checkpoint of round %d holds outer optimizer state that this protocol does not keep "
                       "on the node; ignored", found.round)
    node.protocol.round = ckpt.round
    node.state_adopted()
    node.resumed_from = "checkpoint"
    node.last_checkpoint_round = ckpt.round
    node.metrics.last_checkpoint_round.set(ckpt.round)
    logger.info("resumed from the checkpoint of round %d (%s)", ckpt.round, ckpt.path,
                extra={"event": {"event": "resume", "round": ckpt.round, "source": "checkpoint",
                                 "path": str(ckpt.path)}})


async def visible_peers(node: Node, wait_s: float) -> list[PeerInfo]:
    """Peers in the directory now, or the first ones to appear within `wait_s` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            peers = await node.directory.peers()
        except Exception as e:  # a slow directory must not stop the start
            logger.warning("peer directory unavailable: %s", e)
            peers = []
        if peers or loop.time() >= deadline or node.stop_event.is_set():
            return peers
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(node.stop_event.wait(), PEER_POLL_S)


async def sync_from_peers(node: Node) -> SyncResult | None:
    """Fetch the model and round of the most advanced peers if they are ahead of this node.

    When initial peers are configured, waits up to ``settings.sync_wait_s`` for peers to appear.
    Never raises: a failed sync leaves this node on its own model (logged and counted).
    """
    s = node.settings
    wait_s = s.sync_wait_s if node.config.initial_peers else 0.0
    peers = await visible_peers(node, wait_s)
    ahead = [p for p in peers if p.round > node.round and STATESYNC_CAPABILITY in p.capabilities]
    if not ahead:
        logger.info("state sync: no peer is ahead of round %d (%d visible)", node.round, len(peers))
        return None
    previous = node.state
    node.state = "syncing"
    logger.info("state sync: %d peer(s) ahead (up to round %d); fetching their model", len(ahead),
                max(p.round for p in ahead))
    try:
        result = await fetch_state(node.transport, ahead, run_id=node.config.run_id,
                                   config_hash=node.config.config_hash, spec=node.trainer.spec,
                                   min_round=node.round, sources=s.sync_sources, parallel=s.sync_parallel,
                                   request_timeout_s=s.sync_request_timeout_s, timeout_s=s.sync_timeout_s)
    except Exception as e:  # a peer's bug must not keep this node from starting
        logger.exception("state sync failed: %s", e)
        result = None
    finally:
        node.state = previous
    if result is None:
        node.metrics.syncs.labels(result="failed").inc()
        logger.warning("state sync: no peer could give its model; starting from round %d with this node's "
                       "own model", node.round,
                       extra={"event": {"event": "sync", "ok": False, "round": node.round}})
        return None
    fetched = result
    await node.compute.run(lambda: node.trainer.load_state(fetched.state))
    node.protocol.round = result.round
    node.state_adopted()
    node.sync_result = result
    node.resumed_from = "peers"
    node.metrics.syncs.labels(result="ok").inc()
    node.metrics.sync_bytes.inc(result.bytes_fetched)
    logger.info("state sync: took the model of round %d from %d peer(s) in %.1f s (%.2f MB, %d chunk retries)",
                result.round, len(result.sources), result.seconds, result.bytes_fetched / 1e6,
                result.failed_chunks,
                extra={"event": {"event": "sync", "ok": True, "round": result.round, "sources": result.sources,
                                 "chunks_from": result.chunks_from, "bytes": result.bytes_fetched,
                                 "failed_chunks": result.failed_chunks, "seconds": round(result.seconds, 3),
                                 "model_sha256": result.model_sha256}})
    return result
