"""In-memory peer directory for the simulator: one shared registry, one `MemoryDirectory` per node.

Records expire by the clock of the running event loop (virtual seconds under
`p2pnode.transport.clock.run_virtual`), exactly like the DHT's expiring records: a node that stops
refreshing its record (because it crashed) drops out of everyone's `peers()` once its TTL has passed.
There is no background refresh: the node re-announces itself (its round loop does), at least once per
``ttl_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable

from p2pnode.discovery.base import OTHER_CONFIG, SECAGG_KEY_BYTES, PeerDirectory, PeerInfo

__all__ = ["MemoryDirectory", "MemoryRegistry"]


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class MemoryRegistry:
    """Records of all runs, keyed by run id and peer id, each with an expiry time.

    :param clock: returns the current time in seconds (default: the running event loop's ``time()``,
        which is virtual time in the simulator).

    Shared by all `MemoryDirectory` objects of a simulation. Expired records are invisible and are
    purged lazily. Tests and simulated attackers may `put` arbitrary records.
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock if clock is not None else _loop_time
        self._runs: dict[str, dict[str, tuple[PeerInfo, float]]] = {}

    def now(self) -> float:
        """The registry's current time, in seconds."""
        return self._clock()

    def put(self, run_id: str, info: PeerInfo, ttl_s: float) -> None:
        """Store (or replace) the record of ``info.peer_id`` in `run_id`, valid for `ttl_s` seconds."""
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self._runs.setdefault(run_id, {})[info.peer_id] = (info, self._clock() + ttl_s)

    def remove(self, run_id: str, peer_id: str) -> None:
        """Delete the record of `peer_id` in `run_id`, if any."""
        records = self._runs.get(run_id)
        if records is not None:
            records.pop(peer_id, None)
            if not records:
                del self._runs[run_id]

    def live(self, run_id: str) -> list[PeerInfo]:
        """Unexpired records of `run_id`, sorted by peer id (any config hash, this node included)."""
        records = self._runs.get(run_id)
        if not records:
            return []
        now = self._clock()
        expired = [p for p, (_, expires_at) in records.items() if expires_at <= now]
        for p in expired:
            del records[p]
        return [records[p][0] for p in sorted(records)]


def _valid(info: PeerInfo) -> bool:
    """The schema a record must meet (what the DHT directory's validator checks)."""
    return (isinstance(info.peer_id, str) and bool(info.peer_id)
            and isinstance(info.round, int) and info.round >= 0
            and isinstance(info.config_hash, str)
            and isinstance(info.timestamp, float | int) and math.isfinite(info.timestamp)
            and isinstance(info.secagg_key, bytes) and len(info.secagg_key) in (0, SECAGG_KEY_BYTES))


class MemoryDirectory(PeerDirectory):
    """The `PeerDirectory` of one node, over a shared `MemoryRegistry`.

    :param registry: the registry shared by the simulation.
    :param peer_id: this node's peer id.
    :param run_id: the run this directory is scoped to.
    :param config_hash: this node's config hash; records with another hash are excluded.
    :param ttl_s: lifetime of this node's record after each `announce`, in seconds (default 30.0).
    :param authenticated: whether records count as written by the peer they name (default True). The
        simulator's nodes write only their own record (`announce` refuses another peer id), so the
        registry stands for the daemon's signed DHT; `MemoryRegistry.put` bypasses that and is what an
        unsigned directory would let anyone do. False models ``--unsigned-records``.

    `rejected` (and its sums `mismatched`, `invalid`) is cumulative: each `peers()` call adds the records
    it dropped (``other_config``, ``bad_record``).
    """

    def __init__(self, registry: MemoryRegistry, *, peer_id: str, run_id: str, config_hash: str,
                 ttl_s: float = 30.0, authenticated: bool = True) -> None:
        super().__init__()
        self.authenticated = authenticated
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self.registry = registry
        self.peer_id = peer_id
        self.run_id = run_id
        self.config_hash = config_hash
        self.ttl_s = ttl_s

    async def shutdown(self) -> None:
        await self.withdraw()

    async def announce(self, info: PeerInfo) -> None:
        """Publish or refresh this node's record for `ttl_s` seconds.

        The stored record carries this directory's config hash (filled in when ``info.config_hash`` is
        empty) and ``timestamp`` = the registry's current time. Raises `ValueError` when `info` names
        another peer or another config hash.
        """
        if info.peer_id != self.peer_id:
            raise ValueError(f"this directory announces {self.peer_id!r}, not {info.peer_id!r}")
        if info.config_hash not in ("", self.config_hash):
            raise ValueError(f"record has config hash {info.config_hash!r}, "
                             f"this directory {self.config_hash!r}")
        record = self.seal(dataclasses.replace(info, config_hash=self.config_hash, timestamp=self.registry.now()))
        self.registry.put(self.run_id, record, self.ttl_s)

    async def withdraw(self) -> None:
        self.registry.remove(self.run_id, self.peer_id)

    async def peers(self) -> list[PeerInfo]:
        out: list[PeerInfo] = []
        for info in self.registry.live(self.run_id):
            if not _valid(info):
                self.rejected["bad_record"] += 1
            elif info.peer_id == self.peer_id:
                continue
            elif not self.admitted(info):
                continue
            elif info.config_hash != self.config_hash:
                self.rejected[OTHER_CONFIG] += 1
            else:
                out.append(info)
        return out
