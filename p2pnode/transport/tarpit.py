"""Per-peer refusal budget: a peer refused too often has its next streams held unread, then closed.

A refusal is cheap for the node (a 2 MB method name is refused after 7 bytes read), so a peer that is
refused as fast as it can send keeps sending: on a shared machine its own CPU, and the node's per-stream
cost, take what the round loops lose (docs/benchmarks.md, hostile swarm). `Tarpit` counts each peer's
refusals of the reasons in `COUNTED_REASONS` over a sliding window; the refusal that takes a peer past
``max_refusals`` within ``window_s`` puts it in the tarpit for ``window_s``. While it is there the real
transport (`p2pnode.transport.p2p`) reads nothing of its streams and answers none: each new stream is
held for ``hold_s`` and then closed (reason ``tarpit``). Held streams count against the per-peer stream
limit, so a peer holds at most ``max_streams_per_peer`` of them; its streams beyond that are closed at
once (``tarpit`` too). A sequential flooder then sends one request per ``hold_s`` instead of hundreds per
second, and a parallel one ``max_streams_per_peer`` per ``hold_s`` plus streams closed unread.

Defaults, and why:

- ``max_refusals`` 20 per ``window_s`` 10 s (2 refusals/s sustained). An honest peer of the same version
  is never refused for the counted reasons, so the budget only has to absorb what a broken link does to a
  correct peer: a request cut off (``truncated``, ``too_slow``) costs it at least the receive grace (5 s)
  or its call timeout, so even 8 streams at once (the per-peer limit) give at most 16 per 10 s. A flood
  is past the budget within a fraction of a second (628 refusals in 8 s in the hostile benchmark).
- ``hold_s`` 5 s: with the 8-stream limit, at most 1.6 streams per second of a tarpitted peer get as far
  as a sleeping task, under the budget's 2 per second; it is well under the transport's idle timeout
  (30 s), so a held stream ties up no more than a request that stalls, which any peer can do already.
- The penalty ends ``window_s`` after the refusal that tripped it, and held streams do not prolong it:
  a peer that behaves again (a node restarted with the right secret, say) is served again within
  ``window_s``; one that goes on flooding is past the budget again after ``max_refusals`` more refusals.

A stream beyond the peer's own stream limit counts too (`STREAMS_PER_PEER`; a parallel flooder fills its
8 streams with refusals that are answered and drained, and is otherwise refused ``busy`` without ever
reaching the budget); a correct peer hardly waits for 8 answers at once, let alone 20 times in 10 s.
Not counted: ``busy`` for the node's budget (it may be spent by others), ``tarpit`` itself, and the
protocols' verdicts on content (``stale``, ``wrong_run``, ``bad_shape``, ``non_finite``, ...), which a
correct peer in another state or run can earn every round; the robust rules, not the transport, deal
with lying peers. Memory is bounded: at most `MAX_TRACKED` peers are remembered (least recently refused
forgotten first), each with at most ``max_refusals + 1`` times.

Sybils: identities are free, so k identities would get k budgets. Refusals are therefore also counted per
remote host (`host_key`: the IP of the stream's remote multiaddr as p2pd reports it; an IPv6 address by
its /64, which one machine is usually given whole; a relayed stream by its relay's address), over the same
window, against ``max_host_refusals`` (default `DEFAULT_MAX_HOST_REFUSALS`, 40, twice a peer's budget).
A host past it is *hot* for ``window_s``, and while it is hot a peer from it is put in the tarpit by its
first counted refusal instead of its 21st. The host's peers that are not refused are not touched: the host
is never held as a whole. That is the choice that keeps honest peers behind one NAT, behind one relay, or
all on 127.0.0.1 (tests, one machine's benchmarks) from paying for a bad neighbour: a shared address only
costs a peer the slack of its own budget, and an honest peer of this version is not refused for the
counted reasons at all. (A peer whose broken link earns it a ``truncated`` while a neighbour floods is held
for one window: the price of the shared address.) k sybils of one host then get about
``max_host_refusals + k`` refusals per window together, not ``k x max_refusals``; identities spread over
many hosts are beyond a per-host count, so the node counts all its refusals too: past
``max_node_refusals`` (default `DEFAULT_MAX_NODE_REFUSALS`, 200, five hosts' budgets) within the window the
node is *alarmed* for ``window_s``, and while it is, a peer that is not known to it (`exempt`: members of the
run's directory, peers it served or called; the transport's connection guard decides) is put in the tarpit
by its first counted refusal, wherever it comes from. Known peers keep their own budget then, so a botnet
cannot get the run's members held; k identities over any number of hosts get about
``max_node_refusals + k`` refusals per window together (admission is still the defence that lets them
reach none, docs/security.md). The transport caps
the streams it holds at once as well (``tarpit_max_held``), so that many tarpitted identities cannot tie
up the node's stream total; past it their new streams are closed at once (``tarpit_full``).
"""


from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable
from typing import Any

#: Default most counted refusals of one peer within `DEFAULT_WINDOW_S` before its streams are held.
DEFAULT_MAX_REFUSALS = 20
#: Default length of the sliding window, and of the penalty, in seconds.
DEFAULT_WINDOW_S = 10.0
#: Default most counted refusals of all peers of one remote host within the window before the host is hot
#: (its peers are then held at their first counted refusal); twice `DEFAULT_MAX_REFUSALS`.
DEFAULT_MAX_HOST_REFUSALS = 40
#: Default most counted refusals of all peers together within the window before the node is alarmed (peers
#: not known to it are then held at their first counted refusal); five times `DEFAULT_MAX_HOST_REFUSALS`.
DEFAULT_MAX_NODE_REFUSALS = 200
#: Default time a stream of a tarpitted peer is held (not read, not answered) before it is closed, in s.
DEFAULT_HOLD_S = 5.0
#: Most peers whose refusals (and penalties) are remembered.
MAX_TRACKED = 4096
#: What the transport notes (besides the refusal, counted as ``busy``) when a peer opens a stream beyond its
#: own stream limit (``max_streams_per_peer``): that one is the peer's doing, unlike a ``busy`` for the
#: node's budget, which others may have spent.
STREAMS_PER_PEER = "streams_per_peer"
#: Refusal reasons that count against a peer's budget: what the transport refuses on the wire before any
#: handler runs, which a correct peer of this version does not send (see the module doc).
COUNTED_REASONS = frozenset({"unknown_method", "malformed", "oversized", "not_admitted", "replayed",
                             "stale_clock", "no_nonce", "too_slow", "truncated", STREAMS_PER_PEER})


def host_key(maddr: str) -> str | None:
    """The remote host of a stream's multiaddr, as `Tarpit` counts it, or None when it names no IP.

    ``/ip4/A/...``: ``A``; ``/ip6/A/...``: the /64 network of ``A`` (``A::/64``); for a relayed address
    (``.../p2p-circuit...``) that is the relay's IP, the address p2pd reports. Anything else (DNS names,
    unix sockets, garbage): None, and only the per-peer budget applies.
    """
    parts = maddr.split("/")
    for i, proto in enumerate(parts[:-1]):
        if proto not in ("ip4", "ip6"):
            continue
        try:
            ip = ipaddress.ip_address(parts[i + 1])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)
    return None


class _Window:
    """Times of counted refusals within a sliding window (at most `limit + 1` kept)."""

    def __init__(self, limit: int) -> None:
        self.times: collections.deque[float] = collections.deque(maxlen=limit + 1)

    def add(self, now: float, window_s: float) -> int:
        """Count one at `now`; return how many lie within `window_s` of it."""
        self.times.append(now)
        while self.times and now - self.times[0] > window_s:
            self.times.popleft()
        return len(self.times)


def remember(table: collections.OrderedDict[str, Any], key: str, value: Any, limit: int) -> None:
    """Set ``table[key] = value`` as the most recent entry, and forget the least recent ones beyond `limit`."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


class Tarpit:
    """Refusals per peer and per remote host over a sliding window, and the peers held for exceeding them.

    Args:
        max_refusals: counted refusals of one peer allowed within `window_s` (default 20); the next one
            puts the peer in the tarpit. 0 turns the tarpit off.
        window_s: length of the window, and of a penalty, in seconds (default 10).
        hold_s: how long the transport holds each stream of a tarpitted peer before closing it, in seconds
            (default 5).
        max_host_refusals: counted refusals of all peers of one host (`host_key`) allowed within
            `window_s` (default 40); past it the host is hot for `window_s`, and a peer of a hot host is put
            in the tarpit by its first counted refusal. 0: no per-host count.
        max_node_refusals: counted refusals of all peers together allowed within `window_s` (default 200);
            past it the node is alarmed for `window_s`, and a peer that `exempt` does not name is put in the
            tarpit by its first counted refusal. 0: no node-wide count.
        exempt: whether a peer is known to the node (a run member, a peer it served or called): such a peer
            keeps its own budget while the node is alarmed (default: nobody is exempt). Hot hosts still
            apply to it.
        clock: seconds, monotonic (default `time.monotonic`; tests pass a fake one).
        counted: the reasons that count (default `COUNTED_REASONS`).
    """

    def __init__(self, max_refusals: int = DEFAULT_MAX_REFUSALS, window_s: float = DEFAULT_WINDOW_S,
                 hold_s: float = DEFAULT_HOLD_S, *, max_host_refusals: int = DEFAULT_MAX_HOST_REFUSALS,
                 max_node_refusals: int = DEFAULT_MAX_NODE_REFUSALS, exempt: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic, counted: frozenset[str] = COUNTED_REASONS) -> None:
        if max_refusals < 0 or window_s <= 0 or hold_s < 0 or max_host_refusals < 0 or max_node_refusals < 0:
            raise ValueError(f"tarpit: need max_refusals >= 0, window_s > 0, hold_s >= 0, max_host_refusals >= 0, "
                             f"max_node_refusals >= 0; got {max_refusals}, {window_s}, {hold_s}, {max_host_refusals}, "
                             f"{max_node_refusals}")
        self.max_refusals = max_refusals
        self.window_s = window_s
        self.hold_s = hold_s
        self.max_host_refusals = max_host_refusals
        self.max_node_refusals = max_node_refusals
        #: Whether a peer is known to the node (exempt from the node-wide alarm); the transport may set it later.
        self.exempt: Callable[[str], bool] = exempt or (lambda peer_id: False)
        self.clock = clock
        self.counted = counted
        self._recent: collections.OrderedDict[str, _Window] = collections.OrderedDict()
        self._until: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: Per host: its refusals, and until when it is hot.
        self._host_recent: collections.OrderedDict[str, _Window] = collections.OrderedDict()
        self._host_until: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: The host each peer's last stream came from (`seen`).
        self._host_of: collections.OrderedDict[str, str] = collections.OrderedDict()
        #: Times a peer was put in the tarpit, in total.
        self.trips = 0
        #: Of those, trips by a peer's first refusals while its host was hot (below its own budget).
        self.host_trips = 0
        #: Times a host became hot, in total.
        self.hot_hosts = 0
        #: All peers' refusals, and until when the node is alarmed.
        self._node_recent = _Window(max_node_refusals)
        self._node_until = 0.0
        #: Times the node was alarmed, in total.
        self.alarms = 0
        #: Trips by a peer's first refusals while the node was alarmed (below its own and its host's budget).
        self.alarm_trips = 0

    @property
    def enabled(self) -> bool:
        """Whether the tarpit is on (`max_refusals` > 0)."""
        return self.max_refusals > 0

    def seen(self, peer_id: str, host: str | None) -> None:
        """Note that `peer_id`'s latest stream came from `host` (`host_key`; None: unknown, forgotten)."""
        if host is None:
            self._host_of.pop(peer_id, None)
        elif self._host_of.get(peer_id) != host:
            remember(self._host_of, peer_id, host, MAX_TRACKED)

    def host_of(self, peer_id: str) -> str | None:
        """The host `peer_id`'s latest stream came from, if known."""
        return self._host_of.get(peer_id)

    def note(self, peer_id: str, reason: str) -> bool:
        """Count one refusal of `peer_id` (and of its host, see `seen`) for `reason`; return True when it
        put the peer in the tarpit."""
        if not self.enabled or reason not in self.counted:
            return False
        now = self.clock()
        times = self._recent.get(peer_id)
        if times is None:
            times = _Window(self.max_refusals)
            remember(self._recent, peer_id, times, MAX_TRACKED)
        self._recent.move_to_end(peer_id)
        over = times.add(now, self.window_s) > self.max_refusals
        host = self._host_of.get(peer_id)
        if host is not None and self.max_host_refusals > 0:
            hot = self._host_until.get(host, 0.0) > now
            if not hot:
                counts = self._host_recent.get(host)
                if counts is None:
                    counts = _Window(self.max_host_refusals)
                    remember(self._host_recent, host, counts, MAX_TRACKED)
                self._host_recent.move_to_end(host)
                if counts.add(now, self.window_s) > self.max_host_refusals:
                    # The host is hot for a window: from now on each of its peers is held at its first
                    # counted refusal (this one included); its count starts again when that ends.
                    counts.times.clear()
                    remember(self._host_until, host, now + self.window_s, MAX_TRACKED)
                    self.hot_hosts += 1
                    hot = True
            if hot and not over:
                over = True
                self.host_trips += 1
        if self.max_node_refusals > 0:
            alarmed = self._node_until > now
            if not alarmed and self._node_recent.add(now, self.window_s) > self.max_node_refusals:
                # The node is alarmed for a window: peers it does not know are held at their first counted
                # refusal (this one included); the count starts again when that ends.
                self._node_recent.times.clear()
                self._node_until = now + self.window_s
                self.alarms += 1
                alarmed = True
            if alarmed and not over and not self.exempt(peer_id):
                over = True
                self.alarm_trips += 1
        if not over:
            return False
        # Over the budget: the penalty runs for a window from now; the count starts again from zero, so a
        # peer that goes on being refused (on a path the tarpit does not hold) extends it only once it is
        # past the budget again.
        times.times.clear()
        remember(self._until, peer_id, now + self.window_s, MAX_TRACKED)
        self.trips += 1
        return True

    def holds(self, peer_id: str) -> bool:
        """Whether `peer_id` is in the tarpit now (its streams are to be held, not served)."""
        until = self._until.get(peer_id)
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[peer_id]
            return False
        return True

    def hot(self, host: str) -> bool:
        """Whether `host` is past its budget now (its peers are held at their first counted refusal)."""
        return self._host_until.get(host, 0.0) > self.clock()

    def alarmed(self) -> bool:
        """Whether the node is past its node-wide budget now (unknown peers are held at their first refusal)."""
        return self._node_until > self.clock()

    def held_peers(self) -> int:
        """Peers in the tarpit now."""
        now = self.clock()
        return sum(1 for until in self._until.values() if now < until)

    def left_s(self, peer_id: str) -> float:
        """Seconds until `peer_id` leaves the tarpit (0 when it is not in it)."""
        return max(0.0, self._until.get(peer_id, 0.0) - self.clock())
