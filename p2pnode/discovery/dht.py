"""`DHTDirectory`: run-scoped peer records in hivemind's Kademlia DHT.

Layout: one DHT key per run, ``"<run_id>/peers"``; under it one subkey per peer whose value is the
serialized `PeerRecord` (protobuf bytes) and whose expiration is ``now + ttl``. A background task
re-stores the record every ``ttl / 3`` so that it lives while the node does and vanishes at most
``ttl`` seconds after a crash.

Reading (`peers`) checks every record before use and counts what it skips in ``rejected`` by reason
(see `PeerDirectory`): bytes that do not parse as a `PeerRecord` (``undecodable``), exceed
`MAX_RECORD_BYTES` (``oversized``), whose ``peer_id`` differs from their subkey (``mismatched``), that
expire further ahead than ``ttl * EXPIRATION_CAP_FACTOR`` (``expired_too_far``), records of another
config hash (``other_config``), and, with an admission policy (`PeerDirectory.admission`), records
without a valid admission MAC (``not_admitted``). Each record (subkey and value, not its expiration:
junk stored again with a new expiration is the same junk) is counted once, however many reads see it,
and its verdict is remembered (`VERDICT_CACHE_SIZE` records, least recently seen forgotten first), so
that a read re-parses only records it has not seen (`record_reader.RecordReader` does the judging).

Outsiders. Anyone who reaches a DHT node can store under the run's key. Six defences:

- `msgpack_guard` (installed when this module is imported, so before any DHT process forks) keeps
  values nested too deep for hivemind's recursive decoder away from it: one such value would otherwise
  crash the DHT process of every replica.
- `RunRecordValidator` (`validator`), installed in the DHT by every directory (and at DHT start by the
  daemon), makes every replica that runs this code refuse, under ``"<run_id>/peers"``, a plain value (hivemind lets a
  plain value with a later expiration replace the whole dictionary: one store would empty every
  directory), a subkey that is not a short string, a value that is not a byte string of at most
  `MAX_RECORD_BYTES`, and an expiration beyond ``now + ttl * EXPIRATION_CAP_FACTOR``. The same check
  runs on what other DHT nodes return, so a reply that carries such a record is dropped.
- a quota of subkeys per replica (`quota`, installed with the validator by `dht_process.add_validator`:
  ``max_subkeys``, default 512): a new subkey is refused once the run's key holds that many live ones
  (``dht_refused_over_quota``); a stored subkey is always refreshed. So junk subkeys cost every replica
  and every read a bounded amount.
- reads have a deadline (``read_timeout``, default 5 s): a read that does not finish (an undecodable
  value makes hivemind's search wait forever) is counted as ``timeout``. A read that fails, or finds a
  plain value at the key (``not_dictionary``), returns the last good view instead: the peers of the last
  successful read whose records have not expired yet.
- a read parses at most ``max_parse_per_read`` records it has not seen before, the records of peers of
  its last view first; the others (counted once as ``over_budget``) wait for later reads. So thousands of
  junk subkeys cost each read a bounded amount of work, and their verdicts are cached.
- reads are shared and rate-limited (``min_read_interval``, default 3 s): one read from the DHT at a
  time, in the background, and `peers` calls get the last read's view without waiting for the next. A
  read still handles every subkey under the key (hivemind returns the whole dictionary), so with
  thousands of junk subkeys it takes the replicas and the DHT process a second or more; this way the
  cost is paid once per interval, whatever the number of rounds, protocols and callers that ask for
  peers, and no round waits for it. Likewise `announce` after a round in which only the round number
  changed stores the record in the background, at most once a second (a store waits for the
  replicas too).

Withdrawal. hivemind's DHT has no delete, and it refuses to store a value whose expiration time is
already past (``TimedStorage.store`` returns False), so an "already expired" value cannot overwrite a
live record. What it does guarantee is that, per subkey, the value with the later expiration time wins
(on every replica and when a reader merges replies). `withdraw` therefore stores a *tombstone*, an empty
value whose expiration is just after that of the last record this node stored; readers skip empty
values, and the tombstone itself expires when the record would have. A later `announce` uses an
expiration after the tombstone's, so a node can come back. Storing, refreshing and withdrawing the
record is `record_publisher.RecordPublisher`.

Signed records (optional, recommended on open networks). Without signing, any peer could overwrite or
tombstone another peer's subkey. With ``signer`` set, the subkey is ``"<peer id>[owner:<RSA public
key>]"`` and hivemind's `RSASignatureValidator` (installed in the DHT, see `signed_dht_options`) signs
each value on store and makes every DHT node refuse values under that subkey that the key's owner did
not sign. This directory then also requires that the libp2p peer id derived from the owner key is the
record's peer id, so a record is bound to the identity that libp2p authenticates on every stream; in
this mode unsigned records are counted as ``invalid``. This needs the node's libp2p identity to be that
RSA key (`signing.signed_dht_options` arranges it). Only signed records are `authenticated`: the Ed25519
key a record announces for secure aggregation (``secagg_key``) is then bound to the peer id; without signing
it is never used (secure aggregation falls back to the transport's authenticated sender).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable
from functools import partial
from typing import TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.timed_storage import get_dht_time

from p2pnode.discovery import msgpack_guard
from p2pnode.discovery.base import PeerDirectory, PeerInfo
from p2pnode.discovery.dht_process import add_validator, dht_peer_id, dht_refusals, routing_peers, wait_for_dht
from p2pnode.discovery.quota import DEFAULT_MAX_SUBKEYS
from p2pnode.discovery.record_publisher import RecordPublisher
from p2pnode.discovery.record_reader import RecordReader
from p2pnode.discovery.validator import EXPIRATION_CAP_FACTOR, RunRecordValidator, directory_key

logger = logging.getLogger(__name__)

# Before any hivemind DHT process forks from this process (see the module doc).
msgpack_guard.install()

T = TypeVar("T")

#: Default lifetime of a record without refresh, in seconds.
DEFAULT_TTL = 60.0
#: Default longest wait for one DHT store, in seconds.
DEFAULT_REQUEST_TIMEOUT = 10.0
#: Default longest wait for one read of the directory (`DHTDirectory.peers`), in seconds.
DEFAULT_READ_TIMEOUT = 5.0
#: Default number of records not seen before that one read parses; the rest wait for later reads.
DEFAULT_MAX_PARSE_PER_READ = 256
#: Default shortest time between two reads of the directory from the DHT, in seconds: `peers` calls in
#: between get the last read's view. A read costs work in proportion to every subkey under the run's key,
#: junk included, so rounds must not each pay for one.
DEFAULT_MIN_READ_INTERVAL = 3.0
#: Shortest time between two reads while the last view held no peer, in seconds (a joining node should
#: see its first peers quickly; without peers there are no rounds to slow down).
EMPTY_VIEW_READ_INTERVAL = 0.5


class DHTDirectory(PeerDirectory):
    """Peer records of one run in a hivemind DHT.

    :param dht: a running `hivemind.DHT`.
    :param run_id: the run; records live under ``"<run_id>/peers"``.
    :param config_hash: this node's config hash; `peers` keeps only records with the same hash.
    :param ttl: lifetime of a record, in seconds (default 60); refreshed every ``ttl / 3``.
    :param request_timeout: longest wait for one DHT store, in seconds (default 10).
    :param signer: the `RSASignatureValidator` installed in `dht` (see `signed_dht_options`); when set,
        this node's records are signed and unsigned records of others are refused. Default: unsigned.
    :param peer_id: this node's peer id; default: asked from the DHT.
    :param read_timeout: longest wait for one read (`peers`), in seconds (default 5); a read that takes
        longer returns the last good view and counts ``timeout``.
    :param max_parse_per_read: records not seen before that one read parses (default 256).
    :param min_read_interval: shortest time between two reads from the DHT, in seconds (default 3; 0:
        every call reads and every `announce` stores at once). An `announce` in which only the round
        changed (the node announces after every round) is stored in the background, at most once per
        ``min(min_read_interval, record_publisher.ROUND_STORE_INTERVAL)`` (1 s). `peers` calls within it get the
        last read's view (less expired records), and
        calls while a read is in flight get the last view too: one read at a time, however many callers.
    :param validate_records: install `RunRecordValidator` for this run in `dht` on first use (default
        True; idempotent, and harmless when the daemon installed it at DHT start), with its subkey quota.
    :param max_subkeys: most subkeys each DHT node stores under the run's key (default
        `quota.DEFAULT_MAX_SUBKEYS`, 512), see `quota`.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, config_hash: str, *, ttl: float = DEFAULT_TTL,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 signer: RSASignatureValidator | None = None, peer_id: str | None = None,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_parse_per_read: int = DEFAULT_MAX_PARSE_PER_READ, validate_records: bool = True,
                 min_read_interval: float = DEFAULT_MIN_READ_INTERVAL,
                 max_subkeys: int = DEFAULT_MAX_SUBKEYS) -> None:
        super().__init__()
        if min_read_interval < 0:
            raise ValueError(f"min_read_interval must be >= 0, got {min_read_interval}")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if read_timeout <= 0 or max_parse_per_read < 1:
            raise ValueError(f"read_timeout must be positive and max_parse_per_read at least 1, got "
                             f"{read_timeout} and {max_parse_per_read}")
        self.dht = dht
        self.run_id = run_id
        self.key = directory_key(run_id)
        self.read_timeout = read_timeout
        self.min_read_interval = min_read_interval
        #: Reads from the DHT made so far (each `peers` call that was not served from the last view).
        self.reads = 0
        #: When the last read finished (time.monotonic()); -inf before the first.
        self._read_at = -math.inf
        #: The read in flight, shared by every `peers` call that arrives meanwhile.
        self._reading: asyncio.Future[list[PeerInfo]] | None = None
        #: Expirations further ahead than this are refused, in seconds.
        self.max_ahead = ttl * EXPIRATION_CAP_FACTOR
        self._validator_pending = validate_records
        self._validate_records = validate_records
        self.max_subkeys = max_subkeys
        #: The last good view: peer id -> (record, its expiration on the DHT clock).
        self._view: dict[str, tuple[PeerInfo, float]] = {}
        self.config_hash = config_hash
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.signer = signer
        # Signed records are bound to the peer id they name (the owner key must hash to it).
        self.authenticated = signer is not None
        self._peer_id = peer_id
        #: Stores, refreshes and withdraws this node's record.
        self.publisher = RecordPublisher(self._store, self.seal, key=self.key, ttl=ttl,
                                         min_read_interval=min_read_interval)
        #: Judges each record once and remembers the verdict (counts into `rejected`).
        self._reader = RecordReader(rejected=self.rejected, signed=signer is not None,
                                    max_parse_per_read=max_parse_per_read, admitted=self.record_admitted,
                                    key=self.key)

    @property
    def refreshes(self) -> int:
        """Successful stores by the refresher (for monitoring and tests)."""
        return self.publisher.refreshes

    @property
    def max_parse_per_read(self) -> int:
        """Records not seen before that one read parses (`RecordReader.max_parse_per_read`)."""
        return self._reader.max_parse_per_read

    @max_parse_per_read.setter
    def max_parse_per_read(self, value: int) -> None:
        self._reader.max_parse_per_read = value

    # -- identity ---------------------------------------------------------------------------------
    async def peer_id(self) -> str:
        """This node's peer id (base58), asked from the DHT process once without blocking."""
        if self._peer_id is None:
            pid = await self._wait(self.dht.run_coroutine(dht_peer_id, return_future=True), "peer id lookup",
                                   self.request_timeout)
            self._peer_id = str(pid)
        return self._peer_id

    async def routing_peers(self) -> list[str]:
        """The peer ids (base58) of the DHT's routing table, asked from the DHT process (the peers whose
        connections hivemind's routing needs; see `p2pnode.transport.connection_guard`).

        :raises TimeoutError: no answer within ``request_timeout``.
        :raises ConnectionError: the DHT process died.
        """
        return list(await self._wait(self.dht.run_coroutine(routing_peers, return_future=True), "routing table",
                                     self.request_timeout))

    async def subkey(self) -> str:
        """The subkey of this node's record: its peer id, plus the owner key when records are signed."""
        pid = await self.peer_id()
        if self.signer is None:
            return pid
        return pid + self.signer.local_public_key.decode()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the refresher task (idempotent). It re-stores the announced record every ``ttl / 3``."""
        await self._install_validator()
        self.publisher.start()

    async def shutdown(self) -> None:
        """Stop the refresher and withdraw this node's record (waits at most ``request_timeout``)."""
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reading
        await self.publisher.stop()
        info = self.publisher.info  # withdraw() clears it
        if info is not None:
            try:
                await self.withdraw()
            except Exception as e:  # leaving must not fail: the record expires by itself anyway
                logger.warning("could not withdraw the record of %s: %r", info.peer_id[-8:], e)

    # -- publishing -------------------------------------------------------------------------------
    async def announce(self, info: PeerInfo) -> None:
        """Store `info` now and keep refreshing it (with a fresh timestamp) until `withdraw`.

        :raises ValueError: `info.peer_id` is not this node's peer id.
        :raises TimeoutError: the DHT did not confirm the store within ``request_timeout``.
        """
        pid = await self.peer_id()
        if info.peer_id != pid:
            raise ValueError(f"announced peer id {info.peer_id} is not this node's id {pid}")
        await self._install_validator()
        previous = self.publisher.info
        round_only = (previous is not None
                      and dataclasses.replace(previous, round=info.round, timestamp=info.timestamp) == info)
        if await self.publisher.announce(info, round_only=round_only):
            await _yield()

    async def withdraw(self) -> None:
        """Stop refreshing and make the record disappear for readers (tombstone, see the module doc)."""
        await self.publisher.withdraw()

    async def _store(self, value: bytes, expiration: float) -> bool:
        return await self._wait(self.dht.store(self.key, value, expiration_time=expiration,
                                               subkey=await self.subkey(), return_future=True), "store",
                                self.request_timeout)

    # -- reading ----------------------------------------------------------------------------------
    async def peers(self) -> list[PeerInfo]:
        """Live, valid peers of this run with this config hash, excluding this node, sorted by peer id.

        Reads are shared and rate-limited: within ``min_read_interval`` of the last read this returns
        that read's view (less the records that have expired since); after it, a call starts a read in
        the background and returns the last view at once (only the first read is waited for, and every
        read when ``min_read_interval`` is 0; callers that arrive meanwhile wait for that same read). So
        the cost of reading the run's key, which grows with every subkey stored under it (junk included),
        is paid once per interval, not once per caller or round, and no round waits for it.

        Never raises for what the DHT holds or for a slow DHT: a read that fails, takes longer than
        ``read_timeout`` or finds a plain value at the key returns the last good view (peers of the last
        successful read whose records have not expired), and counts why in `rejected`.
        """
        if self._reading is None:
            interval = self.min_read_interval if self._view else min(self.min_read_interval,
                                                                     EMPTY_VIEW_READ_INTERVAL)
            if time.monotonic() - self._read_at < interval:
                await _yield()
                return self._current_view()
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._read_done)
        if self._read_at > -math.inf and self.min_read_interval > 0:
            # Stale while the read refreshes it: a read of a key that holds thousands of junk subkeys takes
            # the DHT process a second or more, and no round should wait for it.
            await _yield()
            return self._current_view()
        # The first read (or every read, with no interval): wait for it. Shielded: a caller that gives up
        # (its own timeout) does not cancel the read that the others wait for.
        return list(await asyncio.shield(self._reading))

    async def refresh(self) -> list[PeerInfo]:
        """Like `peers`, but waits for a read from the DHT: the one in flight, else a new one."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._read_done)
        return list(await asyncio.shield(self._reading))

    def _read_done(self, future: asyncio.Future[list[PeerInfo]]) -> None:
        self._reading = None
        self._read_at = time.monotonic()
        if not future.cancelled():
            future.exception()  # retrieved: the callers that awaited it got it already

    def _current_view(self) -> list[PeerInfo]:
        """The last view, less the records that have expired since it was read."""
        now = get_dht_time()
        return [self._view[k][0] for k in sorted(self._view) if self._view[k][1] > now]

    async def _read(self) -> list[PeerInfo]:
        """One read of the run's key from the DHT (see `peers`)."""
        self.reads += 1
        own = await self.peer_id()
        await self._install_validator()
        try:
            found = await self._wait(self.dht.get(self.key, latest=True, return_future=True), "get",
                                     self.read_timeout)
        except TimeoutError as e:
            self.rejected["timeout"] += 1
            logger.warning("%s; using the last good view", e)
            return await self._fallback()
        except Exception as e:
            self.rejected["read_failed"] += 1
            logger.warning("DHT get under %s failed: %r; using the last good view", self.key, e)
            return await self._fallback()
        if found is None:  # nobody has (or had, unexpired) a record here
            self._view = {}
            await self._poll_dht_refusals()
            return []
        if not isinstance(found.value, dict):
            # A plain value won over the dictionary on some replica that does not run our validator.
            self._reader.plain_value(found.value)
            return await self._fallback()
        self._view = self._reader.read(found.value, own, self._view, self.config_hash, self.max_ahead)
        await self._poll_dht_refusals()
        return [self._view[k][0] for k in sorted(self._view)]

    @property
    def last_peers(self) -> list[PeerInfo]:
        """The peers of the last good view, sorted by peer id (the supervisor's hints for a restart)."""
        return [self._view[k][0] for k in sorted(self._view)]

    async def _fallback(self) -> list[PeerInfo]:
        """The last good view, less the records that have expired since."""
        now = get_dht_time()
        self._view = {pid: entry for pid, entry in self._view.items() if entry[1] > now}
        await self._poll_dht_refusals()
        return [self._view[k][0] for k in sorted(self._view)]

    async def _install_validator(self) -> None:
        """Install `RunRecordValidator` for this run in the DHT process, once (retried after a failure)."""
        if not self._validator_pending:
            return
        validator = RunRecordValidator(self.run_id, self.ttl, self.max_subkeys)
        try:
            await self._wait(self.dht.run_coroutine(partial(add_validator, validator=validator),
                                                    return_future=True), "validator install", self.request_timeout)
            self._validator_pending = False
        except Exception as e:
            logger.warning("could not install the record validator of %s: %r", self.key, e)

    def rebind(self, dht: hivemind.DHT) -> None:
        """Use `dht`, a restarted DHT process of the same identity; the validator and quota go in again."""
        self.dht = dht
        self._validator_pending = self._validate_records

    async def _poll_dht_refusals(self) -> None:
        """Copy the refusal counts of the DHT process into `rejected` (``dht_*``; best effort)."""
        try:
            counts = await self._wait(self.dht.run_coroutine(dht_refusals, return_future=True), "refusal count",
                                      min(self.read_timeout, 1.0))
        except Exception as e:
            logger.debug("could not read the refusal counts of the DHT process: %r", e)
            return
        for reason, count in counts.items():
            if count:
                self.rejected[reason] = count

    async def _wait(self, future: Awaitable[T], what: str, timeout: float) -> T:
        """Await a request to the DHT process for at most `timeout` seconds (`wait_for_dht`).

        :raises TimeoutError: no answer within `timeout`.
        :raises ConnectionError: the DHT process died.
        """
        return await wait_for_dht(self.dht, future, f"{what} under {self.key}", timeout)


async def _yield() -> None:
    """Let the event loop run other tasks once. A directory call answered from memory must still suspend
    its caller: a round loop whose partner choice and announcement both finish without suspending (no
    partner to call) would otherwise never give the loop back, and starve every other task of the node
    (serving peers, the control API, the refresher)."""
    await asyncio.sleep(0)
