"""The node: composes a trainer, a transport, a peer directory and a round protocol, and runs rounds.

`Node` itself knows nothing about hivemind or the simulator; `p2pnode.daemon.real.create_real_node` and
`simulator.runner` build it with the real or the in-memory seams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from p2pnode.config import NodeConfig
from p2pnode.discovery import PeerDirectory, PeerInfo
from p2pnode.protocols import RoundProtocol, RoundReport
from p2pnode.protocols.compute import Compute
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Transport

logger = logging.getLogger(__name__)


@dataclass
class NodeStatus:
    """A snapshot of a node, as `p2pnode status` shows it. Byte counts are whole messages."""

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


class Node:
    """One participant of a run.

    :param config: the node's validated config.
    :param trainer: local model and data.
    :param transport: how it talks to peers.
    :param directory: how it finds peers.
    :param protocol: the round protocol, built over the three above.
    :param compute: where training runs (a worker thread in the daemon, inline in the simulator).
    :param on_shutdown: extra clean-up run last on shutdown (for example stopping the DHT process).
    """

    def __init__(self, config: NodeConfig, *, trainer: Trainer, transport: Transport, directory: PeerDirectory,
                 protocol: RoundProtocol, compute: Compute,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.trainer = trainer
        self.transport = transport
        self.directory = directory
        self.protocol = protocol
        self.compute = compute
        self._on_shutdown = on_shutdown
        self.last_report: RoundReport | None = None
        self.state = "created"
        self._stop = asyncio.Event()
        self._watchers: list[asyncio.Queue[RoundReport | None]] = []

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id

    @property
    def round(self) -> int:
        return self.protocol.round

    def info(self) -> PeerInfo:
        return PeerInfo(peer_id=self.peer_id, maddrs=tuple(self.transport.addresses()), round=self.round,
                        task=self.config.task, config_hash=self.config.config_hash,
                        capabilities=(self.config.topology,), timestamp=time.time())

    async def start(self) -> None:
        """Start serving and announce this node in the directory."""
        await self.transport.start()
        await self.directory.start()
        await self.directory.announce(self.info())
        self.state = "running"
        logger.info("node %s started: run=%s task=%s topology=%s rule=%s", self.peer_id, self.config.run_id,
                    self.config.task, self.config.topology, self.config.rule)

    async def run_round(self) -> RoundReport:
        """Run one round of the protocol, refresh the directory record, and publish the report."""
        report = await self.protocol.run_round()
        self.last_report = report
        try:
            await self.directory.announce(self.info())
        except Exception as e:  # the next round retries; training must not stop for the directory
            logger.warning("could not refresh the directory record: %s", e)
        self._log(report)
        for q in self._watchers:
            q.put_nowait(report)
        return report

    def _log(self, r: RoundReport) -> None:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
        event = {"event": "round", "peer_id": self.peer_id, **asdict(r),
                 "bytes_sent": self.transport.stats.bytes_sent,
                 "bytes_received": self.transport.stats.bytes_received,
                 "rejected": sum(self.transport.stats.rejected.values())}
        logger.info("peer=%s round=%d loss=%.4f acc=%s peers=%d merged=%d sent=%.2fMB", self.peer_id[-8:],
                    r.round, r.train_loss, acc, r.peers, r.combined, self.transport.stats.bytes_sent / 1e6,
                    extra={"event": event})

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

        Before the first round, waits for `config.wait_for_peers` peers (at most `config.wait_timeout_s`).
        """
        target = rounds if rounds is not None else self.config.rounds
        if self.round == 0 and self.config.wait_for_peers > 0:
            await self.wait_for_peers(self.config.wait_for_peers, self.config.wait_timeout_s)
        while not self._stop.is_set() and (target is None or self.round < target):
            t0 = asyncio.get_running_loop().time()
            await self.run_round()
            rest = self.config.min_round_time_s - (asyncio.get_running_loop().time() - t0)
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), rest)

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
                          round=self.round, peers=r.peers if r else 0, accuracy=r.accuracy if r else None,
                          loss=r.train_loss if r else None, bytes_sent=st.bytes_sent,
                          bytes_received=st.bytes_received, rejected=dict(st.rejected),
                          maddrs=self.transport.addresses(), state=self.state)

    async def shutdown(self) -> None:
        """Leave gracefully: withdraw the directory record, stop serving, release every resource."""
        if self.state == "stopped":
            return
        self.state = "stopping"
        self._stop.set()
        for q in self._watchers:
            q.put_nowait(None)
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
