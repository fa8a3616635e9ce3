"""The daemon's child processes (its hivemind DHT process and that process's p2pd) die with their parent.

hivemind forks the DHT into a process of its own, which starts p2pd (the libp2p daemon) as its child.
Nothing ties their lives to the daemon's: a daemon killed by SIGKILL (as the OOM killer does) used to
leave both running for hours, holding their ports and answering peers under the node's peer id. Three
measures, from the strongest:

- **parent-death signal** (Linux): the DHT process asks the kernel (``prctl(PR_SET_PDEATHSIG)``) for
  SIGKILL when the daemon dies, and it starts p2pd with the same request about itself (see
  `arm_dht_process`). The kernel sends the signal when the *thread* that forked the child ends, so the
  daemon must fork the DHT process from a thread that lives as long as it does (its event-loop thread),
  never from a worker thread.
- **watchdog thread** in the DHT process (portable): when its parent process changes
  (``os.getppid()``), it kills the p2pd it started and exits.
- **pid file** (``<state dir>/children.json``): the daemon records the pids and start times of its DHT
  process and p2pd; a daemon starting on that state dir kills the recorded processes that are still
  alive and still look like ours (same start time, a ``python``, ``p2pnode`` or ``p2pd`` command
  line) before it binds its ports (`kill_leftovers`), so a restarted node never meets its own ghost.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import glob
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p2pnode.daemon.atomic import write_atomic

logger = logging.getLogger(__name__)

#: Name of the pid file in the state dir.
PID_FILE = "children.json"
#: ``prctl`` option that sets the signal a process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: How often the watchdog thread of the DHT process checks its parent, in seconds.
WATCHDOG_PERIOD_S = 0.5
#: Words of the command line that mark a recorded process as one of ours.
OUR_COMMANDS = ("python", "p2pnode", "p2pd")

_libc: Any = None


def _prctl() -> Any:
    """libc's ``prctl``, or None where there is none (not Linux)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.prctl


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) dies.

    Returns False where this is not available (not Linux, or prctl failed).
    """
    prctl = _prctl()
    if prctl is None:
        return False
    return bool(prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), 0, 0, 0) == 0)


# -- /proc ------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields we need follow the last ")".
    return stat[stat.rfind(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """Start time of a live (not zombie) process, in clock ticks since boot; None if there is none."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat(5)


def command_line(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces ("" when unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def process_name(pid: int) -> str:
    """The kernel's short name of `pid` (``/proc/<pid>/comm``), or "" when unreadable."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def child_pids(pid: int) -> list[int]:
    """Live (not zombie) children of `pid`, sorted.

    Reads ``/proc/<pid>/task/*/children`` where the kernel has it, else scans every ``/proc/<n>/stat``.
    """
    found: set[int] = set()
    lists = glob.glob(f"/proc/{pid}/task/*/children")
    if lists:
        for path in lists:
            with contextlib.suppress(OSError), open(path) as f:
                found.update(int(x) for x in f.read().split())
    else:
        for path in glob.glob("/proc/[0-9]*/stat"):
            child = int(path.split("/")[2])
            fields = _stat_fields(child)
            if fields is not None and len(fields) > 1 and fields[1] == str(pid):
                found.add(child)
    return sorted(p for p in found if start_time(p) is not None)


@dataclass(frozen=True)
class ProcessRecord:
    """One process the daemon started, as the pid file holds it.

    :param pid: its process id.
    :param start_time: its start time in clock ticks since boot (tells it from a later process that got
        the same pid).
    :param name: what it is: ``"dht"`` or ``"p2pd"``.
    """

    pid: int
    start_time: int
    name: str

    @classmethod
    def of(cls, pid: int, name: str) -> ProcessRecord | None:
        """The record of a live process, or None when it is gone."""
        started = start_time(pid)
        return None if started is None else cls(pid, started, name)

    def alive(self) -> bool:
        """Whether this very process still runs (same pid and start time, not a zombie)."""
        return start_time(self.pid) == self.start_time

    def looks_like_ours(self) -> bool:
        """Alive, and its command line names one of `OUR_COMMANDS` (a python DHT process, or p2pd)."""
        return self.alive() and any(word in command_line(self.pid) for word in OUR_COMMANDS)


def kill_and_wait(records: Iterable[ProcessRecord], timeout_s: float = 5.0) -> list[ProcessRecord]:
    """SIGKILL the processes that are still alive and wait until they are gone; return those killed.

    A process counts as gone once it is a zombie (it holds no ports or files any more), so this does not
    depend on who reaps it.
    """
    killed = []
    for rec in records:
        if rec.pid != os.getpid() and rec.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(rec.pid, signal.SIGKILL)
                killed.append(rec)
    deadline = time.monotonic() + timeout_s
    while any(r.alive() for r in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    for rec in killed:
        if rec.alive():
            logger.warning("process %d (%s) did not die within %.0f s of SIGKILL", rec.pid, rec.name, timeout_s)
    return killed


# -- the pid file ---------------------------------------------------------------------------------
def pid_file_path(state_dir: str | os.PathLike[str]) -> Path:
    """Path of the pid file in `state_dir`."""
    return Path(state_dir).expanduser() / PID_FILE


def write_pid_file(state_dir: str | os.PathLike[str], records: Sequence[ProcessRecord]) -> None:
    """Record `records` (and this daemon's pid) in the pid file, atomically (mode 0600)."""
    directory = Path(state_dir).expanduser()
    data = json.dumps({"daemon": os.getpid(), "children": [asdict(r) for r in records]}, indent=2) + "\n"
    write_atomic(directory / PID_FILE, data.encode())


def read_pid_file(state_dir: str | os.PathLike[str]) -> list[ProcessRecord]:
    """The records of the pid file; [] when there is none or it does not parse (logged)."""
    path = pid_file_path(state_dir)
    try:
        data = json.loads(path.read_text())
        return [ProcessRecord(int(r["pid"]), int(r["start_time"]), str(r["name"])) for r in data["children"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError) as e:
        logger.warning("ignoring the unreadable pid file %s: %s", path, e)
        return []


def remove_pid_file(state_dir: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        pid_file_path(state_dir).unlink()


def kill_leftovers(state_dir: str | os.PathLike[str], timeout_s: float = 5.0) -> list[ProcessRecord]:
    """Kill the processes recorded in the pid file of `state_dir` that still run and look like ours.

    Call with the state dir locked, before starting the DHT: a daemon of this state dir that died without
    its children (before they could notice) must not keep the node's ports and peer id. A recorded pid
    now used by another program (another start time or command line) is left alone. Removes the file.

    :returns: the processes killed.
    """
    leftovers = [r for r in read_pid_file(state_dir) if r.looks_like_ours()]
    killed = kill_and_wait(leftovers, timeout_s) if leftovers else []
    for rec in killed:
        logger.warning("killed the leftover %s process %d of an earlier daemon of this state dir", rec.name,
                       rec.pid, extra={"event": {"event": "leftover_killed", "pid": rec.pid, "name": rec.name}})
    remove_pid_file(state_dir)
    return killed


# -- inside the DHT process -----------------------------------------------------------------------
#: p2pd processes started by this (DHT) process, for the watchdog.
_started: list[asyncio.subprocess.Process] = []


def _watchdog(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_PERIOD_S)
    for proc in _started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    os._exit(1)


def _patch_subprocess_exec() -> None:
    """Make every subprocess that this process starts through asyncio (hivemind's ``P2P.create`` starts
    p2pd with ``asyncio.subprocess.create_subprocess_exec``) die with this process, and remember it."""
    original: Callable[..., Any] = asyncio.subprocess.create_subprocess_exec
    me = os.getpid()

    def die_with_parent() -> None:  # runs in the new child, between fork and exec
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != me:  # the parent died before the request took effect
            os._exit(1)

    async def create_subprocess_exec(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kwargs.setdefault("preexec_fn", die_with_parent)
        proc = await original(*args, **kwargs)
        _started[:] = [p for p in _started if p.returncode is None]
        _started.append(proc)
        return proc

    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec  # type: ignore[assignment]


def arm_dht_process(parent_pid: int) -> None:
    """Run first in the forked DHT process: die with `parent_pid`, and make p2pd die with this process.

    Sets the parent-death signal, exits at once if the parent is already gone, starts the watchdog
    thread, and patches this process's asyncio so that p2pd gets the parent-death signal too.
    """
    armed = set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:  # without prctl the watchdog is all there is
        logger.debug("no parent-death signal on this platform; relying on the watchdog")
    _patch_subprocess_exec()
    threading.Thread(target=_watchdog, args=(parent_pid,), name="dht-watchdog", daemon=True).start()


__all__ = ["PID_FILE", "ProcessRecord", "arm_dht_process", "child_pids", "command_line", "kill_and_wait",
           "kill_leftovers", "pid_file_path", "process_name", "read_pid_file", "remove_pid_file",
           "set_parent_death_signal", "start_time", "write_pid_file"]
