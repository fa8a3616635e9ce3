"""The daemon's state directory and its ``control.json``: how local clients find a running node.

Layout of the state directory (default ``~/.p2pnode``, or ``$P2PNODE_STATE_DIR``, or ``--state-dir``)::

    <state dir>/            mode 0700
        control.json        mode 0600: {"address", "token", "peer_id", "pid", "started_at", "format"}
        children.json       mode 0600: the DHT process and p2pd of the daemon (`p2pnode.daemon.children`)

``control.json`` exists while a daemon runs. It holds the control API's address and the bearer token
that every Control call must present, so only the user who runs the daemon (and root) can control it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from p2pnode.daemon.atomic import write_atomic
from p2pnode.errors import P2PNodeError

logger = logging.getLogger(__name__)

#: Environment variable that overrides the default state directory.
STATE_DIR_ENV = "P2PNODE_STATE_DIR"
#: The default state directory, before ``~`` is expanded.
DEFAULT_STATE_DIR = "~/.p2pnode"
CONTROL_FILE = "control.json"
#: Version of the control file's layout; a reader refuses files of another version.
CONTROL_FORMAT = 1


class StateDirError(P2PNodeError):
    """The state directory cannot be used (not a directory, not ours, or held by another running node)."""


class ControlFileError(P2PNodeError):
    """``control.json`` exists but cannot be read or does not hold what a daemon writes."""


@dataclass(frozen=True)
class ControlInfo:
    """What ``control.json`` holds.

    :param address: the control API's address, ``"127.0.0.1:PORT"`` or ``"unix:PATH"``.
    :param token: the bearer token of the control API.
    :param peer_id: the node's peer id.
    :param pid: the daemon's process id.
    :param started_at: when the file was written, in seconds since the Unix epoch.
    """

    address: str
    token: str
    peer_id: str
    pid: int
    started_at: float = 0.0


def default_state_dir() -> Path:
    """``$P2PNODE_STATE_DIR`` if set and not empty, else ``~/.p2pnode`` (``~`` expanded)."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser()


def ensure_state_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Create the state directory (and its parents) if needed, restrict it to mode 0700, return its path.

    :param path: the directory; None (default) takes `default_state_dir()`. ``~`` is expanded.
    :raises StateDirError: when the path exists but is not a directory, or its mode cannot be set.
    """
    p = Path(path).expanduser() if path is not None else default_state_dir()
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked by the umask and does nothing for an existing directory; the control
        # token lives here, so make sure nobody else can list or open it.
        if stat.S_IMODE(p.stat().st_mode) != 0o700:
            p.chmod(0o700)
    except FileExistsError as e:
        raise StateDirError(f"state dir {p} exists and is not a directory") from e
    except OSError as e:
        raise StateDirError(f"cannot use state dir {p}: {e.strerror or e}") from e
    return p


def control_file_path(state_dir: str | os.PathLike[str]) -> Path:
    """Path of ``control.json`` in `state_dir`."""
    return Path(state_dir).expanduser() / CONTROL_FILE


def new_token() -> str:
    """A fresh control token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def write_control_file(state_dir: str | os.PathLike[str], address: str, token: str, peer_id: str,
                       pid: int | None = None) -> Path:
    """Write ``control.json`` atomically with mode 0600 and return its path.

    Atomic (`p2pnode.daemon.atomic`): the content goes to a temporary file in the same directory, which
    is flushed to disk and then renamed over ``control.json``, so a reader sees either the old file or
    the whole new one, never a half-written one (even after a crash).

    :param pid: the daemon's process id; None (default) takes this process's.
    """
    directory = Path(state_dir).expanduser()
    info = ControlInfo(address=address, token=token, peer_id=peer_id, pid=os.getpid() if pid is None else pid,
                       started_at=time.time())
    data = json.dumps({"format": CONTROL_FORMAT, **asdict(info)}, indent=2).encode() + b"\n"
    # Created 0600 from the start: the token is never readable by others, not even for a moment.
    write_atomic(directory / CONTROL_FILE, data)
    return directory / CONTROL_FILE


def read_control_file(state_dir: str | os.PathLike[str]) -> ControlInfo | None:
    """The content of ``control.json`` in `state_dir`, or None when there is none (no daemon started there).

    :raises ControlFileError: when the file exists but is unreadable or malformed.
    """
    path = control_file_path(state_dir)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ControlFileError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("format", CONTROL_FORMAT) != CONTROL_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {CONTROL_FORMAT}")
        info = ControlInfo(address=str(data["address"]), token=str(data["token"]),
                           peer_id=str(data.get("peer_id", "")), pid=int(data.get("pid", 0)),
                           started_at=float(data.get("started_at", 0.0)))
    except (ValueError, TypeError, KeyError) as e:
        raise ControlFileError(f"{path} is not a valid control file ({e}); remove it if no node runs "
                               "with this state dir") from e
    if not info.address or not info.token:
        raise ControlFileError(f"{path} has no address or no token; remove it if no node runs with this "
                               "state dir")
    return info


def remove_control_file(state_dir: str | os.PathLike[str], token: str | None = None) -> bool:
    """Remove ``control.json``; return True when a file was removed.

    :param token: when given, remove the file only if it still holds this token. A daemon passes its
        own token, so that it never deletes the file of another daemon that has since taken over the
        same state directory.
    """
    path = control_file_path(state_dir)
    if token is not None:
        try:
            current = read_control_file(state_dir)
        except ControlFileError:
            return False
        if current is None or current.token != token:
            return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


__all__ = [
    "CONTROL_FILE",
    "DEFAULT_STATE_DIR",
    "STATE_DIR_ENV",
    "ControlFileError",
    "ControlInfo",
    "StateDirError",
    "control_file_path",
    "default_state_dir",
    "ensure_state_dir",
    "new_token",
    "read_control_file",
    "remove_control_file",
    "write_control_file",
]
