"""`DHTDirectory`: run-scoped peer records in hivemind's Kademlia DHT.

Layout: one DHT key per run, ``"<run_id>/peers"``; under it one subkey per peer whose value is the
serialized `PeerRecord` (protobuf bytes) and whose expiration is ``now + ttl``. A background task
re-stores the record every ``ttl / 3`` so that it lives while the node does and vanishes at most
``ttl`` seconds after a crash.

Reading (`peers`) checks every record before use: bytes that do not parse as a `PeerRecord`, exceed
`MAX_RECORD_BYTES`, or whose ``peer_id`` differs from their subkey are counted in ``invalid``; records of
another config hash are counted in ``mismatched``; both are skipped.

Withdrawal. hivemind's DHT has no delete, and it refuses to store a value whose expiration time is
already past (``TimedStorage.store`` returns False), so an "already expired" value cannot overwrite a
live record. What it does guarantee is that, per subkey, the value with the later expiration time wins
(on every replica and when a reader merges replies). `withdraw` therefore stores a *tombstone*, an empty
value whose expiration is just after that of the last record this node stored; readers skip empty
values, and the tombstone itself expires when the record would have. A later `announce` uses an
expiration after the tombstone's, so a node can come back.

Signed records (optional, recommended on open networks). Without signing, any peer could overwrite or
tombstone another peer's subkey. With ``signer`` set, the subkey is ``"<peer id>[owner:<RSA public
key>]"`` and hivemind's `RSASignatureValidator` (installed in the DHT, see `signed_dht_options`) signs
each value on store and makes every DHT node refuse values under that subkey that the key's owner did
not sign. This directory then also requires that the libp2p peer id derived from the owner key is the
record's peer id, so a record is bound to the identity that libp2p authenticates on every stream; in
this mode unsigned records are counted as ``invalid``. This needs the node's libp2p identity to be that
RSA key (`signed_dht_options` arranges it). Only signed records are `authenticated`: the Ed25519 key a
record announces for secure aggregation (``secagg_key``) is then bound to the peer id; without signing
it is never used (secure aggregation falls back to the transport's authenticated sender).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import base58
import hivemind
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from p2pnode.discovery.base import SECAGG_KEY_BYTES, PeerDirectory, PeerInfo
from p2pnode.proto import peer_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Default lifetime of a record without refresh, in seconds.
DEFAULT_TTL = 60.0
#: Default longest wait for one DHT store or get, in seconds.
DEFAULT_REQUEST_TIMEOUT = 10.0
#: How often a request in flight checks that the DHT process is still alive, in seconds.
DEAD_CHECK_S = 0.5
#: Largest record accepted, in bytes (a record holds a few multiaddrs and names).
MAX_RECORD_BYTES = 16 * 1024
#: Most multiaddrs / capabilities accepted in one record.
MAX_RECORD_ITEMS = 64
#: Value stored by `withdraw`; readers skip it.
TOMBSTONE = b""
#: How much later than the last record a tombstone (or a record after a tombstone) expires, in seconds.
_EXPIRATION_STEP = 1e-3
_OWNER_PREFIX = "[owner:"


def peer_id_of_public_key(ssh_public_key: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key given in OpenSSH format.

    Follows the libp2p peer-id spec: sha2-256 multihash of the protobuf `PublicKey` holding the DER
    SubjectPublicKeyInfo (RSA keys are too long for the identity multihash).
    """
    key = serialization.load_ssh_public_key(ssh_public_key)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("owner key is not an RSA key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = hashlib.sha256(proto).digest()
    return base58.b58encode(bytes([0x12, len(digest)]) + digest).decode()


def load_or_create_identity(identity_path: str) -> RSAPrivateKey:
    """Load the RSA libp2p identity at `identity_path`, creating it (mode 0400) if missing.

    The file is the private key in the format p2pd reads (hivemind's `P2P.generate_identity`).
    """
    if not os.path.isfile(identity_path):
        P2P.generate_identity(identity_path)
    with open(identity_path, "rb") as f:
        proto = crypto_pb2.PrivateKey.FromString(f.read())
    if proto.key_type != crypto_pb2.RSA:
        raise ValueError(f"{identity_path} holds a non-RSA key; signed records need an RSA identity")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": proto.data})  # the documented pickling path of hivemind's key
    return key


def signed_dht_options(identity_path: str, *, check_if_identity_free: bool = True) -> dict[str, Any]:
    """Keyword arguments for `hivemind.DHT` that make its libp2p identity the RSA key at `identity_path`
    and install the signature validator; pass ``signer=options["record_validators"][0]`` to
    `DHTDirectory`.

    :param check_if_identity_free: let p2pd check that no other peer uses this identity (slower start).
    """
    validator = RSASignatureValidator(load_or_create_identity(identity_path))
    return {"identity_path": identity_path, "record_validators": [validator],
            "check_if_identity_free": check_if_identity_free}


class DHTDirectory(PeerDirectory):
    """Peer records of one run in a hivemind DHT.

    :param dht: a running `hivemind.DHT`.
    :param run_id: the run; records live under ``"<run_id>/peers"``.
    :param config_hash: this node's config hash; `peers` keeps only records with the same hash.
    :param ttl: lifetime of a record, in seconds (default 60); refreshed every ``ttl / 3``.
    :param request_timeout: longest wait for one DHT store or get, in seconds (default 10).
    :param signer: the `RSASignatureValidator` installed in `dht` (see `signed_dht_options`); when set,
        this node's records are signed and unsigned records of others are refused. Default: unsigned.
    :param peer_id: this node's peer id; default: asked from the DHT.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, config_hash: str, *, ttl: float = DEFAULT_TTL,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 signer: RSASignatureValidator | None = None, peer_id: str | None = None) -> None:
        super().__init__()
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.dht = dht
        self.run_id = run_id
        self.key = f"{run_id}/peers"
        self.config_hash = config_hash
        self.ttl = ttl
        self.request_timeout = request_timeout
        self.signer = signer
        # Signed records are bound to the peer id they name (the owner key must hash to it).
        self.authenticated = signer is not None
        self._peer_id = peer_id
        self._info: PeerInfo | None = None
        #: Expiration time (DHT clock) of the last value this node stored under its subkey.
        self._last_expiration = float("-inf")
        self._refresher: asyncio.Task[None] | None = None
        self._store_lock = asyncio.Lock()
        self._owner_ids: dict[str, str | None] = {}
        #: Successful stores by the refresher (for monitoring and tests).
        self.refreshes = 0
        #: The peers of the last successful `peers` call (a node whose DHT restarts rejoins through them).
        self.last_peers: list[PeerInfo] = []

    # -- identity ---------------------------------------------------------------------------------
    async def peer_id(self) -> str:
        """This node's peer id (base58), asked from the DHT process once without blocking."""
        if self._peer_id is None:
            pid = await self._wait(self.dht.run_coroutine(_dht_peer_id, return_future=True), "peer id lookup")
            self._peer_id = str(pid)
        return self._peer_id

    async def subkey(self) -> str:
        """The subkey of this node's record: its peer id, plus the owner key when records are signed."""
        pid = await self.peer_id()
        if self.signer is None:
            return pid
        return pid + self.signer.local_public_key.decode()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the refresher task (idempotent). It re-stores the announced record every ``ttl / 3``."""
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_loop(), name=f"refresh {self.key}")

    async def shutdown(self) -> None:
        """Stop the refresher and withdraw this node's record (waits at most ``request_timeout``)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._info is not None:
            try:
                await self.withdraw()
            except Exception as e:  # leaving must not fail: the record expires by itself anyway
                logger.warning("could not withdraw the record of %s: %r", self._info.peer_id[-8:], e)

    # -- publishing -------------------------------------------------------------------------------
    async def announce(self, info: PeerInfo) -> None:
        """Store `info` now and keep refreshing it (with a fresh timestamp) until `withdraw`.

        :raises ValueError: `info.peer_id` is not this node's peer id.
        :raises TimeoutError: the DHT did not confirm the store within ``request_timeout``.
        """
        pid = await self.peer_id()
        if info.peer_id != pid:
            raise ValueError(f"announced peer id {info.peer_id} is not this node's id {pid}")
        self._info = info
        await self._store_record(info)

    async def withdraw(self) -> None:
        """Stop refreshing and make the record disappear for readers (tombstone, see the module doc)."""
        self._info = None
        async with self._store_lock:
            if self._last_expiration == float("-inf"):
                return
            expiration = self._last_expiration + _EXPIRATION_STEP
            await self._store(TOMBSTONE, expiration)

    async def _store_record(self, info: PeerInfo) -> None:
        async with self._store_lock:
            if self._info is not info:  # withdrawn or replaced while waiting for the lock
                return
            record = PeerInfo(**{**info.__dict__, "timestamp": time.time()}).to_proto()
            expiration = max(get_dht_time() + self.ttl, self._last_expiration + _EXPIRATION_STEP)
            await self._store(record.SerializeToString(), expiration)

    async def _store(self, value: bytes, expiration: float) -> None:
        ok = await self._wait(self.dht.store(self.key, value, expiration_time=expiration,
                                             subkey=await self.subkey(), return_future=True), "store")
        # Even a store that no replica confirmed may have reached some; later values must still win.
        self._last_expiration = max(self._last_expiration, expiration)
        if not ok:
            logger.warning("DHT store of %s did not reach any replica", self.key)

    async def _refresh_loop(self) -> None:
        period = self.ttl / 3
        while True:
            await asyncio.sleep(period)
            info = self._info
            if info is None:
                continue
            try:
                await self._store_record(info)
                self.refreshes += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Keep the loop alive: one failed refresh still leaves 2/3 of the ttl for the next one.
                logger.warning("refresh of the record under %s failed: %r", self.key, e)

    # -- reading ----------------------------------------------------------------------------------
    async def peers(self) -> list[PeerInfo]:
        """Live, valid peers of this run with this config hash, excluding this node, sorted by peer id.

        :raises TimeoutError: the DHT did not answer within ``request_timeout``.
        """
        own = await self.peer_id()
        found = await self._wait(self.dht.get(self.key, latest=True, return_future=True), "get")
        if found is None or not isinstance(found.value, dict):
            return []
        out: dict[str, PeerInfo] = {}
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            if isinstance(value, bytes) and value == TOMBSTONE:
                continue
            info = self._check(subkey, value)
            if info is None:
                self.invalid += 1
                continue
            if info.peer_id == own:
                continue
            if info.config_hash != self.config_hash:
                self.mismatched += 1
                continue
            out[info.peer_id] = info
        self.last_peers = [out[k] for k in sorted(out)]
        return list(self.last_peers)

    def _check(self, subkey: object, value: object) -> PeerInfo | None:
        """Parse and validate one record; None if it is invalid (the reason is logged at debug level)."""
        if not isinstance(subkey, str) or not isinstance(value, bytes):
            logger.debug("record under %s has a subkey or value of the wrong type", self.key)
            return None
        peer_part, sep, owner = subkey.partition(_OWNER_PREFIX)
        if self.signer is not None:
            if not sep or not owner.endswith("]") or self._owner_id(owner[:-1]) != peer_part:
                logger.debug("record %s is not signed by the owner of its peer id", peer_part[-8:])
                return None
        elif sep:
            return None  # a signed record in an unsigned directory: its signature was never checked
        if len(value) > MAX_RECORD_BYTES:
            logger.debug("record %s is %d bytes long", peer_part[-8:], len(value))
            return None
        rec = peer_pb2.PeerRecord()
        try:
            rec.ParseFromString(value)
        except (DecodeError, ValueError):
            logger.debug("record %s does not parse", peer_part[-8:])
            return None
        if rec.peer_id != peer_part or not rec.peer_id:
            logger.debug("record under subkey %s claims peer id %s", peer_part[-8:], rec.peer_id[-8:])
            return None
        if len(rec.maddrs) > MAX_RECORD_ITEMS or len(rec.capabilities) > MAX_RECORD_ITEMS:
            return None
        if len(rec.secagg_key) not in (0, SECAGG_KEY_BYTES):
            logger.debug("record %s has a secagg key of %d bytes", peer_part[-8:], len(rec.secagg_key))
            return None
        return PeerInfo.from_proto(rec)

    def _owner_id(self, ssh_key: str) -> str | None:
        if ssh_key not in self._owner_ids:
            try:
                self._owner_ids[ssh_key] = peer_id_of_public_key(ssh_key.encode())
            except (ValueError, TypeError, base64.binascii.Error):  # type: ignore[attr-defined]
                self._owner_ids[ssh_key] = None
            if len(self._owner_ids) > 4096:  # bound the cache against floods of junk keys
                self._owner_ids.pop(next(iter(self._owner_ids)))
        return self._owner_ids[ssh_key]

    async def _wait(self, future: Awaitable[T], what: str) -> T:
        """Await a request to the DHT process for at most ``request_timeout``.

        A request sent to a DHT process that has died is never answered: it fails within
        `DEAD_CHECK_S` of the death instead of running into the timeout (the daemon restarts the process).

        :raises TimeoutError: no answer within ``request_timeout``.
        :raises ConnectionError: the DHT process died.
        """
        dht = self.dht
        waiter = asyncio.ensure_future(future)
        try:
            async with asyncio.timeout(self.request_timeout):
                while True:
                    done, _ = await asyncio.wait({waiter}, timeout=DEAD_CHECK_S)
                    if done:
                        return waiter.result()
                    if not _process_alive(dht):
                        raise ConnectionError(f"DHT {what} under {self.key}: the DHT process is gone")
        except TimeoutError:
            raise TimeoutError(f"DHT {what} under {self.key} took over {self.request_timeout} s") from None
        finally:
            if not waiter.done():
                waiter.cancel()
                cancel = getattr(future, "cancel", None)
                if cancel is not None:
                    cancel()


def _process_alive(dht: hivemind.DHT) -> bool:
    """Whether the process of `dht` runs (True when this process cannot tell: not its parent)."""
    try:
        return bool(dht.is_alive())
    except (AssertionError, ValueError):
        return True


async def _dht_peer_id(_dht: hivemind.DHT, node: Any) -> str:
    """Runs inside the DHT process: this node's base58 peer id."""
    return str(node.peer_id.to_base58())
