"""`RecordReader`: the records one read of a run's directory key returned, judged into usable peers.

Each record is checked before use, cheap checks first (`RecordReader.precheck`: types, sizes, the
expiration, the subkey's shape), then parsed (`RecordReader.parse`: the protobuf `PeerRecord`, its peer
id against its subkey and signing key, its limits, its admission MAC). What is skipped is counted in the
directory's ``rejected`` by reason (see `p2pnode.discovery.dht`). Each record (subkey and value, not its
expiration: junk stored again with a new expiration is the same junk) is counted once, however many
reads see it, and its verdict is remembered (`VERDICT_CACHE_SIZE` records, least recently seen forgotten
first), so that a read re-parses only records it has not seen. A read parses at most
``max_parse_per_read`` records it has not seen before, those of peers of the last view first; the others
(counted once as ``over_budget``) wait for later reads.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import math
import re
from collections.abc import Callable, Container, Mapping

from google.protobuf.message import DecodeError
from hivemind.utils.timed_storage import get_dht_time

from p2pnode.discovery.base import OTHER_CONFIG, SECAGG_KEY_BYTES, PeerInfo
from p2pnode.discovery.signing import peer_id_of_public_key
from p2pnode.discovery.validator import MAX_RECORD_BYTES, MAX_SUBKEY_BYTES
from p2pnode.proto import peer_pb2
from p2pnode.transport.admission import NOT_ADMITTED

logger = logging.getLogger(__name__)

#: Record verdicts remembered by a directory (so that a record is parsed and counted once).
VERDICT_CACHE_SIZE = 8192
#: Most multiaddrs / capabilities accepted in one record.
MAX_RECORD_ITEMS = 64
#: Value stored by `DHTDirectory.withdraw`; readers skip it.
TOMBSTONE = b""
#: Most owner keys whose peer ids are remembered (bounds the cache against floods of junk keys).
_OWNER_ID_CACHE_SIZE = 4096
#: What separates the peer id from the owner key in the subkey of a signed record.
OWNER_PREFIX = "[owner:"
#: A base58 libp2p peer id (the syntax only, checked before anything costly).
_PEER_ID_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{16,128}")
#: Verdict of a record that is skipped without being counted (a tombstone, this node's own record).
SKIP = "skip"

#: A verdict cache key (see `verdict_key`).
VerdictKey = tuple[object, object, bool]
#: A view: peer id -> (its record, the record's expiration on the DHT clock).
View = dict[str, tuple[PeerInfo, float]]


def verdict_key(subkey: object, value: object, far: bool = False) -> VerdictKey:
    """What identifies one record for the verdict cache: its subkey and a digest of its value.

    Not its expiration: the same junk stored again with a fresh expiration is the same record, counted
    once. Whether the expiration lies too far ahead is checked on every read (a float comparison) and is
    part of the key (`far`), so a value refused for its expiration once is judged again when it comes
    back with an acceptable one.
    """
    if isinstance(subkey, str) and len(subkey) <= MAX_SUBKEY_BYTES:
        sk: object = subkey
    else:
        try:
            sk = (type(subkey).__name__, hash(subkey))
        except TypeError:
            sk = (type(subkey).__name__,)
    digest = hashlib.blake2b(value, digest_size=16).digest() if isinstance(value, bytes) else type(value).__name__
    return sk, digest, far


def too_far(expiration: object, horizon: float) -> bool:
    """Whether `expiration` is no finite time at or before `horizon` (DHT clock)."""
    return not isinstance(expiration, float | int) or not math.isfinite(expiration) or expiration > horizon


class RecordReader:
    """Judges the records under one run's directory key, each once (see the module doc).

    :param rejected: the directory's counter of skipped records, by reason (counted into, shared).
    :param signed: whether records must be signed (subkey ``"<peer id>[owner:<RSA key>]"``); then the
        owner key must hash to the peer id. Unsigned directories refuse signed records.
    :param max_parse_per_read: records not seen before that one read parses (at least 1).
    :param admitted: whether a parsed record carries a valid admission MAC (counts nothing).
    :param key: the DHT key, for log messages.
    """

    def __init__(self, *, rejected: collections.Counter[str], signed: bool, max_parse_per_read: int,
                 admitted: Callable[[PeerInfo], bool], key: str) -> None:
        self.rejected = rejected
        self.signed = signed
        self.max_parse_per_read = max_parse_per_read
        self._admitted = admitted
        self.key = key
        #: (subkey, value digest, expiration too far) -> PeerInfo, a rejection reason, or SKIP (LRU-bounded).
        self._verdicts: collections.OrderedDict[VerdictKey, PeerInfo | str] = collections.OrderedDict()
        #: Records left for later reads (counted once as over_budget).
        self._deferred: collections.OrderedDict[VerdictKey, None] = collections.OrderedDict()
        self._owner_ids: dict[str, str | None] = {}

    def plain_value(self, value: object) -> None:
        """Count a plain value found where the dictionary of records belongs (once per value)."""
        key = verdict_key(None, value)
        if key not in self._verdicts:
            self.decide(key, "not_dictionary", "")

    def read(self, records: Mapping[object, object], own: str, known: Container[str], config_hash: str,
             max_ahead: float) -> View:
        """The usable records among one read's `records`, as a view; updates the verdict cache and counters.

        :param own: this node's peer id (its own record is skipped).
        :param known: peer ids of the last view (their new records are parsed first).
        :param config_hash: records of another config hash are counted as `OTHER_CONFIG`.
        :param max_ahead: records expiring further ahead than this, in seconds, are ``expired_too_far``.
        """
        horizon = get_dht_time() + max_ahead
        view: View = {}
        todo: list[tuple[int, float, str, bytes, VerdictKey]] = []
        for subkey, item in records.items():
            value = getattr(item, "value", None)
            expiration = getattr(item, "expiration_time", None)
            key = verdict_key(subkey, value, too_far(expiration, horizon))
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
            else:
                verdict = self.precheck(subkey, value, expiration, horizon)
                if verdict is None:  # needs parsing: queued, known peers first, then by expiration
                    assert isinstance(subkey, str) and isinstance(value, bytes)
                    peer_part = subkey.partition(OWNER_PREFIX)[0]
                    todo.append((0 if peer_part in known else 1, -float(expiration), subkey,  # type: ignore[arg-type]
                                 value, key))
                    continue
                verdict = self.decide(key, verdict, config_hash)
            _keep(view, verdict, expiration)
        todo.sort(key=lambda t: t[:3])
        for i, (_, neg_expiration, subkey, value, key) in enumerate(todo):
            if i >= self.max_parse_per_read:
                if key not in self._deferred:
                    self._deferred[key] = None
                    self.rejected["over_budget"] += 1
                    if len(self._deferred) > VERDICT_CACHE_SIZE:
                        self._deferred.popitem(last=False)
                continue
            verdict = self.decide(key, self.parse(subkey, value, own), config_hash)
            _keep(view, verdict, -neg_expiration)
        if len(todo) > self.max_parse_per_read:
            logger.info("read under %s left %d new records for later reads", self.key,
                        len(todo) - self.max_parse_per_read)
        return view

    def decide(self, key: VerdictKey, verdict: PeerInfo | str, config_hash: str) -> PeerInfo | str:
        """Remember `verdict` for the record `key`; count it if it is a rejection (so: once per record)."""
        if isinstance(verdict, PeerInfo) and verdict.config_hash != config_hash:
            verdict = OTHER_CONFIG
        if isinstance(verdict, str) and verdict != SKIP:
            self.rejected[verdict] += 1
        self._verdicts[key] = verdict
        self._deferred.pop(key, None)
        if len(self._verdicts) > VERDICT_CACHE_SIZE:
            self._verdicts.popitem(last=False)
        return verdict

    def precheck(self, subkey: object, value: object, expiration: object, horizon: float) -> str | None:
        """The cheap checks of one record: its rejection reason, SKIP, or None when it must be parsed."""
        if not isinstance(subkey, str) or not isinstance(value, bytes):
            return "undecodable"
        if len(subkey) > MAX_SUBKEY_BYTES or len(value) > MAX_RECORD_BYTES:
            return "oversized"
        if value == TOMBSTONE:
            return SKIP
        if too_far(expiration, horizon):
            return "expired_too_far"
        peer_part, sep, owner = subkey.partition(OWNER_PREFIX)
        if self.signed and (not sep or not owner.endswith("]")):
            return "bad_record"  # unsigned, where signatures are required
        if not self.signed and sep:
            return "bad_record"  # a signed record in an unsigned directory: its signature was never checked
        if not _PEER_ID_RE.fullmatch(peer_part):
            return "bad_record"
        return None

    def parse(self, subkey: str, value: bytes, own: str) -> PeerInfo | str:
        """Parse and validate one prechecked record: a `PeerInfo`, SKIP (own record) or the reason."""
        peer_part, _, owner = subkey.partition(OWNER_PREFIX)
        if self.signed:
            owner_id = self._owner_id(owner[:-1])
            if owner_id is None:
                return "bad_record"
            if owner_id != peer_part:
                logger.debug("record %s is not signed by the owner of its peer id", peer_part[-8:])
                return "mismatched"
        rec = peer_pb2.PeerRecord()
        try:
            rec.ParseFromString(value)
        except (DecodeError, ValueError):
            logger.debug("record %s does not parse", peer_part[-8:])
            return "undecodable"
        if rec.peer_id != peer_part:
            logger.debug("record under subkey %s claims peer id %s", peer_part[-8:], rec.peer_id[-8:])
            return "mismatched"
        if len(rec.maddrs) > MAX_RECORD_ITEMS or len(rec.capabilities) > MAX_RECORD_ITEMS:
            return "oversized"
        if len(rec.secagg_key) not in (0, SECAGG_KEY_BYTES):
            logger.debug("record %s has a secagg key of %d bytes", peer_part[-8:], len(rec.secagg_key))
            return "bad_record"
        if rec.peer_id == own:
            return SKIP
        info = PeerInfo.from_proto(rec)
        if not self._admitted(info):
            return NOT_ADMITTED
        return info

    def _owner_id(self, ssh_key: str) -> str | None:
        if ssh_key not in self._owner_ids:
            try:
                self._owner_ids[ssh_key] = peer_id_of_public_key(ssh_key.encode())
            except (ValueError, TypeError, base64.binascii.Error):  # type: ignore[attr-defined]
                self._owner_ids[ssh_key] = None
            if len(self._owner_ids) > _OWNER_ID_CACHE_SIZE:
                self._owner_ids.pop(next(iter(self._owner_ids)))
        return self._owner_ids[ssh_key]


def _keep(view: View, verdict: PeerInfo | str, expiration: object) -> None:
    """Put an accepted record into `view`, unless the view holds a newer one of the same peer."""
    if not isinstance(verdict, PeerInfo):
        return
    old = view.get(verdict.peer_id)
    if old is None or verdict.timestamp > old[0].timestamp:
        view[verdict.peer_id] = (verdict, float(expiration))  # type: ignore[arg-type]
