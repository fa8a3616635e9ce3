"""`RunRecordValidator`: what every DHT replica that runs this code accepts under a run's directory key.

Anyone who reaches a DHT node can store under ``"<run_id>/peers"`` (`directory_key`). This validator,
installed in the DHT by every `DHTDirectory` (and at DHT start by the daemon), makes a replica refuse
there a plain value (hivemind lets a plain value with a later expiration replace the whole dictionary:
one store would empty every directory), a subkey that is not a short string, a value that is not a byte
string of at most `MAX_RECORD_BYTES`, and an expiration beyond ``now + ttl * EXPIRATION_CAP_FACTOR``.
The same check runs on what other DHT nodes return, so a reply that carries such a record is dropped.
The checks read the msgpack encoding hivemind hands to validators directly (`_msgpack_str_ok`,
`_msgpack_bin_length`): nothing is decoded. Refusals are counted, by reason, in `validator_refusals`.
"""

from __future__ import annotations

import collections
import logging
import math
import os

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.timed_storage import get_dht_time

from p2pnode.discovery.quota import DEFAULT_MAX_SUBKEYS

logger = logging.getLogger(__name__)

#: Records expiring more than ``ttl`` times this after now are refused (honest ones expire after ``ttl``).
EXPIRATION_CAP_FACTOR = 2.0
#: Longest subkey accepted, in bytes (a peer id plus an OpenSSH RSA public key is about 450).
MAX_SUBKEY_BYTES = 2048
#: Largest record accepted, in bytes (a record holds a few multiaddrs and names).
MAX_RECORD_BYTES = 16 * 1024
#: hivemind's subkey of a plain (non-dictionary) value: msgpack ``None``.
_REGULAR_VALUE = b"\xc0"

#: Records refused by `RunRecordValidator` in this process, by reason (read from the DHT process by
#: `DHTDirectory`, see `p2pnode.discovery.dht_process.dht_refusals`).
validator_refusals: collections.Counter[str] = collections.Counter()
os.register_at_fork(after_in_child=validator_refusals.clear)  # a DHT process counts its own


def directory_key(run_id: str) -> str:
    """The DHT key under which the records of `run_id` live."""
    return f"{run_id}/peers"


def _msgpack_str_ok(data: bytes, max_len: int) -> bool:
    """Whether `data` is exactly one msgpack str of at most `max_len` bytes of UTF-8."""
    if not data:
        return False
    b = data[0]
    if 0xA0 <= b <= 0xBF:
        header, length = 1, b & 0x1F
    elif b in (0xD9, 0xDA, 0xDB):
        header = {0xD9: 2, 0xDA: 3, 0xDB: 5}[b]
        length = int.from_bytes(data[1:header], "big")
    else:
        return False
    if len(data) != header + length or length > max_len:
        return False
    try:
        data[header:].decode()
    except UnicodeDecodeError:
        return False
    return True


def _msgpack_bin_length(data: bytes) -> int | None:
    """The length of the byte string that `data` encodes as exactly one msgpack bin, or None."""
    if not data or data[0] not in (0xC4, 0xC5, 0xC6):
        return None
    header = {0xC4: 2, 0xC5: 3, 0xC6: 5}[data[0]]
    length = int.from_bytes(data[1:header], "big")
    return length if len(data) == header + length else None


class RunRecordValidator(RecordValidatorBase):
    """hivemind record validator for the directory key of one or more runs (see the module doc).

    Under ``"<run_id>/peers"`` it accepts only dictionary entries whose subkey is a msgpack string of at
    most `MAX_SUBKEY_BYTES`, whose value is a byte string of at most `MAX_RECORD_BYTES` and whose
    expiration is finite and at most ``ttl * EXPIRATION_CAP_FACTOR`` seconds after now; other keys pass.
    hivemind runs it on every store a node receives or makes, and on every record another node returns;
    it sees values after the signature validator has checked and stripped them (lower `priority`).
    Validators of other runs merge into one (`merge_with`). Refusals are counted in `validator_refusals`.

    It also carries the run's quota of subkeys per replica (`quotas`), which `dht_process.add_validator`
    installs in the DHT node's storage (`quota.install_quota`: a validator cannot apply it, see there).

    :param run_id: the run.
    :param ttl: the lifetime of the run's records, in seconds.
    :param max_subkeys: most subkeys a DHT node stores under the run's key (default
        `quota.DEFAULT_MAX_SUBKEYS`, 512); new subkeys beyond it are refused (``over_quota``).
    """

    def __init__(self, run_id: str, ttl: float, max_subkeys: int = DEFAULT_MAX_SUBKEYS) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if max_subkeys < 1:
            raise ValueError(f"max_subkeys must be at least 1, got {max_subkeys}")
        key = DHTID.generate(source=directory_key(run_id)).to_bytes()
        #: DHT key id (bytes) -> how far ahead an expiration may lie, in seconds.
        self.limits: dict[bytes, float] = {key: ttl * EXPIRATION_CAP_FACTOR}
        #: DHT key id (bytes) -> most subkeys stored under it on one DHT node.
        self.quotas: dict[bytes, int] = {key: max_subkeys}

    @staticmethod
    def problem(record: DHTRecord, max_ahead: float) -> str | None:
        """Why `record` is refused (a reason of `PeerDirectory.rejected`), or None."""
        if record.subkey == _REGULAR_VALUE:
            return "not_dictionary"
        if not _msgpack_str_ok(record.subkey, MAX_SUBKEY_BYTES):
            return "undecodable"
        length = _msgpack_bin_length(record.value)
        if length is None:
            return "undecodable"
        if length > MAX_RECORD_BYTES:
            return "oversized"
        if not math.isfinite(record.expiration_time) or record.expiration_time > get_dht_time() + max_ahead:
            return "expired_too_far"
        return None

    def validate(self, record: DHTRecord) -> bool:
        max_ahead = self.limits.get(record.key)
        if max_ahead is None:
            return True  # not a directory key
        reason = self.problem(record, max_ahead)
        if reason is None:
            return True
        validator_refusals[reason] += 1
        logger.debug("refused a directory record (%s)", reason)
        return False

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): validate the value it has checked and stripped

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, RunRecordValidator):
            return False
        for key, ahead in other.limits.items():
            self.limits[key] = max(ahead, self.limits.get(key, 0.0))
        for key, most in other.quotas.items():
            self.quotas[key] = max(most, self.quotas.get(key, 0))
        return True
