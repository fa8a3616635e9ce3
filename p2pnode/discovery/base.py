"""The discovery seam: where a node announces itself and finds the other peers of its run."""

from __future__ import annotations

import collections
import dataclasses
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from p2pnode.proto import peer_pb2
from p2pnode.transport.admission import NOT_ADMITTED, Admission, canonical_fields

#: Length of `PeerInfo.secagg_key` when set: a raw Ed25519 public key, in bytes.
SECAGG_KEY_BYTES = 32

#: Reason (in `PeerDirectory.rejected`) of a record of another config hash; `PeerDirectory.mismatched`.
OTHER_CONFIG = "other_config"
#: Reasons (in `PeerDirectory.rejected`) of records that fail the schema; their sum is `PeerDirectory.invalid`.
#: ``not_dictionary``: a plain value where the run's dictionary of records belongs; ``undecodable``: a
#: subkey or value of the wrong type, or bytes that do not parse as a record; ``oversized``: a record
#: over the size or item limits; ``bad_record``: it parses but breaks the schema (secagg key length,
#: empty or malformed peer id, unsigned record where signatures are required, ...); ``mismatched``: the
#: record names another peer than its subkey (or than its signing key); ``expired_too_far``: its
#: expiration lies further ahead than any honest peer writes. (Not in this set: ``over_budget``, a record
#: that a read left for later reads because it had parsed its share of new records.)
INVALID_REASONS = frozenset({"not_dictionary", "undecodable", "oversized", "bad_record", "mismatched",
                             "expired_too_far"})


@dataclass(frozen=True)
class PeerInfo:
    """What a peer announces about itself.

    :param peer_id: the peer's id (base58 libp2p id for real peers).
    :param maddrs: multiaddrs at which it can be reached (empty in the simulator).
    :param round: rounds it has completed.
    :param task: the task name it trains.
    :param config_hash: hash of its model-relevant config; peers with another hash are not used.
    :param capabilities: feature names it supports (for example ``"gossip"``).
    :param timestamp: when the record was written, seconds since the epoch (virtual seconds in the simulator).
    :param secagg_key: raw Ed25519 public key (32 bytes) that signs the peer's secure-aggregation keys, or
        empty (default) when it has none. Trust it only from an `PeerDirectory.authenticated` directory.
    :param admission_mac: in a run with a secret, the MAC of the fields above under the run key
        (`PeerDirectory.seal`); empty (default) otherwise.
    """

    peer_id: str
    maddrs: tuple[str, ...] = ()
    round: int = 0
    task: str = ""
    config_hash: str = ""
    capabilities: tuple[str, ...] = field(default_factory=tuple)
    timestamp: float = 0.0
    secagg_key: bytes = b""
    admission_mac: bytes = b""

    def record_fields(self) -> bytes:
        """Canonical bytes of every field but `admission_mac` (what that MAC covers)."""
        return canonical_fields(self.peer_id, *self.maddrs, b"|", struct.pack("<Q", self.round), self.task,
                                self.config_hash, *self.capabilities, b"|", struct.pack("<d", self.timestamp),
                                self.secagg_key)

    def to_proto(self) -> peer_pb2.PeerRecord:
        return peer_pb2.PeerRecord(peer_id=self.peer_id, maddrs=list(self.maddrs), round=self.round,
                                   task=self.task, config_hash=self.config_hash,
                                   capabilities=list(self.capabilities), timestamp=self.timestamp,
                                   secagg_key=self.secagg_key, admission_mac=self.admission_mac)

    @classmethod
    def from_proto(cls, rec: peer_pb2.PeerRecord) -> PeerInfo:
        return cls(peer_id=rec.peer_id, maddrs=tuple(rec.maddrs), round=rec.round, task=rec.task,
                   config_hash=rec.config_hash, capabilities=tuple(rec.capabilities), timestamp=rec.timestamp,
                   secagg_key=bytes(rec.secagg_key), admission_mac=bytes(rec.admission_mac))


class PeerDirectory(ABC):
    """Run-scoped membership: announce yourself, list the others.

    A directory is bound to one run id and one config hash: `peers()` returns only live records of the
    same run and config hash, never this node itself, sorted by peer id, and counts what it dropped in
    `rejected`, by reason: `OTHER_CONFIG` (summed in `mismatched`), the `INVALID_REASONS` (summed in
    `invalid`), `NOT_ADMITTED` (with `admission` set: a record without a valid admission MAC, or of a
    peer off the allowlist), ``over_budget``, and reasons of whole reads (``timeout``, ``read_failed``; the DHT
    directory adds the refusals counted by its DHT process, ``dht_*``).

    `authenticated` says whether a record can only have been written by the peer it names (signed DHT
    records; the simulator's registry, where each node writes only its own record). Only then is what a
    record claims about its peer, such as ``secagg_key``, bound to that peer id.
    """

    #: Whether every record returned by `peers` was written by the peer it names (see the class doc).
    authenticated: bool = False

    def __init__(self) -> None:
        #: Dropped records and failed reads, by reason (see the class doc); cumulative.
        self.rejected: collections.Counter[str] = collections.Counter()
        #: The run's admission policy: records are sealed with it and checked against it (None: open run).
        self.admission: Admission | None = None

    @property
    def mismatched(self) -> int:
        """Records of another config hash skipped (``rejected[OTHER_CONFIG]``)."""
        return self.rejected[OTHER_CONFIG]

    @property
    def invalid(self) -> int:
        """Records failing the schema skipped (the sum of `rejected` over `INVALID_REASONS`)."""
        return sum(n for reason, n in self.rejected.items() if reason in INVALID_REASONS)

    def seal(self, info: PeerInfo) -> PeerInfo:
        """`info` with its admission MAC set (unchanged in an open run)."""
        if self.admission is None:
            return info
        return dataclasses.replace(info, admission_mac=self.admission.record_mac(info.record_fields()))

    def admitted(self, info: PeerInfo) -> bool:
        """Whether a record read from the directory may be used; counts a refusal in `not_admitted`."""
        if self.record_admitted(info):
            return True
        self.rejected[NOT_ADMITTED] += 1
        return False

    def record_admitted(self, info: PeerInfo) -> bool:
        """Whether `info` carries a valid admission MAC (always, in an open run); counts nothing."""
        return self.admission is None or self.admission.admits_record(info.peer_id, info.record_fields(),
                                                                      info.admission_mac)

    @property
    def not_admitted(self) -> int:
        """Records dropped for want of a valid admission MAC (``rejected["not_admitted"]``)."""
        return self.rejected[NOT_ADMITTED]

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (for example, periodic refresh of this node's record)."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Withdraw this node's record and stop background work."""

    @abstractmethod
    async def announce(self, info: PeerInfo) -> None:
        """Publish or refresh this node's record; it expires unless refreshed."""

    @abstractmethod
    async def withdraw(self) -> None:
        """Remove this node's record (graceful leave)."""

    @abstractmethod
    async def peers(self) -> list[PeerInfo]:
        """Live peers of this run with the same config hash, excluding this node, sorted by peer id."""

    async def refresh(self) -> list[PeerInfo]:
        """`peers` as the directory holds them now: a directory that serves `peers` from a recent read
        (`DHTDirectory`) reads again first. Default: `peers`."""
        return await self.peers()
