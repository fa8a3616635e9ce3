"""The node's persistent identity key and the state dir lock.

Identity: ``<state dir>/identity.key`` holds the node's libp2p private key (an RSA key in the protobuf
format p2pd reads, as hivemind's ``P2P.generate_identity`` writes it). hivemind's DHT starts p2pd with
it (``identity_path``), so the node keeps its libp2p peer id across restarts, and its DHT records can
be signed with it (`p2pnode.discovery.signing.signed_dht_options`). The file is created once, atomically
(written to a temporary file with mode 0600, fsynced, then linked to its final name, so a crash never
leaves a half-written key) and is kept with owner-only permissions (0400).

Secure aggregation: ``<state dir>/secagg.key`` holds the node's long-term Ed25519 key that signs its
secagg keys (`load_or_create_secagg_key`), created and protected the same way.

Lock: ``<state dir>/daemon.lock`` holds a POSIX record lock while a daemon uses the state dir, so a
second daemon on the same state dir (and so the same identity) is refused before it starts p2pd. The
kernel releases the lock when the process dies, even by SIGKILL. POSIX locks belong to the process and
are not inherited by forked children (hivemind forks its DHT process), so an orphaned child can never
keep a state dir locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from p2pnode.daemon.atomic import write_atomic
from p2pnode.daemon.statedir import StateDirError
from p2pnode.errors import P2PNodeError
from p2pnode.secagg import keys

logger = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
#: The node's long-term Ed25519 key for secure aggregation (`load_or_create_secagg_key`).
SECAGG_KEY_FILE = "secagg.key"
LOCK_FILE = "daemon.lock"
#: Mode of the identity file: readable by its owner only.
IDENTITY_MODE = 0o400
#: State dirs locked by this process: POSIX locks do not exclude the process that holds them.
_HELD: set[Path] = set()


class IdentityError(P2PNodeError):
    """The identity key file exists but cannot be used (unreadable, damaged, or readable by others)."""


def identity_path(state_dir: str | os.PathLike[str]) -> Path:
    """Path of the identity key in `state_dir`."""
    return Path(state_dir).expanduser() / IDENTITY_FILE


def _new_key_bytes() -> bytes:
    key = RSAPrivateKey()  # what hivemind's P2P.generate_identity makes: a 2048-bit RSA key
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()


def _check(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IdentityError(f"cannot read the identity key {path}: {e.strerror or e}") from e
    try:
        proto = crypto_pb2.PrivateKey.FromString(data)
        if not proto.data:
            raise ValueError("empty key")
        PeerID.from_identity(data)
    except Exception as e:  # any parse failure means the same thing to the user
        raise IdentityError(f"the identity key {path} is damaged ({e}); restore it from a backup to keep this "
                            f"node's peer id, or delete it to start under a new peer id") from e
    return data


@dataclass(frozen=True)
class Identity:
    """A node's identity key file.

    :param path: the key file.
    :param peer_id: the base58 libp2p peer id of the key.
    :param created: True when this call created the key (so no other peer can be using it).
    """

    path: Path
    peer_id: str
    created: bool


def _create_once(directory: Path, name: str, data: bytes) -> bool:
    """Create ``directory/name`` holding `data` with mode `IDENTITY_MODE`, unless it exists; True if created.

    Written to a temporary file (mode 0600 from the start), fsynced, then linked to its final name: a
    crash never leaves a half-written key, and a key created meanwhile by another process is never
    overwritten (link() fails if the name exists).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return write_atomic(directory / name, data, mode=IDENTITY_MODE, replace=False)


def _tighten(path: Path) -> None:
    """Make a key file readable by its owner only, warning when it was not (the key may have leaked)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("the key %s had mode %o (readable by others); set to %o", path, mode, IDENTITY_MODE)
        path.chmod(IDENTITY_MODE)


def load_or_create_identity(state_dir: str | os.PathLike[str]) -> Identity:
    """Return the identity key of `state_dir`, creating it if the state dir has none.

    A key readable by others is tightened to 0400 with a warning (the private key may have leaked).

    :raises IdentityError: the key file exists but is damaged or unreadable.
    """
    directory = Path(state_dir).expanduser()
    path = directory / IDENTITY_FILE
    created = False
    if not path.exists():
        created = _create_once(directory, IDENTITY_FILE, _new_key_bytes())
        if created:
            logger.info("created a new identity key in %s", path)
    _tighten(path)
    data = _check(path)
    return Identity(path, PeerID.from_identity(data).to_base58(), created)


def secagg_key_path(state_dir: str | os.PathLike[str]) -> Path:
    """Path of the secure-aggregation identity key in `state_dir`."""
    return Path(state_dir).expanduser() / SECAGG_KEY_FILE


def load_or_create_secagg_key(state_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Return the node's long-term Ed25519 secure-aggregation key of `state_dir`, creating it if missing.

    ``<state dir>/secagg.key`` holds the key's 32-byte private seed, raw, mode 0400, created once like
    ``identity.key``. It signs the node's ephemeral secagg keys of every round; its public half travels
    in the node's (signed) directory record, so peers bind it to this node's peer id. Keeping it across
    restarts keeps that binding stable: a peer that read the record before the restart still holds the
    right key.

    :raises IdentityError: the key file exists but is damaged or unreadable.
    """
    directory = Path(state_dir).expanduser()
    path = directory / SECAGG_KEY_FILE
    if not path.exists() and _create_once(directory, SECAGG_KEY_FILE, secrets.token_bytes(keys.KEY_BYTES)):
        logger.info("created a new secure-aggregation key in %s", path)
    _tighten(path)
    try:
        return keys.identity_from_bytes(path.read_bytes())
    except OSError as e:
        raise IdentityError(f"cannot read the secure-aggregation key {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise IdentityError(f"the secure-aggregation key {path} is damaged ({e}); delete it to make a new one "
                            f"(peers learn the new one from this node's next record)") from e


class StateDirLock:
    """An exclusive lock on a state dir for the life of this process (see the module doc).

    :raises StateDirError: from `acquire` when another live process holds it.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir).expanduser() / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StateDirLock:
        key = self.path.resolve()
        if key in _HELD:
            raise StateDirError(f"another node of this process is running with state dir {self.path.parent}; "
                                "give each node its own --state-dir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
            os.close(fd)
            raise StateDirError(f"another node{holder} is running with state dir {self.path.parent}; stop it "
                                "first or pass a different --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(key)
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
            _HELD.discard(self.path.resolve())

    def __enter__(self) -> StateDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["IDENTITY_FILE", "IDENTITY_MODE", "LOCK_FILE", "SECAGG_KEY_FILE", "Identity", "IdentityError",
           "StateDirLock", "identity_path", "load_or_create_identity", "load_or_create_secagg_key",
           "secagg_key_path"]
