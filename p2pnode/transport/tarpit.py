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
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

#: Default most counted refusals of one peer within `DEFAULT_WINDOW_S` before its streams are held.
DEFAULT_MAX_REFUSALS = 20
#: Default length of the sliding window, and of the penalty, in seconds.
DEFAULT_WINDOW_S = 10.0
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


class Tarpit:
    """Refusals per peer over a sliding window, and the peers whose streams are held for exceeding them.

    Args:
        max_refusals: counted refusals of one peer allowed within `window_s` (default 20); the next one
            puts the peer in the tarpit. 0 turns the tarpit off.
        window_s: length of the window, and of a penalty, in seconds (default 10).
        hold_s: how long the transport holds each stream of a tarpitted peer before closing it, in seconds
            (default 5).
        clock: seconds, monotonic (default `time.monotonic`; tests pass a fake one).
        counted: the reasons that count (default `COUNTED_REASONS`).
    """

    def __init__(self, max_refusals: int = DEFAULT_MAX_REFUSALS, window_s: float = DEFAULT_WINDOW_S,
                 hold_s: float = DEFAULT_HOLD_S, *, clock: Callable[[], float] = time.monotonic,
                 counted: frozenset[str] = COUNTED_REASONS) -> None:
        if max_refusals < 0 or window_s <= 0 or hold_s < 0:
            raise ValueError(f"tarpit: need max_refusals >= 0, window_s > 0, hold_s >= 0; got {max_refusals}, "
                             f"{window_s}, {hold_s}")
        self.max_refusals = max_refusals
        self.window_s = window_s
        self.hold_s = hold_s
        self.clock = clock
        self.counted = counted
        self._recent: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._until: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: Times a peer was put in the tarpit, in total.
        self.trips = 0

    @property
    def enabled(self) -> bool:
        """Whether the tarpit is on (`max_refusals` > 0)."""
        return self.max_refusals > 0

    def note(self, peer_id: str, reason: str) -> bool:
        """Count one refusal of `peer_id` for `reason`; return True when it put the peer in the tarpit."""
        if not self.enabled or reason not in self.counted:
            return False
        now = self.clock()
        times = self._recent.get(peer_id)
        if times is None:
            times = self._recent[peer_id] = collections.deque(maxlen=self.max_refusals + 1)
            while len(self._recent) > MAX_TRACKED:
                self._recent.popitem(last=False)
        self._recent.move_to_end(peer_id)
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) <= self.max_refusals:
            return False
        # Over the budget: the penalty runs for a window from now; the count starts again from zero, so a
        # peer that goes on being refused (on a path the tarpit does not hold) extends it only once it is
        # past the budget again.
        times.clear()
        self._until[peer_id] = now + self.window_s
        self._until.move_to_end(peer_id)
        while len(self._until) > MAX_TRACKED:
            self._until.popitem(last=False)
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

    def held_peers(self) -> int:
        """Peers in the tarpit now."""
        now = self.clock()
        return sum(1 for until in self._until.values() if now < until)

    def left_s(self, peer_id: str) -> float:
        """Seconds until `peer_id` leaves the tarpit (0 when it is not in it)."""
        return max(0.0, self._until.get(peer_id, 0.0) - self.clock())
