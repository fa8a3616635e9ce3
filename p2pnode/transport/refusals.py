"""Logging of refused messages that a hostile peer cannot turn into a flood.

A refusal is counted in full (`Transport.stats.rejected`), but its log line is bounded twice:

- every field that came from the peer is clipped (`clip`): a 2 MB method name logs as 200 characters and
  its size, not as 2 MB of log;
- lines are rate-limited per (peer, reason) (`RefusalLog`): the first refusal is logged, then at most one
  line per ``interval_s`` that says how many were left out since the previous one.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

#: Default longest logged text of a peer-controlled field, in characters.
DEFAULT_CLIP_CHARS = 200
#: Default shortest time between two logged refusals of one (peer, reason), in seconds.
DEFAULT_LOG_INTERVAL_S = 10.0
#: Most (peer, reason) pairs whose rate limit is remembered; the least recently refused are forgotten.
MAX_TRACKED = 4096

#: Told of a refusal: (peer id, or ``"ip:<address>"`` before the peer is known; reason; message), for
#: example `Transport.reject`, which counts and logs it.
RejectCallback = Callable[[str, str, str], None]


def clip(text: str, limit: int = DEFAULT_CLIP_CHARS) -> str:
    """`text` cut to `limit` characters, followed by ``...(N bytes)`` with its full UTF-8 size when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text.encode('utf-8', 'replace'))} bytes)"


@dataclass
class _Seen:
    logged_at: float
    suppressed: int = 0


class RefusalLog:
    """Rate-limited warnings about refused messages.

    Args:
        logger: where the lines go (at WARNING).
        clock: seconds, for the rate limit (a transport passes its own clock: virtual in the simulator).
        interval_s: shortest time between two lines of one (peer, reason), in seconds (default 10).
        limit: longest text of the message, in characters (default 200), see `clip`.
    """

    def __init__(self, logger: logging.Logger, clock: Callable[[], float], *,
                 interval_s: float = DEFAULT_LOG_INTERVAL_S, limit: int = DEFAULT_CLIP_CHARS) -> None:
        self.logger = logger
        self.clock = clock
        self.interval_s = interval_s
        self.limit = limit
        self._seen: collections.OrderedDict[tuple[str, str], _Seen] = collections.OrderedDict()
        #: Lines left out by the rate limit, in total.
        self.suppressed_total = 0

    def log(self, me: str, peer_id: str, reason: str, message: str) -> bool:
        """Log one refusal of `peer_id`'s message unless the rate limit says no; returns whether it logged.

        `message` is clipped here: pass the full text.
        """
        now = self.clock()
        key = (peer_id, reason)
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self.interval_s:
            seen.suppressed += 1
            self.suppressed_total += 1
            self._seen.move_to_end(key)
            return False
        more = f" ({seen.suppressed} more suppressed in the last {now - seen.logged_at:.0f} s)" \
            if seen is not None and seen.suppressed else ""
        self._seen[key] = _Seen(now)
        self._seen.move_to_end(key)
        while len(self._seen) > MAX_TRACKED:
            self._seen.popitem(last=False)
        # Peer ids are shown by their last 8 characters; addresses (before a peer is known) in full.
        who = clip(peer_id, 64) if peer_id.startswith("ip:") else peer_id[-8:]
        self.logger.warning("%s rejected a message from %s: %s (%s)%s", me[-8:], who,
                            clip(message, self.limit), clip(reason, 64), more)
        return True
