"""`ConnectionGuard`: caps the libp2p connections that outsiders keep to a node's p2pd.

Refusing requests is not enough: an identity that connects and sends nothing is never refused, and 16 such
identities of one host cost the rounds of a 3-node swarm 0.59x (``sybil-idle`` in benchmarks/hostile.py:
their daemons' work and 16 more connections of the node's p2pd). p2pd's own connection manager does not
know who belongs to the run, so the guard looks at the connections itself: every ``interval_s`` (default
`DEFAULT_INTERVAL_S`, 5 s) it asks p2pd for its connections (``LIST_PEERS``: one entry per connection, with
the remote multiaddr) and sorts the connected peers into

- *known*: members of the run's directory view, the bootstrap peers, the peers of the node's hivemind DHT
  routing table, and any peer this transport served (its request passed the admission, replay and method
  checks) or called within the last `KNOWN_TTL_S` (10 min). Known peers are never dropped and never
  counted, whatever their host: many honest nodes may share 127.0.0.1, a NAT or a relay;
- *outsiders*: everyone else, grouped by remote host with the tarpit's `tarpit.host_key` (the IP of the
  connection's multiaddr; IPv6 by its /64; a relayed connection by its relay's address).

Then it disconnects (``DISCONNECT``, which closes every connection of that peer), in this order:

1. under admission (``secret`` or ``allowlist``), an outsider connected for longer than ``admission_grace_s``
   (default `DEFAULT_ADMISSION_GRACE_S`, 30 s) without being known (``conn_not_admitted``). An admitted
   peer proves itself with its first request, and a new node's DHT process (same p2pd, same identity)
   enters the routing table with its first DHT request, so the grace only has to cover a join;
2. outsiders of one host beyond ``max_per_host`` (default `DEFAULT_MAX_PER_HOST`, 4) (``conn_host_cap``);
3. outsiders beyond ``max_outsiders`` in total (default `DEFAULT_MAX_OUTSIDERS`, 64) (``conn_total_cap``).

Within a cap the guard drops first the peers of hosts that are hot in the tarpit, then peers in the tarpit,
then peers it dropped before, then the newest: a flooding host loses its connections before a quiet one,
and a peer that was there first keeps its place. A dropped peer may dial again (p2pd lets it); it is
dropped again by the next sweep, so an idle sybil keeps at most a few seconds of connection per interval.

A dropped peer's streams that the tarpit holds died with its connection; the transport releases their
places (`stream_server.StreamServer.release_holds`), so that what the peer opens after dialing again is held
again: with the dead streams still counted, the tarpit's cap of held streams would be full and its new
streams closed at once, which lets a flooder loop faster than a hold does. For the same reason a hot host's
outsiders are not closed at once at their next stream: a held stream makes the attacker wait, a closed one
lets it open the next.

Which peers the DHT needs: hivemind's DHT routes through the peers of its routing table (k-buckets of 20),
which holds DHT *servers* that answered or sent DHT requests, of this run or of other runs sharing the DHT.
They are exempt whether or not they are admitted, so the guard never breaks DHT routing or replication;
the table is bounded by hivemind (its bucket size), so that exemption is bounded too. Not exempt: client-mode
DHTs (they never enter the table; an outside reader of an open run's DHT just counts as an outsider),
bare libp2p identities that never speak hivemind's DHT, and peers that only p2pd's own libp2p DHT (which
finds peers' addresses) connected: the run's nodes are known anyway, so routing among them is untouched.

The classification and the caps are pure (`plan_drops`); `ConnectionGuard` adds the bookkeeping (who is
known, since when a peer is connected), the periodic sweep and the disconnects. It belongs to the real
transport only: the in-memory transport has no connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID

from p2pnode.transport.refusals import RejectCallback
from p2pnode.transport.tarpit import Tarpit, host_key, remember

logger = logging.getLogger(__name__)

#: Default time between two sweeps of the node's connections, in seconds (0: the guard is off).
DEFAULT_INTERVAL_S = 5.0
#: Default most outsiders (peers not known to the node) connected from one remote host.
DEFAULT_MAX_PER_HOST = 4
#: Default most outsiders connected in total.
DEFAULT_MAX_OUTSIDERS = 64
#: Default time an outsider may stay connected under admission before it must be known, in seconds.
DEFAULT_ADMISSION_GRACE_S = 30.0
#: How long a peer that this transport served or called stays known, in seconds.
KNOWN_TTL_S = 600.0
#: Most peers remembered (known, first seen, dropped before); the least recently seen are forgotten first.
MAX_TRACKED = 4096
#: Longest wait for one control request to p2pd (list, disconnect), in seconds.
CONTROL_TIMEOUT_S = 5.0
#: Longest wait for the DHT's routing table, in seconds (a sweep without it keeps the last one).
DHT_PEERS_TIMEOUT_S = 5.0

#: Reason codes of the drops, as counted in `Transport.stats.rejected` (and `ConnectionGuard.dropped`).
HOST_CAP = "conn_host_cap"
TOTAL_CAP = "conn_total_cap"
NOT_ADMITTED = "conn_not_admitted"


@dataclass(frozen=True)
class Connection:
    """One connection that p2pd reports: the remote peer and its host (`tarpit.host_key`; None: no IP)."""

    peer_id: str
    host: str | None


@dataclass(frozen=True)
class Drop:
    """A peer to disconnect, and why (`HOST_CAP`, `TOTAL_CAP`, `NOT_ADMITTED`)."""

    peer_id: str
    host: str | None
    reason: str


def plan_drops(connections: Sequence[Connection], *, known: Callable[[str], bool], first_seen: Mapping[str, float],
               now: float, max_per_host: int, max_outsiders: int, admission_grace_s: float | None = None,
               hot: Callable[[str], bool] = lambda host: False, held: Callable[[str], bool] = lambda peer: False,
               dropped_before: Callable[[str], bool] = lambda peer: False) -> list[Drop]:
    """The peers to disconnect among `connections` (see the module doc); pure.

    Args:
        connections: what p2pd reports (a peer may have several connections; it counts once, under the
            host of its first one that names an IP).
        known: whether a peer is known (never dropped, never counted).
        first_seen: when each peer was first seen connected, in the clock of `now` (missing: `now`).
        max_per_host: most outsiders of one host (0: no cap).
        max_outsiders: most outsiders in total (0: no cap).
        admission_grace_s: under admission, how long an outsider may stay connected (None: no admission).
        hot: whether a host is hot in the tarpit; held: whether a peer is in the tarpit; dropped_before:
            whether the guard dropped the peer before. These order the drops within a cap.
    """
    hosts: dict[str, str | None] = {}
    for conn in connections:
        if hosts.get(conn.peer_id) is None:
            hosts[conn.peer_id] = conn.host
    outsiders = [p for p in hosts if not known(p)]

    def drop_first(peer: str) -> tuple[bool, bool, bool, float]:
        host = hosts[peer]
        return (not (host is not None and hot(host)), not held(peer), not dropped_before(peer),
                -first_seen.get(peer, now))

    drops: list[Drop] = []
    if admission_grace_s is not None:
        late = {p for p in outsiders if now - first_seen.get(p, now) >= admission_grace_s}
        drops += [Drop(p, hosts[p], NOT_ADMITTED) for p in outsiders if p in late]
        outsiders = [p for p in outsiders if p not in late]
    if max_per_host > 0:
        by_host: dict[str, list[str]] = collections.defaultdict(list)
        for p in outsiders:
            host = hosts[p]
            if host is not None:
                by_host[host].append(p)
        over: set[str] = set()
        for peers in by_host.values():
            if len(peers) > max_per_host:
                over.update(sorted(peers, key=drop_first)[:len(peers) - max_per_host])
        drops += [Drop(p, hosts[p], HOST_CAP) for p in sorted(over, key=drop_first)]
        outsiders = [p for p in outsiders if p not in over]
    if 0 < max_outsiders < len(outsiders):
        drops += [Drop(p, hosts[p], TOTAL_CAP)
                  for p in sorted(outsiders, key=drop_first)[:len(outsiders) - max_outsiders]]
    return drops


class ConnectionGuard:
    """Sweeps a p2pd's connections and disconnects outsiders beyond the caps (see the module doc).

    Args:
        p2p: returns the `P2P` to sweep (the transport's current one: it changes when p2pd is restarted).
        reject: counts and logs each drop (the transport's `Transport.reject`: ``stats.rejected`` and the
            rate-limited refusal log).
        tarpit: the transport's tarpit (hot hosts and held peers are dropped first).
        interval_s: time between sweeps, in seconds (default 5; 0: off, `start` does nothing).
        max_per_host: most outsiders of one remote host (default 4; 0: no cap).
        max_outsiders: most outsiders in total (default 64; 0: no cap).
        admission_grace_s: under admission, how long an unknown peer may stay connected, in seconds
            (default 30).
        admission: returns whether the node runs under admission (``secret`` or ``allowlist``).
        clock: seconds, monotonic (default `time.monotonic`).
        on_drop: told the peer id of each peer dropped (the transport ends the holds of its streams in the
            tarpit: they died with its connection).

    The node sets `members` (its directory view), `dht_peers` (its DHT routing table) and `bootstrap`.
    """

    def __init__(self, p2p: Callable[[], P2P], reject: RejectCallback, tarpit: Tarpit, *,
                 interval_s: float = DEFAULT_INTERVAL_S, max_per_host: int = DEFAULT_MAX_PER_HOST,
                 max_outsiders: int = DEFAULT_MAX_OUTSIDERS, admission_grace_s: float = DEFAULT_ADMISSION_GRACE_S,
                 admission: Callable[[], bool] = lambda: False, clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[str], None] | None = None) -> None:
        if interval_s < 0 or max_per_host < 0 or max_outsiders < 0 or admission_grace_s < 0:
            raise ValueError(f"connection guard: need interval_s, max_per_host, max_outsiders, admission_grace_s "
                             f">= 0; got {interval_s}, {max_per_host}, {max_outsiders}, {admission_grace_s}")
        self._p2p = p2p
        self._reject = reject
        self.tarpit = tarpit
        self.interval_s = interval_s
        self.max_per_host = max_per_host
        self.max_outsiders = max_outsiders
        self.admission_grace_s = admission_grace_s
        self._admission = admission
        self.clock = clock
        self._on_drop = on_drop
        #: Peer ids of the run's directory view (set by the node; None: no directory).
        self.members: Callable[[], Iterable[str]] | None = None
        #: Peer ids of the DHT's routing table (set by the node; None: no DHT of its own).
        self.dht_peers: Callable[[], Awaitable[Iterable[str]]] | None = None
        #: Peer ids of the bootstrap peers.
        self.bootstrap: frozenset[str] = frozenset()
        self._dht_view: frozenset[str] = frozenset()
        self._members_view: frozenset[str] = frozenset()
        #: Per peer: when the transport last served or called it.
        self._recent: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: Per peer: when a sweep first saw it connected (kept after it disconnects, so that a dropped
        #: peer that dials again is not given a new grace period).
        self._first_seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: Per peer: when the guard last dropped it.
        self._dropped_at: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: Drops by reason code (`HOST_CAP`, `TOTAL_CAP`, `NOT_ADMITTED`).
        self.dropped: collections.Counter[str] = collections.Counter()
        #: Sweeps done, and outsiders connected at the last one.
        self.sweeps = 0
        self.outsiders = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether sweeps run (`interval_s` > 0)."""
        return self.interval_s > 0

    def dropped_peers(self) -> frozenset[str]:
        """The peers the guard has dropped (the last `MAX_TRACKED`)."""
        return frozenset(self._dropped_at)

    def note_known(self, peer_id: str) -> None:
        """`peer_id` was served (its request passed the checks) or called by this transport just now."""
        remember(self._recent, peer_id, self.clock(), MAX_TRACKED)

    def known(self, peer_id: str) -> bool:
        """Whether `peer_id` is known (see the module doc): never dropped, never counted."""
        if peer_id in self.bootstrap or peer_id in self._members_view or peer_id in self._dht_view:
            return True
        at = self._recent.get(peer_id)
        return at is not None and self.clock() - at < KNOWN_TTL_S

    async def _refresh_known(self) -> None:
        if self.members is not None:
            self._members_view = frozenset(self.members())
        if self.dht_peers is not None:
            try:
                async with asyncio.timeout(DHT_PEERS_TIMEOUT_S):
                    self._dht_view = frozenset(await self.dht_peers())
            except Exception as e:  # the DHT process may be restarting: keep the last table
                logger.debug("connection guard: no DHT routing table this sweep: %r", e)

    async def sweep(self) -> list[Drop]:
        """List p2pd's connections, disconnect the outsiders beyond the caps; return the drops made."""
        await self._refresh_known()
        p2p = self._p2p()
        async with asyncio.timeout(CONTROL_TIMEOUT_S):
            infos = await p2p.list_peers()
        now = self.clock()
        connections = []
        for info in infos:
            peer = info.peer_id.to_base58()
            host = next((h for h in (host_key(str(a)) for a in info.addrs) if h is not None), None)
            connections.append(Connection(peer, host))
            if peer not in self._first_seen:
                remember(self._first_seen, peer, now, MAX_TRACKED)
        self.sweeps += 1
        self.outsiders = len({c.peer_id for c in connections if not self.known(c.peer_id)})
        drops = plan_drops(connections, known=self.known, first_seen=self._first_seen, now=now,
                           max_per_host=self.max_per_host, max_outsiders=self.max_outsiders,
                           admission_grace_s=self.admission_grace_s if self._admission() else None,
                           hot=self.tarpit.hot, held=self.tarpit.holds, dropped_before=self._dropped_at.__contains__)
        for drop in drops:
            await self._drop(p2p, drop)
        return drops

    async def _drop(self, p2p: P2P, drop: Drop) -> None:
        self.dropped[drop.reason] += 1
        remember(self._dropped_at, drop.peer_id, self.clock(), MAX_TRACKED)
        why = {HOST_CAP: f"more than {self.max_per_host} unknown peers connected from host {drop.host}",
               TOTAL_CAP: f"more than {self.max_outsiders} unknown peers connected",
               NOT_ADMITTED: f"connected for {self.admission_grace_s:g} s without proving admission"}[drop.reason]
        self._reject(drop.peer_id, drop.reason, f"connection dropped: {why}")
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                await p2p._client.disconnect(PeerID.from_base58(drop.peer_id))
        except Exception as e:  # gone already, or p2pd restarting: the next sweep sees what is left
            logger.debug("connection guard: could not disconnect %s: %r", drop.peer_id[-8:], e)
        if self._on_drop is not None:
            self._on_drop(drop.peer_id)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # p2pd restarting (the transport is rebound to the new one): next sweep
                logger.debug("connection guard: sweep failed: %r", e)

    def start(self) -> None:
        """Start the periodic sweeps (idempotent; nothing when the guard is off)."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="connection-guard")

    async def stop(self) -> None:
        """Stop the sweeps and wait for the one in progress to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["DEFAULT_ADMISSION_GRACE_S", "DEFAULT_INTERVAL_S", "DEFAULT_MAX_OUTSIDERS", "DEFAULT_MAX_PER_HOST",
           "HOST_CAP", "NOT_ADMITTED", "TOTAL_CAP", "Connection", "ConnectionGuard", "Drop", "plan_drops"]
