"""Admission control of a run: which peers a node serves, and whose directory records it uses.

Three modes (`MODES`):

- ``open``: the run's models are public; anyone who knows the run id can fetch and push models.
- ``secret``: every peer holds a key derived from the run's secret (`derive_key`: HKDF-SHA256, salted by
  the run id, so one secret gives unrelated keys in different runs). A sender puts a *proof* in
  ``Envelope.admission`` of every request and response: a version byte and
  ``HMAC-SHA256(key, role | sender | receiver | method | Envelope.nonce [| request nonce])``
  (`Admission.proof`, `Admission.response_proof`). The receiver checks it (constant-time) before
  anything else. The sender's peer id is the one libp2p authenticates on the stream, and the proof
  names both ends and the envelope's own nonce, so a proof seen by one peer cannot be used by another
  peer, nor against another receiver, nor on another message (a new message needs a new nonce, which
  the transports' replay guard insists on; the old nonce is refused as ``replayed``). A response's proof
  also names the nonce of the request it answers, so a captured response cannot answer another
  request. The roles (``req``, ``rsp``) keep a request from passing as a response. The secret never
  travels.
- ``allowlist``: only the listed peer ids are served and used (may be combined with a secret).

Directory records carry ``PeerRecord.admission_mac`` = ``HMAC-SHA256(key, "rec" | record fields)``
(`Admission.seal`); readers drop records without a valid one, so outsiders' (sybil) records never enter
partner choice.

This module is pure: no I/O, no clock; the callers count and log refusals.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pnode.config import ADMISSION_MODES as MODES

#: Length of a run key, in bytes.
KEY_BYTES = 32
#: Shortest run secret accepted, in bytes: a record's MAC is public (it sits in the DHT), so a short
#: secret could be guessed offline.
MIN_SECRET_BYTES = 16
#: Version byte of a proof (2: bound to the envelope's nonce; 1 carried a nonce of its own).
PROOF_VERSION = 2
#: MAC length, and proof length, in bytes.
MAC_BYTES = 32
PROOF_BYTES = 1 + MAC_BYTES
#: Reason code under which refusals are counted (`Transport.stats.rejected`, `PeerDirectory.not_admitted`).
NOT_ADMITTED = "not_admitted"

_SALT_PREFIX = b"p2pnode admission salt v1/"
_INFO = b"p2pnode admission key v1"


def derive_key(secret: bytes, run_id: str) -> bytes:
    """The run key of `secret` in `run_id`: HKDF-SHA256 (32 bytes), salted by the run id.

    Raises:
        ValueError: `secret` is shorter than `MIN_SECRET_BYTES`.
    """
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the run secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_SALT_PREFIX + run_id.encode(),
                info=_INFO).derive(secret)


def _fields(*items: str | bytes) -> bytes:
    """Length-prefixed concatenation: no two different field lists give the same bytes."""
    out = bytearray()
    for item in items:
        raw = item.encode() if isinstance(item, str) else item
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


@dataclass(frozen=True)
class Admission:
    """The admission policy of one node.

    Args:
        key: the run key (`derive_key`), or None: no proofs are made or asked for.
        allow: peer ids this node serves and uses, or None: any peer (with a valid proof, if `key`).
    """

    key: bytes | None = None
    allow: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.key is not None and len(self.key) != KEY_BYTES:
            raise ValueError(f"a run key has {KEY_BYTES} bytes, got {len(self.key)}")

    @classmethod
    def create(cls, key: bytes | None = None, allow: Iterable[str] | None = None) -> Admission | None:
        """The policy for `key` and `allow`, or None when neither is set (an open run)."""
        allowed = frozenset(allow) if allow else None
        return None if key is None and allowed is None else cls(key, allowed)

    @property
    def mode(self) -> str:
        """``secret`` when a key is set, else ``allowlist``."""
        return "secret" if self.key is not None else "allowlist"

    def _mac(self, data: bytes) -> bytes:
        assert self.key is not None
        return hmac.new(self.key, data, hashlib.sha256).digest()

    # -- requests and responses -----------------------------------------------------------------------
    def proof(self, sender: str, receiver: str, method: str, nonce: bytes) -> bytes:
        """What `sender` puts in ``Envelope.admission`` of a request to `receiver` whose envelope carries
        `nonce` (empty without a key)."""
        return self._proof(b"req", sender, receiver, method, nonce)

    def response_proof(self, sender: str, receiver: str, method: str, nonce: bytes, request_nonce: bytes) -> bytes:
        """The proof of a response from `sender` to `receiver` with envelope nonce `nonce`, answering the
        request whose nonce was `request_nonce` (empty without a key)."""
        return self._proof(b"rsp", sender, receiver, method, nonce, request_nonce)

    def admits(self, sender: str, receiver: str, method: str, nonce: bytes, proof: bytes) -> bool:
        """Whether `receiver` may serve a request of `sender` for `method` with envelope nonce `nonce`.

        True when `sender` is on the allowlist (if any) and `proof` is a valid request proof of `sender`
        to `receiver` for `method` and `nonce` (if a key is set). The MAC is compared in constant time.
        """
        return self._check(proof, sender, b"req", sender, receiver, method, nonce)

    def admits_response(self, sender: str, receiver: str, method: str, nonce: bytes, request_nonce: bytes,
                        proof: bytes) -> bool:
        """Whether `receiver` may use a response of `sender` (see `response_proof`)."""
        return self._check(proof, sender, b"rsp", sender, receiver, method, nonce, request_nonce)

    def _proof(self, *fields: str | bytes) -> bytes:
        if self.key is None:
            return b""
        return bytes([PROOF_VERSION]) + self._mac(_fields(*fields))

    def _check(self, proof: bytes, sender: str, *fields: str | bytes) -> bool:
        if self.allow is not None and sender not in self.allow:
            return False
        if self.key is None:
            return True
        if len(proof) != PROOF_BYTES or proof[0] != PROOF_VERSION:
            return False
        return hmac.compare_digest(proof[1:], self._mac(_fields(*fields)))

    # -- directory records ----------------------------------------------------------------------------
    def record_mac(self, record_fields: bytes) -> bytes:
        """The MAC of a directory record's canonical fields (empty without a key)."""
        return b"" if self.key is None else self._mac(_fields(b"rec", record_fields))

    def admits_record(self, peer_id: str, record_fields: bytes, mac: bytes) -> bool:
        """Whether a record of `peer_id` with these canonical fields and `mac` may be used."""
        if self.allow is not None and peer_id not in self.allow:
            return False
        if self.key is None:
            return True
        return hmac.compare_digest(mac, self.record_mac(record_fields))


def canonical_fields(*items: str | bytes) -> bytes:
    """Canonical bytes of a list of fields (length-prefixed), for `Admission.record_mac`."""
    return _fields(*items)


__all__ = ["KEY_BYTES", "MIN_SECRET_BYTES", "MODES", "NOT_ADMITTED", "PROOF_BYTES", "Admission",
           "canonical_fields", "derive_key"]
