"""`DHTSupervisor`: starts the node's hivemind DHT process, watches it and its p2pd, restarts them when they die.

hivemind runs the DHT in a forked process, which starts p2pd (the libp2p daemon that the node's
transport shares). When either dies (a hostile DHT record that crashes hivemind's deserializer kills
the DHT process, and its p2pd with it), hivemind does not notice: the node would go on with its
calls refused. The supervisor checks both every `POLL_S` seconds; when one is gone it:

1. reports the DHT ``down`` (health NOT_SERVING, ``dht_state`` in ``p2pnode status``, the ``dht_up``
   metric; the node pauses its rounds) and counts the event (``dht_died`` or ``p2pd_died``);
2. kills what is left of the pair and removes its socket files;
3. starts a new DHT (``restarting``) with the same identity key (so the same peer id), the same host
   address and port, and the initial peers plus the peers this node saw last; then runs the restart
   callbacks, which re-point the transport at the new p2pd and re-announce the node's record;
4. reports ``ok`` again and counts ``restarted``; a failed attempt counts ``restart_failed`` and is
   retried after a backoff that doubles from `BACKOFF_MIN_S` to `BACKOFF_MAX_S`.

Forking: the DHT process is forked on the event-loop thread (``DHT(start=False)`` then
``run_in_background(await_ready=False)``), and only the wait for it to be ready runs on a worker thread.
Forking from a worker thread hangs or crashes the child at times (it inherits locks that other threads
hold), and the child's parent-death signal fires when the thread that forked it ends
(`p2pnode.daemon.children`). Each DHT process arms itself at start (`arm_dht_process`) so that it and
its p2pd die with the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import multiprocessing as mp
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hivemind
from hivemind.utils.mpfuture import MPFuture, SharedBytes

from p2pnode.daemon.children import (
    ProcessRecord,
    arm_dht_process,
    child_pids,
    kill_and_wait,
    process_name,
    remove_pid_file,
    write_pid_file,
)
from p2pnode.errors import P2PNodeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How often the DHT process and its p2pd are checked, in seconds.
POLL_S = 1.0
#: Wait before the first restart attempt, doubled after each failed one up to `BACKOFF_MAX_S`, in seconds.
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
#: Default longest wait for a DHT process (and its p2pd) to be ready, in seconds.
DEFAULT_START_TIMEOUT_S = 60.0
#: Grace period of a DHT process to stop cleanly before it is killed, in seconds.
SHUTDOWN_TIMEOUT_S = 10.0
#: Longest wait for a question to a running DHT process (its sockets, its addresses), in seconds.
QUERY_TIMEOUT_S = 10.0
#: Slice of the wait for readiness on a worker thread, in seconds: between slices the supervisor checks
#: that the process still lives, and a cancelled start never leaves a thread waiting long.
READY_SLICE_S = 1.0
#: Longest wait for one of hivemind's process-shared locks before it is taken as held by a dead process, in s.
LOCK_PROBE_S = 1.0
#: Most peers of the last directory listing added to the initial peers of a restart.
MAX_PEER_HINTS = 8
#: Failed attempts with the node's own port before a restart takes any free port.
SAME_PORT_ATTEMPTS = 4
#: What the supervisor counts (`DHTSupervisor.events`).
EVENTS = ("dht_died", "p2pd_died", "restarted", "restart_failed")
#: States of `DHTSupervisor.state`: running, found dead and waiting to restart, restart in progress.
STATES = ("ok", "down", "restarting")

RestartCallback = Callable[[hivemind.DHT], Awaitable[None]]


def host_maddr(host: str, port: int) -> str:
    """The libp2p multiaddr of a TCP `host` and `port` (``/ip4/...`` or ``/ip6/...``)."""
    family = "ip6" if ":" in host else "ip4"
    return f"/{family}/{host}/tcp/{port}"


class SupervisedDHT(hivemind.DHT):
    """A `hivemind.DHT` whose process dies with the process that created it, and whose p2pd dies with it
    (see `p2pnode.daemon.children.arm_dht_process`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._creator_pid = os.getpid()
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        arm_dht_process(self._creator_pid)
        super().run()


async def _socket_files(_dht: hivemind.DHT, node: Any) -> list[str]:
    """Runs inside the DHT process: the unix socket files of its p2pd and of its p2pd client."""
    out = []
    maddrs: list[Any] = [node.p2p.daemon_listen_maddr, getattr(node.p2p, "_client_listen_maddr", None)]
    for maddr in maddrs:
        with contextlib.suppress(Exception):
            out.append(str(maddr["unix"]))
    return out


def _tcp_port(maddrs: Sequence[Any]) -> int | None:
    for maddr in maddrs:
        parts = str(maddr).split("/")
        if "tcp" in parts:
            with contextlib.suppress(ValueError, IndexError):
                return int(parts[parts.index("tcp") + 1])
    return None


def free_shared_locks(timeout_s: float = LOCK_PROBE_S) -> list[str]:
    """Replace the process-shared locks of hivemind that a dead DHT process left held; return their names.

    hivemind's futures (`MPFuture`) guard the pipe back to this process with locks shared by every
    process forked from it. A DHT process killed while it held one (SIGKILL while it answered a request)
    leaves it held for ever, and the next DHT process hangs as it reports that it is ready. A lock that
    cannot be taken within `timeout_s` seconds is replaced; DHT processes forked later inherit the new one.
    """
    replaced = []
    for owner, name in ((MPFuture, "_update_lock"), (MPFuture, "_initialization_lock"), (SharedBytes, "_lock")):
        lock = getattr(owner, name)
        if lock.acquire(timeout=timeout_s):
            lock.release()
        else:
            setattr(owner, name, mp.Lock())
            replaced.append(f"{owner.__name__}.{name}")
    if replaced:
        logger.warning("replaced hivemind's shared locks %s, left held by the dead DHT process", replaced)
    return replaced


class _Incarnation:
    """One DHT process of the node, with what it takes to clean up after it."""

    def __init__(self, dht: hivemind.DHT) -> None:
        self.dht = dht
        self.record = ProcessRecord.of(dht.pid, "dht") if dht.pid is not None else None
        self.p2pd: list[ProcessRecord] = []
        self.sockets: list[str] = []

    def find_p2pd(self) -> None:
        if self.dht.pid is not None:
            found = (ProcessRecord.of(pid, "p2pd") for pid in child_pids(self.dht.pid) if process_name(pid) == "p2pd")
            self.p2pd = [r for r in found if r is not None]

    @property
    def records(self) -> list[ProcessRecord]:
        return ([self.record] if self.record is not None else []) + self.p2pd

    def problem(self) -> str | None:
        """``"dht_died"``, ``"p2pd_died"`` or None when both run."""
        if not self.dht.is_alive():
            return "dht_died"
        if self.p2pd and not any(r.alive() for r in self.p2pd):
            return "p2pd_died"
        return None

    def discard(self) -> None:
        """Kill whatever is left of the DHT process and its p2pd, and remove their socket files (blocking)."""
        # Later calls through this DHT object fail at once instead of filling a pipe nobody reads.
        with contextlib.suppress(Exception):
            self.dht._outer_pipe.close()
        if self.dht.pid is not None and self.dht.is_alive():
            self.find_p2pd()
        kill_and_wait(self.records)
        with contextlib.suppress(Exception):
            self.dht.join(1.0)  # reap it
        free_shared_locks()
        for path in self.sockets:
            with contextlib.suppress(OSError):
                os.remove(path)


class DHTSupervisor:
    """Owns the node's hivemind DHT process: starts it, watches it and restarts it (see the module doc).

    :param host: IP address p2pd listens on.
    :param port: TCP port p2pd listens on (0: any free port; a restart then takes the port the first
        start got).
    :param initial_peers: multiaddrs of peers to join at start and at every restart.
    :param dht_options: further keyword arguments of `hivemind.DHT` (``identity_path`` for a stable peer
        id, ``record_validators``, ``check_if_identity_free``, ...).
    :param start_timeout_s: longest wait for a DHT process to be ready, in seconds (default 60).
    :param state_dir: where the pid file of the DHT process and its p2pd is kept (None: no pid file).
    :param peer_hints: returns multiaddrs of peers seen lately (with ``/p2p/<id>``); added to the initial
        peers of a restart, so that a node whose initial peers have left finds the swarm again.
    :param poll_s: period of the checks, in seconds (default `POLL_S`).
    """

    def __init__(self, *, host: str, port: int, initial_peers: Sequence[str] = (),
                 dht_options: Mapping[str, Any] | None = None, start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 state_dir: Path | None = None, peer_hints: Callable[[], Sequence[str]] | None = None,
                 poll_s: float = POLL_S, backoff_min_s: float = BACKOFF_MIN_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self.host = host
        self.port = port
        self.initial_peers = list(initial_peers)
        self.dht_options = dict(dht_options or {})
        self.start_timeout_s = start_timeout_s
        self.state_dir = state_dir
        self.peer_hints = peer_hints
        self.poll_s = poll_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        #: ``ok``, ``down`` or ``restarting`` (see `STATES`); ``down`` before the first start.
        self.state = "down"
        #: Counts of `EVENTS` since start.
        self.events: collections.Counter[str] = collections.Counter(dict.fromkeys(EVENTS, 0))
        self._current: _Incarnation | None = None
        self._callbacks: list[RestartCallback] = []
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def dht(self) -> hivemind.DHT:
        """The DHT that runs now (after a restart: the new one)."""
        if self._current is None:
            raise RuntimeError("the DHT is not started")
        return self._current.dht

    @property
    def processes(self) -> list[ProcessRecord]:
        """The DHT process and its p2pd, as recorded at their start."""
        return [] if self._current is None else list(self._current.records)

    def on_restart(self, callback: RestartCallback) -> None:
        """Run ``await callback(new_dht)`` after each restart, in the order added; if one raises, the restart
        counts as failed and is tried again."""
        self._callbacks.append(callback)

    # -- start and stop ---------------------------------------------------------------------------
    async def start(self) -> hivemind.DHT:
        """Start the first DHT process (strict: the initial peers must answer), then watch it.

        :raises P2PNodeError: the DHT did not start (bad address, initial peers unreachable, timeout).
        """
        try:
            inc = await self._spawn(self.initial_peers, self.port, strict=True)
        except P2PNodeError:
            raise
        except Exception as e:
            raise P2PNodeError(f"could not start the DHT on {self.host}:{self.port} with initial peers "
                               f"{self.initial_peers or 'none'}: {e}") from e
        self._current = inc
        self.state = "ok"
        self._watcher = asyncio.create_task(self._watch(), name="dht-supervisor")
        return inc.dht

    def stop_watching(self) -> None:
        """Stop checking (and restarting) the DHT; it keeps running. For a shutdown, and for tests that
        simulate a power cut."""
        if self._watcher is not None:
            self._watcher.cancel()

    async def close(self) -> None:
        """Stop watching, stop the DHT process cleanly (killed after its grace period), remove the pid file."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        inc, self._current = self._current, None
        if inc is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(inc.dht.shutdown)
            await asyncio.to_thread(inc.discard)
        if self.state_dir is not None:
            with contextlib.suppress(OSError):
                remove_pid_file(self.state_dir)
        self.state = "down"

    # -- watching ---------------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            inc = self._current
            problem = inc.problem() if inc is not None else None
            if inc is not None and problem is not None:
                await self._recover(inc, problem)

    async def _recover(self, dead: _Incarnation, problem: str) -> None:
        self.events[problem] += 1
        self.state = "down"
        what = "DHT process" if problem == "dht_died" else "libp2p daemon (p2pd)"
        logger.error("the %s of this node died (pids %s); the node is off the network until it is restarted",
                     what, [r.pid for r in dead.records],
                     extra={"event": {"event": "dht_down", "cause": problem, "pids": [r.pid for r in dead.records]}})
        await asyncio.to_thread(dead.discard)
        delay = self.backoff_min_s
        attempt = 0
        while not self._closed:
            await asyncio.sleep(delay)
            self.state = "restarting"
            port = self.port if attempt < SAME_PORT_ATTEMPTS or self.port == 0 else 0
            # Every other attempt without the peers seen lately: when they are all gone, p2pd cannot
            # bootstrap from them, and a node alone must still come back.
            peers = self._restart_peers(with_hints=attempt % 2 == 0)
            try:
                inc = await self._spawn(peers, port, strict=False)
            except Exception as e:
                self._failed(attempt, delay, e)
            else:
                self._current = inc
                try:
                    for callback in self._callbacks:
                        await callback(inc.dht)
                except Exception as e:
                    self._current = None
                    await asyncio.to_thread(inc.discard)
                    self._failed(attempt, delay, e)
                else:
                    self.state = "ok"
                    self.events["restarted"] += 1
                    logger.warning("the DHT process of this node is back (pid %s, %d restart(s) so far)",
                                   inc.dht.pid, self.events["restarted"],
                                   extra={"event": {"event": "dht_restarted", "pid": inc.dht.pid,
                                                    "attempts": attempt + 1}})
                    return
            self.state = "down"
            attempt += 1
            delay = min(delay * 2, self.backoff_max_s)

    def _failed(self, attempt: int, delay: float, error: BaseException) -> None:
        self.events["restart_failed"] += 1
        nxt = min(delay * 2, self.backoff_max_s)
        logger.warning("restart %d of the DHT failed: %s; next try in %.0f s", attempt + 1, error, nxt,
                       extra={"event": {"event": "dht_restart_failed", "attempt": attempt + 1, "error": str(error)}})

    def _restart_peers(self, *, with_hints: bool) -> list[str]:
        peers = list(self.initial_peers)
        if with_hints and self.peer_hints is not None:
            try:
                hints = [m for m in self.peer_hints() if "/p2p/" in m]
            except Exception as e:  # a hint is an extra; never a reason not to restart
                logger.debug("no peer hints: %r", e)
                hints = []
            peers += [m for m in hints if m not in peers][:MAX_PEER_HINTS]
        return peers

    # -- one DHT process --------------------------------------------------------------------------
    def _fork(self, initial_peers: Sequence[str], port: int, strict: bool) -> hivemind.DHT:
        options = dict(self.dht_options)
        if not strict:
            # A restart: the identity is this node's own (its old p2pd is dead), and the node must come
            # back even when its initial peers have left; peers that knew it reconnect to it.
            options["check_if_identity_free"] = False
            options["ensure_bootstrap_success"] = False
        # Collect garbage first, so that the child never finalizes objects of this process that are not
        # fork-safe (grpc's hang when finalized in a forked child).
        gc.collect()
        dht = SupervisedDHT(start=False, host_maddrs=[host_maddr(self.host, port)], initial_peers=list(initial_peers),
                            startup_timeout=self.start_timeout_s, shutdown_timeout=SHUTDOWN_TIMEOUT_S, **options)
        dht.run_in_background(await_ready=False)  # forks now, on this (the event loop's) thread
        return dht

    async def _spawn(self, initial_peers: Sequence[str], port: int, *, strict: bool) -> _Incarnation:
        dht = self._fork(initial_peers, port, strict)
        inc = _Incarnation(dht)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.start_timeout_s + READY_SLICE_S
            while True:
                try:
                    await asyncio.to_thread(dht.wait_until_ready, READY_SLICE_S)
                    break
                except TimeoutError:
                    if not dht.is_alive():
                        raise P2PNodeError(f"the DHT process exited while starting (exit code {dht.exitcode})") \
                            from None
                    if loop.time() > deadline:
                        raise TimeoutError(f"the DHT was not ready within {self.start_timeout_s:.0f} s") from None
            inc.record = ProcessRecord.of(dht.pid, "dht") if dht.pid is not None else None
            inc.find_p2pd()
            inc.sockets = await self._ask(dht.run_coroutine(_socket_files, return_future=True))
            if self.port == 0 or port == 0:
                maddrs = await self._ask(dht.run_coroutine(_visible_maddrs, return_future=True))
                self.port = _tcp_port(maddrs) or self.port
        except BaseException:
            inc.discard()  # rare, and quick: SIGKILLed processes are gone within milliseconds
            raise
        if self.state_dir is not None:
            write_pid_file(self.state_dir, inc.records)
        logger.debug("DHT process %s ready with p2pd %s", dht.pid, [r.pid for r in inc.p2pd])
        return inc

    async def _ask(self, future: Awaitable[T]) -> T:
        async with asyncio.timeout(QUERY_TIMEOUT_S):
            return await future


async def _visible_maddrs(_dht: hivemind.DHT, node: Any) -> list[str]:
    """Runs inside the DHT process: the multiaddrs of its p2pd, as strings."""
    return [str(m) for m in await node.get_visible_maddrs()]


__all__ = ["EVENTS", "STATES", "DHTSupervisor", "SupervisedDHT", "host_maddr"]
