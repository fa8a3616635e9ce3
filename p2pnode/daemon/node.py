"""The node: composes a trainer, a transport, a peer directory and a round protocol, and runs rounds.

`Node` itself knows nothing about hivemind or the simulator; `p2pnode.daemon.real.create_real_node` and
`simulator.runner` build it with the real or the in-memory seams. Around the protocol's rounds the node
adds what every deployment needs (each switched by `DaemonSettings`):

- resume from the newest valid checkpoint at start, and write checkpoints every few rounds
  (`p2pnode.daemon.checkpoint`);
- late joiner state sync: at start, fetch the model and round of the most advanced peers when they are
  ahead (`p2pnode.protocols.statesync`), and serve this node's model to joiners;
- the merge quorum: a round that merged fewer models than ``min_merge`` is reported and counted as
  partial, and its merge is undone: the node's decision over the round's report (`partial_reason`),
  which carries the model as it was before the merge (`RoundReport.pre_merge`, kept by the protocol
  when the node sets `RoundProtocol.keep_pre_merge`);
- metrics of every round (`p2pnode.daemon.metrics`);
- with a `NetworkMonitor` (the daemon's `DHTSupervisor`): no rounds while the node is off the network
  (its DHT process or p2pd died and is being restarted), logged once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from p2pnode.config import NodeConfig
from p2pnode.daemon.checkpoint import Checkpoint, CheckpointError, CheckpointStore, capture, restore
from p2pnode.daemon.metrics import NodeMetrics
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.discovery import PeerDirectory, PeerInfo
from p2pnode.protocols import LocalOuterState, RoundExtra, RoundProtocol, RoundReport
from p2pnode.protocols.compute import Compute
from p2pnode.protocols.statesync import StateSyncServer, SyncResult, fetch_state
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Transport

logger = logging.getLogger(__name__)

#: Capability announced in the directory by nodes that serve their model to joiners.
STATESYNC_CAPABILITY = "statesync"
#: How often the directory is polled while waiting for peers, in seconds.
PEER_POLL_S = 0.5
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


def partial_reason(report: RoundReport, min_merge: int) -> str | None:
    """Why the round of `report` is partial, or None when it is not: the node's quorum decision.

    Args:
        report: the protocol's report of the round.
        min_merge: the quorum (``--min-merge``): models a round must combine, the node's own included.

    Returns:
        ``"quorum"`` when it combined fewer than `min_merge` models (the node then undoes the merge, if
        one was applied); ``"fraction"`` when it combined several models but only part of the model
        (`RoundReport.fraction` < 1); else the reason the protocol gave (``extra["partial"]``), or None.
    """
    if report.combined < min_merge:
        return "quorum"
    if report.combined > 1 and report.fraction < 1.0:
        return "fraction"
    reason = report.extra.get("partial")
    return str(reason) if reason else None


@dataclass
class NodeStatus:
    """A snapshot of a node, as `p2pnode status` shows it. Byte counts are whole messages.

    :param partial_rounds: rounds that combined less than asked (quorum not met, or part of the model).
    :param partial_by_reason: the same rounds by reason (``quorum``, ``fraction``; see `partial_reason`).
    :param last_checkpoint_round: round of the newest checkpoint written or resumed; None if none.
    :param resumed_from: where the model of the first round came from: ``fresh`` (the task's initial
        model), ``checkpoint`` or ``peers`` (state sync).
    :param accuracy: test accuracy after the last evaluated round; None before it and when the task's
        metric is not accuracy.
    :param metric: name of the task's metric (``accuracy``, ``perplexity``, ...), and `metric_value` its
        value after the last evaluated round (None before it).
    """

    peer_id: str
    run_id: str
    task: str
    round: int
    peers: int
    accuracy: float | None
    loss: float | None
    bytes_sent: int
    bytes_received: int
    rejected: dict[str, int]
    maddrs: list[str]
    state: str
    partial_rounds: int = 0
    last_checkpoint_round: int | None = None
    resumed_from: str = "fresh"
    #: State of the supervised DHT process (``ok``, ``down``, ``restarting``); None without supervision.
    dht_state: str | None = None
    #: Events of the DHT supervisor (``dht_died``, ``p2pd_died``, ``restarted``, ``restart_failed``).
    dht_events: dict[str, int] = field(default_factory=dict)
    #: Bytes sent and received during the last completed round (0 before the first one).
    round_bytes_sent: int = 0
    round_bytes_received: int = 0
    #: Tensor bytes since start: on the wire, and their uncompressed size (`TrafficStats.tensor_dict`).
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    partial_by_reason: dict[str, int] = field(default_factory=dict)
    metric: str = "accuracy"
    metric_value: float | None = None


def metric_fields(metric: str, value: float | None) -> dict[str, Any]:
    """The metric of a round under the names that logs and results use: ``metric``, ``metric_value``,
    and ``accuracy`` (the value for an accuracy metric, else None, so that readers of accuracy never
    mistake a perplexity for one)."""
    return {"accuracy": value if metric == "accuracy" else None, "metric": metric, "metric_value": value}


def metric_text(metric: str, value: float | None) -> str:
    """``acc=0.912`` / ``perplexity=14.09`` / ``acc=-`` for a log line."""
    label = "acc" if metric == "accuracy" else metric
    if value is None:
        return f"{label}=-"
    return f"{label}={value:.3f}" if metric == "accuracy" else f"{label}={value:.4g}"


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
        await self._resume()
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

    async def _resume(self) -> None:
        store = self.checkpoints
        cfg = self.config
        ckpt: Checkpoint | None = None
        if store is not None and not self.settings.resume:
            moved = await asyncio.to_thread(store.set_aside, cfg.config_hash)
            if moved is not None:
                logger.info("--no-resume: earlier checkpoints of this run moved to %s", moved)
        elif store is not None:
            await asyncio.to_thread(store.remove_temporary)
            ckpt = await asyncio.to_thread(store.load_latest, cfg.config_hash, run_id=cfg.run_id, task=cfg.task)
        if ckpt is None:
            logger.info("starting from round %d with the task's initial model", self.round,
                        extra={"event": {"event": "resume", "round": self.round, "source": "fresh"}})
            return
        found = ckpt
        await self.compute.run(lambda: restore(self.trainer, found))
        if isinstance(self.protocol, LocalOuterState):
            # The node's own DiLoCo momentum (gossip, dpsgd); none in an older checkpoint: it starts afresh.
            self.protocol.load_outer_state(found.outer)
        elif found.outer:
            logger.warning("the checkpoint of round %d holds outer optimizer state that this protocol does not keep "
                           "on the node; ignored", found.round)
        self.protocol.round = ckpt.round
        self._state_adopted()
        self.resumed_from = "checkpoint"
        self.last_checkpoint_round = ckpt.round
        self.metrics.last_checkpoint_round.set(ckpt.round)
        logger.info("resumed from the checkpoint of round %d (%s)", ckpt.round, ckpt.path,
                    extra={"event": {"event": "resume", "round": ckpt.round, "source": "checkpoint",
                                     "path": str(ckpt.path)}})

    async def _visible_peers(self, wait_s: float) -> list[PeerInfo]:
        """Peers in the directory now, or the first ones to appear within `wait_s` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                peers = await self.directory.peers()
            except Exception as e:  # a slow directory must not stop the start
                logger.warning("peer directory unavailable: %s", e)
                peers = []
            if peers or loop.time() >= deadline or self._stop.is_set():
                return peers
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PEER_POLL_S)

    async def sync_from_peers(self) -> SyncResult | None:
        """Fetch the model and round of the most advanced peers if they are ahead of this node.

        When initial peers are configured, waits up to ``settings.sync_wait_s`` for peers to appear.
        Never raises: a failed sync leaves this node on its own model (logged and counted).
        """
        s = self.settings
        wait_s = s.sync_wait_s if self.config.initial_peers else 0.0
        peers = await self._visible_peers(wait_s)
        ahead = [p for p in peers if p.round > self.round and STATESYNC_CAPABILITY in p.capabilities]
        if not ahead:
            logger.info("state sync: no peer is ahead of round %d (%d visible)", self.round, len(peers))
            return None
        previous = self.state
        self.state = "syncing"
        logger.info("state sync: %d peer(s) ahead (up to round %d); fetching their model", len(ahead),
                    max(p.round for p in ahead))
        try:
            result = await fetch_state(self.transport, ahead, run_id=self.config.run_id,
                                       config_hash=self.config.config_hash, spec=self.trainer.spec,
                                       min_round=self.round, sources=s.sync_sources, parallel=s.sync_parallel,
                                       request_timeout_s=s.sync_request_timeout_s, timeout_s=s.sync_timeout_s)
        except Exception as e:  # a peer's bug must not keep this node from starting
            logger.exception("state sync failed: %s", e)
            result = None
        finally:
            self.state = previous
        if result is None:
            self.metrics.syncs.labels(result="failed").inc()
            logger.warning("state sync: no peer could give its model; starting from round %d with this node's "
                           "own model", self.round,
                           extra={"event": {"event": "sync", "ok": False, "round": self.round}})
            return None
        fetched = result
        await self.compute.run(lambda: self.trainer.load_state(fetched.state))
        self.protocol.round = result.round
        self._state_adopted()
        self.sync_result = result
        self.resumed_from = "peers"
        self.metrics.syncs.labels(result="ok").inc()
        self.metrics.sync_bytes.inc(result.bytes_fetched)
        logger.info("state sync: took the model of round %d from %d peer(s) in %.1f s (%.2f MB, %d chunk retries)",
                    result.round, len(result.sources), result.seconds, result.bytes_fetched / 1e6,
                    result.failed_chunks,
                    extra={"event": {"event": "sync", "ok": True, "round": result.round, "sources": result.sources,
                                     "chunks_from": result.chunks_from, "bytes": result.bytes_fetched,
                                     "failed_chunks": result.failed_chunks, "seconds": round(result.seconds, 3),
                                     "model_sha256": result.model_sha256}})
        return result

    def _state_adopted(self) -> None:
        """Tell the protocol that the trainer's model was replaced outside a round (resume, sync, undo)."""
        self.protocol.state_loaded()

    def _publish_state(self, state: Mapping[str, torch.Tensor] | None = None) -> None:
        if self.sync_server is not None:
            self.sync_server.publish(self.round, state if state is not None else self.trainer.state())

    # -------------------------------------------------------------------------------------- rounds
    async def _apply_quorum(self, report: RoundReport) -> tuple[RoundReport, str | None]:
        """Decide whether the round was partial (`partial_reason`); below the quorum, undo its merge.

        A merge was applied when the report says it combined part of the model (`RoundReport.fraction` > 0)
        and carries the model from before it (`RoundReport.pre_merge`): the node then loads that model back.
        The returned report never carries `pre_merge` (the node keeps its last report).
        """
        quorum = self.settings.min_merge
        reason = partial_reason(report, quorum)
        pre, pre_outer = report.pre_merge, report.pre_outer
        report = dataclasses.replace(report, pre_merge=None, pre_outer=None)
        if reason == "quorum":
            test_loss, accuracy = report.test_loss, report.accuracy
            undo = pre is not None and report.fraction > 0.0
            if undo:  # put back the model as trained, before the merge
                assert pre is not None
                before = pre
                await self.compute.run(lambda: self.trainer.load_state(before))
                if pre_outer is not None and isinstance(self.protocol, LocalOuterState):
                    self.protocol.load_outer_state(pre_outer)  # the momentum from before the round's outer step
                self._state_adopted()
                if accuracy is not None:  # the report must describe the model the node keeps
                    test_loss, accuracy = await self.compute.run(self.trainer.evaluate)
            extra = report.extra.copy()
            extra.update(RoundExtra(partial="quorum", offered=report.combined, quorum=quorum, merge_applied=False))
            if undo:
                logger.warning("round %d is partial: %d of the %d models the quorum (--min-merge) asks for; the merge "
                               "is not applied", report.round, report.combined, quorum)
            else:
                logger.warning("round %d is partial: %d of the %d models the quorum (--min-merge) asks for, nothing "
                               "merged", report.round, report.combined, quorum)
            return dataclasses.replace(report, combined=1, fraction=0.0, test_loss=test_loss, accuracy=accuracy,
                                       extra=extra), reason
        if reason == "fraction":
            logger.warning("round %d is partial: the merge combined %.0f %% of the model", report.round,
                           report.fraction * 100)
            extra = report.extra.copy()
            extra["partial"] = "fraction"
            return dataclasses.replace(report, extra=extra), reason
        return report, reason

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
            report, partial = await self._apply_quorum(report)
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
