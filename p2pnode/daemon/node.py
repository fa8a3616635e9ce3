"""The node: composes a trainer, a transport, a peer directory and a round protocol, and runs rounds.

`Node` itself knows nothing about hivemind or the simulator; `p2pnode.daemon.real.create_real_node` and
`simulator.runner` build it with the real or the in-memory seams. Around the protocol's rounds the node
adds what every deployment needs (each switched by `DaemonSettings`):

- resume from the newest valid checkpoint at start (`p2pnode.daemon.resume`), and write checkpoints
  every few rounds (`p2pnode.daemon.checkpoint`);
- late joiner state sync: at start, fetch the model and round of the most advanced peers when they are
  ahead (`p2pnode.daemon.resume`, `p2pnode.protocols.statesync`), and serve this node's model to joiners;
- the merge quorum (`p2pnode.daemon.quorum`): a round that merged fewer models than ``min_merge`` is
  reported and counted as partial, and its merge is undone: the node's decision over the round's report
  (`partial_reason`), which carries the model as it was before the merge (`RoundReport.pre_merge`, kept
  by the protocol when the node sets `RoundProtocol.keep_pre_merge`);
- metrics of every round (`p2pnode.daemon.metrics`);
- with a `NetworkMonitor` (the daemon's `DHTSupervisor`): no rounds while the node is off the network
  (its DHT process or p2pd died and is being restarted), logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any, Protocol

import torch

from p2pnode.config import NodeConfig
from p2pnode.daemon.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from p2pnode.daemon.metrics import NodeMetrics
from p2pnode.daemon.node_status import NodeStatus, metric_fields, metric_text
from p2pnode.daemon.quorum import apply_quorum
from p2pnode.daemon.resume import STATESYNC_CAPABILITY, resume_from_checkpoint, sync_from_peers
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.daemon.trainer_state import capture
from p2pnode.discovery import PeerDirectory, PeerInfo
from p2pnode.protocols import LocalOuterState, RoundProtocol, RoundReport
from p2pnode.protocols.compute import Compute
from p2pnode.protocols.statesync import StateSyncServer, SyncResult
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Transport

logger = logging.getLogger(__name__)

#: How often a node whose network is down checks whether it is back, in seconds.
NETWORK_POLL_S = 0.2


class NetworkMonitor(Protocol):
    """What the node reads of whoever keeps its network processes alive (`DHTSupervisor` in the daemon)."""

    @property
    def state(self) -> str:
        """``"ok"``, ``"down"`` or ``"restarting"``."""

    @property
    def events(self) -> Mapping[str, int]:
        """Counts by event name (``dht_died``, ``restarted``, ...)."""


class Node:
    """One participant of a run.

    :param config: the node's validated config.
    :param trainer: local model and data.
    :param transport: how it talks to peers.
    :param directory: how it finds peers.
    :param protocol: the round protocol, built over the three above.
    :param compute: where training runs (a worker thread in the daemon, inline in the simulator).
    :param on_shutdown: extra clean-up run last on shutdown (for example stopping the DHT process).
    :param settings: node-local settings (checkpoints, sync, quorum); default
        `DaemonSettings.in_memory()`: nothing persisted, no sync, no quorum.
    :param checkpoints: where checkpoints are read and written; None: no checkpoints.
    :param network: the supervisor of the node's network processes; None (default): none (simulator).
        While its state is not ``ok``, `run` starts no round and the health check reports NOT_SERVING.
    """

    def __init__(self, config: NodeConfig, *, trainer: Trainer, transport: Transport, directory: PeerDirectory,
                 protocol: RoundProtocol, compute: Compute,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None,
                 settings: DaemonSettings | None = None, checkpoints: CheckpointStore | None = None,
                 network: NetworkMonitor | None = None) -> None:
        self.config = config
        self.trainer = trainer
        self.transport = transport
        self.directory = directory
        self.protocol = protocol
        self.compute = compute
        self.settings = (settings or DaemonSettings.in_memory()).validate()
        self.checkpoints = checkpoints
        self.network = network
        self._on_shutdown = on_shutdown
        self.last_report: RoundReport | None = None
        self.state = "created"
        #: Bytes sent to and received from peers during the last completed round (whole messages, this
        #: node's answers to peers' requests meanwhile included); 0 before the first round.
        self.round_bytes_sent = 0
        self.round_bytes_received = 0
        self.last_checkpoint_round: int | None = None
        self.resumed_from = "fresh"
        #: The state sync of this start, if one fetched a model.
        self.sync_result: SyncResult | None = None
        #: Log the ATTACKER warnings of a node configured with an attack (the simulator turns them off).
        self.loud_attack = True
        self.metrics = NodeMetrics(self)
        self._stop = asyncio.Event()
        self._watchers: list[asyncio.Queue[RoundReport | None]] = []
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._in_round = False
        self.sync_server: StateSyncServer | None = None
        if self.settings.serve_state:
            self.sync_server = StateSyncServer(transport, run_id=config.run_id, config_hash=config.config_hash,
                                               chunk_bytes=self.settings.sync_chunk_bytes)
        # The quorum needs the model as it was before the protocol merged: the protocol keeps it in each
        # report when asked (a copy per round, so only with a quorum to enforce).
        protocol.keep_pre_merge = self.settings.min_merge > 1

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id

    @property
    def round(self) -> int:
        return self.protocol.round

    @property
    def partial_rounds(self) -> int:
        """Rounds run by this process that were partial (`partial_reason`), whatever the reason."""
        return sum(self.metrics.partial_by_reason.values())

    @property
    def stop_event(self) -> asyncio.Event:
        """Set once the node is asked to stop (`stop`, `shutdown`): waits of the node end early on it."""
        return self._stop

    @property
    def network_ok(self) -> bool:
        """False while the supervised network processes are down or restarting (True without supervision)."""
        return self.network is None or self.network.state == "ok"

    def info(self) -> PeerInfo:
        caps = (self.config.topology, STATESYNC_CAPABILITY) if self.sync_server else (self.config.topology,)
        # The secagg identity key travels in the record, which the directory signs (when records are signed):
        # that binds it to this node's peer id for the members of its samples.
        secagg_key = self.protocol.secagg_public_key
        return PeerInfo(peer_id=self.peer_id, maddrs=tuple(self.transport.addresses()), round=self.round,
                        task=self.config.task, config_hash=self.config.config_hash,
                        capabilities=caps, timestamp=time.time(), secagg_key=secagg_key)

    # -------------------------------------------------------------------------------------- start
    async def start(self) -> None:
        """Start serving, resume from a checkpoint or sync from peers, and announce this node.

        :raises CheckpointMismatch: the state dir holds checkpoints of another run config only.
        """
        await self.transport.start()
        await self.directory.start()
        self.state = "starting"
        await resume_from_checkpoint(self)
        if self.settings.sync_on_join:
            await self.sync_from_peers()
        self._publish_state()
        # Announced only now: a peer that exchanged with this node before it resumed or synced would
        # merge a stale model into its own.
        await self.directory.announce(self.info())
        self.state = "running"
        logger.info("node %s started: run=%s task=%s topology=%s rule=%s", self.peer_id, self.config.run_id,
                    self.config.task, self.config.topology, self.config.rule)
        if self.config.attack is not None and self.loud_attack:
            logger.warning("ATTACKER: this node runs the %s attack (params %s) and sends forged %s to its peers; "
                           "for testing a swarm's defences only", self.config.attack, self.config.attack_params or {},
                           "models" if self.config.attack != "label_flip" else "models trained on flipped labels",
                           extra={"event": {"event": "attacker", "attack": self.config.attack,
                                            "params": self.config.attack_params}})

    def state_adopted(self) -> None:
        """Tell the protocol that the trainer's model was replaced outside a round (resume, sync, undo)."""
        self.protocol.state_loaded()

    def _publish_state(self, state: Mapping[str, torch.Tensor] | None = None) -> None:
        if self.sync_server is not None:
            self.sync_server.publish(self.round, state if state is not None else self.trainer.state())

    async def sync_from_peers(self) -> SyncResult | None:
        """Fetch the model and round of the most advanced peers if they are ahead of this node.

        When initial peers are configured, waits up to ``settings.sync_wait_s`` for peers to appear.
        Never raises: a failed sync leaves this node on its own model (logged and counted).
        """
        return await sync_from_peers(self)

    # -------------------------------------------------------------------------------------- rounds
    async def run_round(self) -> RoundReport:
        """Run one round of the protocol, check its merge, checkpoint, refresh the directory record, and
        publish the report."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        st = self.transport.stats
        sent0, received0 = st.bytes_sent, st.bytes_received
        self._in_round = True
        try:
            report = await self.protocol.run_round()
            report, partial = await apply_quorum(self, report)
        finally:
            self._in_round = False
        duration = loop.time() - t0
        # `stats` may have been replaced meanwhile (a test resetting counters): never report a negative round.
        st = self.transport.stats
        self.round_bytes_sent = max(0, st.bytes_sent - sent0)
        self.round_bytes_received = max(0, st.bytes_received - received0)
        self.last_report = report
        self.metrics.observe_round(report, duration, partial)
        self._publish_state()
        await self._maybe_checkpoint()
        try:
            await self.directory.announce(self.info())
        except Exception as e:  # the next round retries; training must not stop for the directory
            logger.warning("could not refresh the directory record: %s", e)
        self._log(report, partial, duration)
        for q in self._watchers:
            q.put_nowait(report)
        return report

    def suspicion(self) -> dict[str, float]:
        """The protocol's per-peer suspicion scores (empty for protocols that do not score peers)."""
        return self.protocol.snapshot().suspicion

    def _log(self, r: RoundReport, partial: str | None, duration_s: float) -> None:
        if self.config.attack is not None and self.loud_attack:
            logger.warning("ATTACKER: round %d sent forged data (%s attack)", r.round, self.config.attack)
        metric = self.trainer.metric
        event = {"event": "round", "peer_id": self.peer_id, **r.record(), **metric_fields(metric, r.accuracy),
                 "bytes_sent": self.transport.stats.bytes_sent,
                 "bytes_received": self.transport.stats.bytes_received,
                 "round_bytes_sent": self.round_bytes_sent, "round_bytes_received": self.round_bytes_received,
                 "rejected": sum(self.transport.stats.rejected.values()),
                 "partial": partial, "duration_s": round(duration_s, 4)}
        logger.info("peer=%s round=%d loss=%.4f %s peers=%d merged=%d sent=%.2fMB%s", self.peer_id[-8:],
                    r.round, r.train_loss, metric_text(metric, r.accuracy), r.peers, r.combined,
                    self.transport.stats.bytes_sent / 1e6,
                    f" partial={partial}" if partial else "", extra={"event": event})

    # -------------------------------------------------------------------------------------- checkpoints
    async def _maybe_checkpoint(self) -> None:
        every = self.settings.checkpoint_every
        if self.checkpoints is None or every <= 0 or self.round % every:
            return
        await self.checkpoint()

    async def checkpoint(self) -> None:
        """Take a checkpoint of the model now and write it in the background (one write at a time).

        The copy is taken on the compute thread, between rounds; the file is written on another thread
        while the next round runs. Waits for the previous write first, so writes never pile up.
        """
        if self.checkpoints is None:
            return
        await self.wait_for_checkpoint()
        cfg = self.config
        round_ = self.round
        protocol = self.protocol
        ckpt = await self.compute.run(lambda: capture(
            self.trainer, round_=round_, config_hash=cfg.config_hash, run_id=cfg.run_id, task=cfg.task,
            peer_id=self.peer_id, outer=protocol.outer_state() if isinstance(protocol, LocalOuterState) else None))
        self._checkpoint_task = asyncio.ensure_future(self._write_checkpoint(self.checkpoints, ckpt))

    async def wait_for_checkpoint(self) -> None:
        """Wait until the checkpoint being written (if any) is on disk."""
        task, self._checkpoint_task = self._checkpoint_task, None
        if task is not None:
            await task

    async def _write_checkpoint(self, store: CheckpointStore, ckpt: Checkpoint) -> None:
        t0 = time.monotonic()
        try:
            path = await asyncio.to_thread(store.write, ckpt)
        except CheckpointError as e:  # a full disk must not stop training; the next round tries again
            self.metrics.checkpoint_failures.inc()
            logger.warning("checkpoint of round %d failed: %s", ckpt.round, e)
            return
        except Exception:  # nor may anything else: this task is awaited by the round loop
            self.metrics.checkpoint_failures.inc()
            logger.exception("checkpoint of round %d failed", ckpt.round)
            return
        self.last_checkpoint_round = ckpt.round
        self.metrics.checkpoints.inc()
        self.metrics.last_checkpoint_round.set(ckpt.round)
        logger.debug("checkpoint of round %d written to %s", ckpt.round, path,
                     extra={"event": {"event": "checkpoint", "round": ckpt.round, "path": str(path),
                                      "seconds": round(time.monotonic() - t0, 4)}})

    # -------------------------------------------------------------------------------------- run
    async def wait_for_peers(self, count: int, timeout: float) -> int:
        """Wait until `count` peers are visible in the directory or `timeout` seconds pass; return how many."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while not self._stop.is_set():
            try:
                seen = len(await self.directory.peers())
            except Exception as e:
                logger.warning("peer directory unavailable: %s", e)
            if seen >= count or loop.time() >= deadline:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)
        if seen < count:
            logger.warning("starting with %d of the %d peers asked for after %.0f s", seen, count, timeout)
        return seen

    async def run(self, rounds: int | None = None) -> None:
        """Run rounds until `rounds` are done (None: until `stop()`), pacing by `min_round_time_s`.

        `rounds` counts from round 0: a node resumed at round 7 with ``rounds=10`` runs 3 more.
        Before the first round, waits for `config.wait_for_peers` peers (at most `config.wait_timeout_s`).
        """
        target = rounds if rounds is not None else self.config.rounds
        if self.round == 0 and self.config.wait_for_peers > 0:
            await self.wait_for_peers(self.config.wait_for_peers, self.config.wait_timeout_s)
        while not self._stop.is_set() and (target is None or self.round < target):
            if not await self._wait_for_network():
                break
            t0 = asyncio.get_running_loop().time()
            await self.run_round()
            rest = self.config.min_round_time_s - (asyncio.get_running_loop().time() - t0)
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), rest)

    async def _wait_for_network(self) -> bool:
        """Wait while the network is down (logged once per outage); False if the node was stopped meanwhile.

        A round without the DHT and p2pd would fail every exchange and report a merge of its own model
        only; the node waits instead, with its health NOT_SERVING, until the supervisor has restarted them.
        """
        if self.network_ok:
            return True
        assert self.network is not None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        logger.warning("the node is off the network (DHT %s): no rounds until it is back", self.network.state,
                       extra={"event": {"event": "rounds_paused", "round": self.round,
                                        "dht_state": self.network.state}})
        while not self.network_ok and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), NETWORK_POLL_S)
        if self._stop.is_set():
            return False
        logger.info("back on the network after %.1f s: rounds resume at round %d", loop.time() - t0, self.round,
                    extra={"event": {"event": "rounds_resumed", "round": self.round,
                                     "paused_s": round(loop.time() - t0, 3)}})
        return True

    def stop(self) -> None:
        """Ask `run` to return after the current round."""
        self._stop.set()

    async def watch(self) -> AsyncIterator[RoundReport]:
        """Yield each round's report as it completes, until the node shuts down."""
        q: asyncio.Queue[RoundReport | None] = asyncio.Queue()
        self._watchers.append(q)
        try:
            while (item := await q.get()) is not None:
                yield item
        finally:
            self._watchers.remove(q)

    def status(self) -> NodeStatus:
        r = self.last_report
        st = self.transport.stats
        return NodeStatus(peer_id=self.peer_id, run_id=self.config.run_id, task=self.config.task,
                          round=self.round, peers=r.peers if r else 0,
                          **metric_fields(self.trainer.metric, r.accuracy if r else None),
                          loss=r.train_loss if r else None, bytes_sent=st.bytes_sent,
                          bytes_received=st.bytes_received, rejected=dict(st.rejected),
                          maddrs=self.transport.addresses(), state=self.state, partial_rounds=self.partial_rounds,
                          partial_by_reason=self.metrics.partial_by_reason,
                          last_checkpoint_round=self.last_checkpoint_round, resumed_from=self.resumed_from,
                          dht_state=self.network.state if self.network is not None else None,
                          dht_events=dict(self.network.events) if self.network is not None else {},
                          round_bytes_sent=self.round_bytes_sent, round_bytes_received=self.round_bytes_received,
                          tensor_bytes=st.tensor_dict())

    async def shutdown(self) -> None:
        """Leave gracefully: finish the checkpoint in progress (and write one of the last round if it has
        none), withdraw the directory record, stop serving, release every resource."""
        if self.state == "stopped":
            return
        self.state = "stopping"
        self._stop.set()
        for q in self._watchers:
            q.put_nowait(None)
        try:
            await self.wait_for_checkpoint()
            # Not after a round cut short (cancelled mid-way): its model is neither the last round's nor
            # the next's, and the last periodic checkpoint is the better one to resume from.
            if (self.checkpoints is not None and self.settings.checkpoint_every > 0 and not self._in_round
                    and self.round > (self.last_checkpoint_round or 0)):
                await self.checkpoint()
                await self.wait_for_checkpoint()
        except Exception as e:
            logger.warning("final checkpoint failed: %s", e)
        for step in (self.directory.shutdown, self.protocol.close, self.transport.shutdown):
            try:
                await step()
            except Exception as e:
                logger.warning("shutdown step %s failed: %s", getattr(step, "__qualname__", step), e)
        self.compute.close()
        if self._on_shutdown is not None:
            await self._on_shutdown()
        self.state = "stopped"
        logger.info("node %s stopped after %d rounds", self.peer_id, self.round)

    def summary(self) -> dict[str, Any]:
        return asdict(self.status())
