"""The discovery seam: where a node announces itself and finds the other peers of its run."""

from __future__ import annotations

import dataclasses
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from p2pnode.proto import peer_pb2
from p2pnode.transport.admission import Admission, canonical_fields

#: Length of `PeerInfo.secagg_key` when set: a raw Ed25519 public key, in bytes.
SECAGG_KEY_BYTES = 32


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
    same run and config hash, never this node itself, sorted by peer id, and counts the records it
    dropped in `mismatched` (other config), `invalid` (failed the schema) and `not_admitted` (with
    `admission` set: a record without a valid admission MAC, or of a peer off the allowlist).

    `authenticated` says whether a record can only have been written by the peer it names (signed DHT
    records; the simulator's registry, where each node writes only its own record). Only then is what a
    record claims about its peer, such as ``secagg_key``, bound to that peer id.
    """

    #: Whether every record returned by `peers` was written by the peer it names (see the class doc).
    authenticated: bool = False

    def __init__(self) -> None:
        self.mismatched = 0
        self.invalid = 0
        self.not_admitted = 0
        #: The run's admission policy: records are sealed with it and checked against it (None: open run).
        self.admission: Admission | None = None

    def seal(self, info: PeerInfo) -> PeerInfo:
        """`info` with its admission MAC set (unchanged in an open run)."""
        if self.admission is None:
            return info
        return dataclasses.replace(info, admission_mac=self.admission.record_mac(info.record_fields()))

    def admitted(self, info: PeerInfo) -> bool:
        """Whether a record read from the directory may be used; counts a refusal in `not_admitted`."""
        if self.admission is None or self.admission.admits_record(info.peer_id, info.record_fields(),
                                                                  info.admission_mac):
            return True
        self.not_admitted += 1
        return False

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
