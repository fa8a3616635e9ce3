"""`RecordPublisher`: keeps this node's record stored under its subkey of the run's DHT key, and withdraws it.

What `DHTDirectory.announce` and `DHTDirectory.withdraw` do on the DHT:

- a record is stored with expiration ``now + ttl`` (DHT clock) and re-stored every ``ttl / 3`` by a
  background task, so that it lives while the node does and vanishes at most ``ttl`` after a crash;
- an announcement in which only the round changed (the node announces after every round) is stored in
  the background, at most once per ``min(min_read_interval, ROUND_STORE_INTERVAL)``: a store waits for
  the replicas, which may be busy, and no round should wait for it;
- withdrawing stores a tombstone (an empty value) that expires just after the last record stored:
  hivemind's DHT has no delete, and per subkey the value with the later expiration wins. A later
  record expires after the tombstone, so a node can come back.

One store at a time (a lock); every value expires later than the last one this node stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from hivemind.utils.timed_storage import get_dht_time

from p2pnode.discovery.base import PeerInfo
from p2pnode.discovery.record_reader import TOMBSTONE

logger = logging.getLogger(__name__)

#: Longest time a record's round may lag the node's, in seconds: an announcement in which only the round
#: changed is stored at most this long after the previous store (at most ``min_read_interval``). Short,
#: since a joiner syncs only from peers whose record says they are ahead; one store at a time, so a slow
#: DHT (busy replicas) stores less often by itself.
ROUND_STORE_INTERVAL = 1.0
#: How much later than the last record a tombstone (or a record after a tombstone) expires, in seconds.
EXPIRATION_STEP = 1e-3

#: Stores one value under this node's subkey with the given expiration (DHT clock); returns whether a
#: replica confirmed it, raises `TimeoutError` when the DHT did not answer in time.
StoreValue = Callable[[bytes, float], Awaitable[bool]]


class RecordPublisher:
    """Stores, refreshes and withdraws one node's record under the run's key.

    :param store: stores a value under this node's subkey, see `StoreValue`.
    :param seal: sets the record's admission MAC (`PeerDirectory.seal`), called on every store.
    :param key: the run's DHT key (for names and log messages).
    :param ttl: lifetime of a stored record, in seconds; it is re-stored every ``ttl / 3``.
    :param min_read_interval: the directory's read interval, in seconds; 0 stores every announcement at
        once, else round-only changes are stored in the background (see the module doc).
    """

    def __init__(self, store: StoreValue, seal: Callable[[PeerInfo], PeerInfo], *, key: str, ttl: float,
                 min_read_interval: float) -> None:
        self._store_value = store
        self._seal = seal
        self.key = key
        self.ttl = ttl
        self.min_read_interval = min_read_interval
        #: The record announced last (None before the first announcement and after `withdraw`).
        self.info: PeerInfo | None = None
        #: Expiration time (DHT clock) of the last value this node stored under its subkey.
        self.last_expiration = float("-inf")
        #: Successful stores by the refresher (for monitoring and tests).
        self.refreshes = 0
        #: A store of the record put off by `announce` (only the round changed), and when the last began.
        self._pending_store: asyncio.Task[None] | None = None
        self._stored_at = -float("inf")
        self._refresher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Start the refresher task (idempotent)."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_loop(), name=f"refresh {self.key}")

    async def stop(self) -> None:
        """Cancel a put-off store and the refresher (the record stays until it expires or is withdrawn)."""
        if self._pending_store is not None and not self._pending_store.done():
            self._pending_store.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pending_store
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

    async def announce(self, info: PeerInfo, *, round_only: bool) -> bool:
        """Publish `info`: at once, or in the background when `round_only` (only the round and timestamp
        differ from the last announcement) and reads are rate-limited.

        :returns: True when the store was put off to the background.
        :raises TimeoutError: a store made at once was not confirmed in time.
        """
        self.info = info
        if round_only and self.min_read_interval > 0:
            # Only the round moved on (the node announces after every round): published by a store at most
            # `ROUND_STORE_INTERVAL` after the last one, in the background. A store waits for the replicas,
            # which may be busy with an outsider's junk: no round should wait for it.
            if self._pending_store is None or self._pending_store.done():
                self._pending_store = asyncio.create_task(self._store_later(), name=f"store {self.key}")
            return True
        await self.store(info)
        return False

    async def store(self, info: PeerInfo) -> None:
        """Store `info` (with a fresh timestamp) now, unless it was withdrawn or replaced meanwhile."""
        async with self._lock:
            if self.info is not info:  # withdrawn or replaced while waiting for the lock
                return
            self._stored_at = time.monotonic()
            record = self._seal(PeerInfo(**{**info.__dict__, "timestamp": time.time()})).to_proto()
            expiration = max(get_dht_time() + self.ttl, self.last_expiration + EXPIRATION_STEP)
            await self._store(record.SerializeToString(), expiration)

    async def withdraw(self) -> None:
        """Stop refreshing and make the record disappear for readers (a tombstone, see the module doc)."""
        self.info = None
        async with self._lock:
            if self.last_expiration == float("-inf"):
                return
            await self._store(TOMBSTONE, self.last_expiration + EXPIRATION_STEP)

    async def _store(self, value: bytes, expiration: float) -> None:
        ok = await self._store_value(value, expiration)
        # Even a store that no replica confirmed may have reached some; later values must still win.
        self.last_expiration = max(self.last_expiration, expiration)
        if not ok:
            logger.warning("DHT store of %s did not reach any replica", self.key)

    async def _store_later(self) -> None:
        spacing = min(self.min_read_interval, ROUND_STORE_INTERVAL)
        await asyncio.sleep(max(0.0, self._stored_at + spacing - time.monotonic()))
        info = self.info
        if info is None:
            return
        try:
            await self.store(info)
        except Exception as e:  # the refresher or the next announce tries again
            logger.warning("store of the record under %s failed: %r", self.key, e)

    async def _refresh_loop(self) -> None:
        period = self.ttl / 3
        while True:
            await asyncio.sleep(period)
            info = self.info
            if info is None:
                continue
            try:
                await self.store(info)
                self.refreshes += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Keep the loop alive: one failed refresh still leaves 2/3 of the ttl for the next one.
                logger.warning("refresh of the record under %s failed: %r", self.key, e)
