"""A minimum receive rate: a sender that trickles a large message gives its receive budget back.

A receiver reserves a buffer of the announced size before the payload arrives. Without a minimum rate,
a peer that announces 1 GiB and then sends one byte just before every idle timeout would pin that
reservation for hours. `RateGuard` measures the rate over windows of ``window_s`` seconds once a grace
period has passed, and raises `TooSlow` when a window falls below ``min_bytes_per_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from p2pnode.errors import BadMessage

#: Default smallest accepted receive rate of a message's payload, in bytes per second (64 KiB/s).
DEFAULT_MIN_RATE = 64 * 1024
#: Default time after the payload starts during which any rate is accepted, in seconds.
DEFAULT_GRACE_S = 5.0
#: Default length of the windows over which the rate is averaged, in seconds.
DEFAULT_WINDOW_S = 3.0


class TooSlow(BadMessage):
    """A peer sent a message's payload below the minimum rate; the message is refused (``too_slow``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="too_slow")


class RateGuard:
    """Checks that bytes keep arriving at ``min_bytes_per_s`` or faster.

    Args:
        min_bytes_per_s: smallest accepted rate, in bytes per second (default 64 KiB/s); 0 turns it off.
        grace_s: time after `start` during which any rate is accepted, in seconds (default 5).
        window_s: length of the windows the rate is averaged over, in seconds (default 3).
        clock: monotonic seconds (default `time.monotonic`).
    """

    def __init__(self, min_bytes_per_s: float = DEFAULT_MIN_RATE, *, grace_s: float = DEFAULT_GRACE_S,
                 window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_bytes_per_s = min_bytes_per_s
        self.grace_s = grace_s
        self.window_s = window_s
        self.clock = clock
        self.started = self._window_start = self._last_bytes = clock()
        self._window_bytes = 0
        self.total = 0

    def restart(self) -> None:
        """Start measuring afresh now (grace period included)."""
        self.started = self._window_start = self._last_bytes = self.clock()
        self._window_bytes = 0
        self.total = 0

    def progress(self, nbytes: int) -> None:
        """Count `nbytes` that just arrived; raise `TooSlow` when the window that ended was too slow."""
        now = self.clock()
        if nbytes:
            self._last_bytes = now
        self.total += nbytes
        self._window_bytes += nbytes
        if self.min_bytes_per_s <= 0:
            return
        span = now - self._window_start
        if span < self.window_s:
            return
        rate = self._window_bytes / span
        if now - self.started >= self.grace_s and rate < self.min_bytes_per_s:
            raise TooSlow(f"payload arrived at {rate / 1024:.1f} KiB/s over {span:.1f} s "
                          f"({self.total} bytes in {now - self.started:.1f} s); the minimum is "
                          f"{self.min_bytes_per_s / 1024:.0f} KiB/s")
        self._window_start, self._window_bytes = now, 0

    def idle_for(self) -> float:
        """Seconds since the last bytes arrived (or since `start`)."""
        return self.clock() - self._last_bytes

    def wait_s(self, idle_timeout: float) -> float:
        """How long the next read may wait, in seconds: until the next rate check could fail, but never past
        `idle_timeout` without bytes. After a read times out, call ``progress(0)``, then give up with the
        timeout only when `idle_for` reached `idle_timeout`."""
        remaining = idle_timeout - self.idle_for()
        if self.min_bytes_per_s <= 0:
            return max(0.0, remaining)
        next_check = max(self.started + self.grace_s, self._window_start + self.window_s) - self.clock()
        return max(0.0, min(remaining, max(0.05, next_check)))
