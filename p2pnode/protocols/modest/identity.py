"""Secagg identity keys: each node's long-term Ed25519 key, announced in its directory record.

With a key and an `authenticated` directory (records signed by their peer's key), the secure
aggregation binds every member's ephemeral keys to its identity end to end: members' public keys are
read only from their own records. Without the key or with unsigned records the binding is the
transport's authenticated sender.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery import PeerInfo
from p2pnode.protocols.modest.state import Core, short
from p2pnode.secagg import keys as secagg_keys

logger = logging.getLogger(__name__)


class IdentityKeys:
    """The identity keys of a node and of the members it meets (no binding: every method is a no-op).

    Args:
        core: the node's shared state.
        identity: this node's Ed25519 key, or None: no identity binding (nor with unsigned records).
        read_directory: reads the directory now (views and keys, through `learn`).
    """

    def __init__(self, core: Core, identity: Ed25519PrivateKey | None, *,
                 read_directory: Callable[[], Awaitable[None]]) -> None:
        self.core = core
        # Identity binding only where a record's key is bound to its peer id: with unsigned records anyone
        # could announce a key in another peer's name, which is no better than the transport's binding.
        self.identity = identity if core.settings.secagg is not None and core.directory.authenticated else None
        self.read_directory = read_directory
        #: Members' Ed25519 public keys by peer id, each read from that member's own directory record.
        self.keys: dict[str, bytes] = {}
        if self.identity is not None:
            self.keys[core.me] = secagg_keys.public_identity_key(self.identity)
        #: Loop time of the last directory read for keys.
        self.read_at = -math.inf
        self._refresh: asyncio.Task[None] | None = None

    @property
    def binding(self) -> str:
        """How members' secagg keys are bound: ``identity`` (Ed25519, end to end), ``transport``, or ``off``."""
        if self.core.settings.secagg is None:
            return "off"
        return "identity" if self.identity is not None else "transport"

    @property
    def public_key(self) -> bytes:
        """The raw Ed25519 public key this node announces in its record; empty without identity binding."""
        return self.keys.get(self.core.me, b"") if self.identity is not None else b""

    def learn(self, peers: Iterable[PeerInfo]) -> None:
        """Take the members' identity keys from their directory records (bound to their peer ids)."""
        if self.identity is None:
            return
        self.read_at = self.core.now()
        for info in peers:
            if len(info.secagg_key) == secagg_keys.KEY_BYTES and info.peer_id != self.core.me:
                # The latest signed record wins: a peer that replaced its key announces the new one.
                self.keys[info.peer_id] = info.secagg_key

    def stale(self, members: Iterable[str]) -> bool:
        """Whether some member's key is unknown and the directory was not read within a ping timeout.

        The rate limit keeps a member without a record (crashed, or running without a key) from making
        every round read the directory again.
        """
        return self.directory_stale(m not in self.keys for m in members)

    def directory_stale(self, missing: Iterable[bool]) -> bool:
        """Whether something is `missing` and the directory was not read within a ping timeout."""
        return any(missing) and self.core.now() - self.read_at >= self.core.settings.ping_timeout_s

    def reading(self) -> bool:
        """Whether a background read of the directory (`read_soon`) is running."""
        return self._refresh is not None and not self._refresh.done()

    def read_soon(self) -> None:
        """Read the directory (views and keys) in the background, unless a read is already running."""
        if self._refresh is None or self._refresh.done():
            self._refresh = self.core.spawn(self.read_now())

    async def read_now(self) -> None:
        """Read the directory now (views and keys); a failure leaves the keys as they were."""
        await self.read_directory()
        # Also after a failed read: the rate limit then lets the round go on with the keys it has.
        self.read_at = self.core.now()

    def keys_for(self, members: Iterable[str], *, index: int, role: str) -> dict[str, bytes] | None:
        """The identity keys of `members` for the secure aggregation of version `index` (None: no binding).

        Members whose key is unknown are left out: they cannot take part (counted and logged).
        """
        if self.identity is None:
            return None
        members = list(members)
        known = {m: self.keys[m] for m in members if m in self.keys}
        unknown = [m for m in members if m not in known]
        if unknown:
            self.core.counters["secagg_unknown_key"] += len(unknown)
            logger.warning("%s: no signed identity key known for %d member(s) of the secure aggregation of "
                           "version %d (as %s), e.g. %s: they cannot take part", self.core.me_short, len(unknown),
                           index, role, short(unknown[0]))
        return known
