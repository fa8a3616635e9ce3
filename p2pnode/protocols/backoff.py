"""A back-off table of silent peers: peers whose calls time out are left out of partner choice for longer.

A call to a silent peer (crashed, black-holed, behind a NAT that drops inbound streams) costs a whole
timeout, which is usually far longer than a round; a back-off counted in rounds therefore still loses
most of the time to it. Here, after ``k`` consecutive timeouts a peer is skipped for
``min(base_s * 2 ** (k - 1), max_s)`` seconds of the loop's clock (virtual in the simulator), and any
successful call resets it. With ``base_s`` equal to the timeout, the time lost to one silent peer is at
most about ``k`` timeouts in ``2 ** k`` timeouts of time: it shrinks as the silence lasts.

Only timeouts count: a refusal is an answer (the peer is there), and other failures are the business
of `p2pnode.protocols.base.PeerHealth`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: Default longest skip of a silent peer, in seconds.
DEFAULT_MAX_S = 600.0


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


@dataclass
class _Silence:
    timeouts: int
    until: float


class SilentBackoff:
    """Which peers to leave out of partner choice because their calls time out.

    Args:
        base_s: skip after the first timeout, in seconds (> 0); doubles with each further one.
        max_s: longest skip, in seconds (default 600).
        clock: current time in seconds (default: the running loop's clock, virtual in the simulator).
    """

    def __init__(self, base_s: float, max_s: float = DEFAULT_MAX_S, clock: Callable[[], float] | None = None) -> None:
        if not base_s > 0 or not max_s >= base_s:
            raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock if clock is not None else _loop_time
        self._silent: dict[str, _Silence] = {}
        #: Timeouts recorded, and candidates left out of a partner choice because they were in back-off.
        self.timeouts = 0
        self.skips = 0

    def timed_out(self, peer_id: str) -> float:
        """Record a timeout of `peer_id`; return for how many seconds it is now skipped."""
        prev = self._silent.get(peer_id)
        k = 1 if prev is None else prev.timeouts + 1
        skip = min(self.base_s * 2.0 ** min(k - 1, 62), self.max_s)
        self._silent[peer_id] = _Silence(k, self._clock() + skip)
        self.timeouts += 1
        return skip

    def succeeded(self, peer_id: str) -> None:
        """A call to `peer_id` was answered: forget its silence."""
        self._silent.pop(peer_id, None)

    def skipped(self, peer_id: str) -> bool:
        """Whether `peer_id` is in back-off now."""
        s = self._silent.get(peer_id)
        return s is not None and s.until > self._clock()

    def filter(self, candidates: Iterable[str]) -> list[str]:
        """`candidates` without the peers in back-off (counted in `skips`)."""
        out = []
        for p in candidates:
            if self.skipped(p):
                self.skips += 1
            else:
                out.append(p)
        return out

    def silent(self) -> dict[str, int]:
        """Peers with consecutive timeouts -> how many."""
        return {p: s.timeouts for p, s in self._silent.items()}


__all__ = ["DEFAULT_MAX_S", "SilentBackoff"]
