"""Shared fixtures and utilities for tests that start real hivemind DHTs and p2pd daemons on 127.0.0.1.

Everything started here is stopped here: `NetworkGuard` records the ``/tmp/hivemind-*.sock`` files and
the child processes that exist before a test, and afterwards stops the processes and removes the socket
files that the test left behind (and reports them, so a leak is visible instead of silent). Socket
files of other programs running hivemind at the same time are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import hivemind
from hivemind.p2p import P2P

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
#: How long a DHT may take to start or stop, in seconds.
DHT_TIMEOUT = 15.0
SOCKET_GLOB = "/tmp/hivemind-*.sock"
#: Auxiliary processes that belong to this process for its whole life and exit with it: torch starts
#: ``torch_shm_manager`` once when hivemind first shares a tensor between processes.
PROCESS_ALLOWLIST = frozenset({"torch_shm_manag", "torch_shm_manager"})


def descendant_pids(root: int | None = None) -> set[int]:
    """Pids of all live descendants of `root` (default: this process), read from /proc."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path) as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields we need follow the last ")".
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] == "Z":  # a zombie is already dead; its parent reaps it
            continue
        pid = int(stat_path.split("/")[2])
        children.setdefault(int(rest[1]), []).append(pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def bound_unix_sockets() -> dict[str, int]:
    """Path -> inode of every unix socket some process has bound (read from /proc/net/unix)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 8:
                out[fields[7]] = int(fields[6])
    return out


def own_socket_inodes() -> set[int]:
    """Inodes of the sockets this process holds open."""
    inodes = set()
    for fd in glob.glob("/proc/self/fd/*"):
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


@dataclass
class NetworkGuard:
    """Remembers what existed before a test and removes what the test left behind.

    Use as a context manager. On exit:

    - processes started during the test that are still alive after a grace period are killed and
      listed in `leaked_processes`;
    - new ``/tmp/hivemind-*.sock`` files that this process still listens on (a `P2P` handle nobody shut
      down) are removed and listed in `leaked_sockets`;
    - new socket files nobody listens on any more are removed and listed in `stale_sockets`. They are
      left by a process that ended without removing them: a p2pd stopped the hard way because its DHT
      did not stop within its grace period (happens on a loaded machine), or another program;
    - socket files that another live program listens on are left alone.
    """

    grace_s: float = 5.0
    sockets_before: set[str] = field(default_factory=set)
    pids_before: set[int] = field(default_factory=set)
    leaked_processes: list[str] = field(default_factory=list)
    leaked_sockets: list[str] = field(default_factory=list)
    stale_sockets: list[str] = field(default_factory=list)

    def __enter__(self) -> NetworkGuard:
        self.sockets_before = set(glob.glob(SOCKET_GLOB))
        self.pids_before = descendant_pids()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def new_processes(self) -> set[int]:
        """Descendants started since `__enter__`, except the allowlisted auxiliary processes."""
        new = descendant_pids() - self.pids_before
        return {pid for pid in new if process_name(pid) not in PROCESS_ALLOWLIST}

    def cleanup(self) -> None:
        deadline = time.monotonic() + self.grace_s
        new = self.new_processes()
        while new and time.monotonic() < deadline:
            time.sleep(0.05)
            new = self.new_processes()
        for pid in sorted(new):
            self.leaked_processes.append(f"{pid} ({process_name(pid)})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Other programs on this machine may run hivemind at the same time: their live sockets stay.
        bound, mine = bound_unix_sockets(), own_socket_inodes()
        for path in sorted(set(glob.glob(SOCKET_GLOB)) - self.sockets_before):
            inode = bound.get(path)
            if inode is None:
                self.stale_sockets.append(path)
            elif inode in mine:
                self.leaked_sockets.append(path)
            else:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


async def start_p2p(initial_peers: Sequence[str] = (), host: str = "127.0.0.1") -> P2P:
    """Start a p2pd listening on `host` (default 127.0.0.1; another loopback address such as 127.0.0.7 makes
    it a different remote host to its peers: p2pd dials from its listening address), optionally
    bootstrapped from `initial_peers`."""
    maddrs = [LOOPBACK] if host == "127.0.0.1" else [f"/ip4/{host}/tcp/0"]
    return await P2P.create(initial_peers=list(initial_peers) or None, host_maddrs=maddrs)


def start_dht(**kwargs: object) -> hivemind.DHT:
    """Start one DHT on 127.0.0.1; retry once if its process does not come up within `DHT_TIMEOUT`.

    hivemind forks the DHT process. A fork inherits the locks that other threads of this process (gRPC
    servers and channels of earlier tests, thread pools) hold at that instant, and the child can then hang
    before it is ready; garbage is collected first and a hung child is killed and started again.
    """
    kwargs.setdefault("host_maddrs", [LOOPBACK])
    # A generous grace period to stop: on a loaded machine the default 3 s is sometimes too short, and
    # the DHT process is then killed before it stops its p2pd cleanly.
    kwargs.setdefault("shutdown_timeout", DHT_TIMEOUT)
    for attempt in range(2):
        gc.collect()
        dht = hivemind.DHT(start=True, await_ready=False, **kwargs)  # type: ignore[arg-type]
        try:
            dht.wait_until_ready(timeout=DHT_TIMEOUT * 2)
            return dht
        except TimeoutError:
            for pid in [*descendant_pids(dht.pid), dht.pid]:
                with contextlib.suppress(ProcessLookupError, TypeError):
                    os.kill(pid, signal.SIGKILL)
            if attempt:
                raise
    raise AssertionError("unreachable")


def start_dhts(n: int, **kwargs: object) -> list[hivemind.DHT]:
    """Start `n` DHTs on 127.0.0.1, each bootstrapped from the first one (see `start_dht`).

    Call before starting threads of your own: `hivemind.DHT` forks.
    """
    first = start_dht(**kwargs)
    dhts = [first]
    try:
        maddrs = [str(a) for a in first.get_visible_maddrs()]
        for _ in range(n - 1):
            dhts.append(start_dht(initial_peers=maddrs, **kwargs))
    except BaseException:
        stop_dhts(dhts)
        raise
    return dhts


def stop_dhts(dhts: Sequence[hivemind.DHT]) -> None:
    """Stop DHTs (each stops its own p2pd)."""
    for dht in dhts:
        with contextlib.suppress(Exception):
            dht.shutdown()


async def shutdown_replicas(dhts: Sequence[hivemind.DHT]) -> None:
    """Shut down the `P2P` replicas made by ``dht.replicate_p2p()`` (this removes their client sockets)."""
    for dht in dhts:
        replica = getattr(dht, "_p2p_replica", None)
        if replica is not None:
            await replica.shutdown()


@contextlib.contextmanager
def guarded() -> Iterator[NetworkGuard]:
    """Context manager form of `NetworkGuard`."""
    with NetworkGuard() as guard:
        yield guard


async def wait_for_directory_peers(nodes: Sequence[Any], count: int, timeout: float = 60.0) -> None:
    """Wait until every node's peer directory lists at least `count` peers; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [len(await n.directory.peers()) for n in nodes]
        if all(s >= count for s in seen):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"peers seen through the DHT: {seen}, expected {count} each")
        await asyncio.sleep(0.3)


def crash_node(node: Any) -> None:
    """Crash an in-process node's network as a power cut would: SIGKILL its DHT process and the libp2p daemon
    that the DHT started (which the node's transport shares). Nothing is withdrawn and no peer is told, and
    the node's DHT supervisor is stopped first (it dies with the node), so nothing comes back."""
    supervisor = getattr(node, "network", None)
    if supervisor is not None:
        supervisor.stop_watching()
    dht_pid = node.directory.dht.pid
    for pid in [*descendant_pids(dht_pid), dht_pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class AggregationLog:
    """Collects MoDeST aggregation events (set `on_aggregate` as a protocol's hook) and waits for versions."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._progress = asyncio.Event()

    def on_aggregate(self, event: Any) -> None:
        self.events.append(event)
        self._progress.set()

    async def until(self, version: int, timeout: float = 90.0) -> None:
        """Wait until some event has index >= `version`; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while max((e.index for e in self.events), default=0) < version:
            self._progress.clear()
            await asyncio.wait_for(self._progress.wait(), max(0.1, deadline - time.monotonic()))


async def start_real_nodes(nodes: list[Any], count: int, config_for: Callable[[int, list[str]], Any],
                           settings_for: Callable[[int], Any] | None = None) -> None:
    """Start `count` in-process nodes over the real network into `nodes`: node 0 alone, each other one
    bootstrapped from node 0's first address.

    :param nodes: where each node goes, before it starts (so that the caller's cleanup shuts down every
        node that was created, also when a start fails).
    :param config_for: ``(index, initial peers) -> NodeConfig`` of each node (validated here).
    :param settings_for: ``index -> DaemonSettings`` of each node (default None: `create_real_node`'s).
    """
    from p2pnode.daemon.real import create_real_node

    for i in range(count):
        initial = [] if i == 0 else nodes[0].transport.addresses()[:1]
        node = await create_real_node(config_for(i, initial).validate(),
                                      settings_for(i) if settings_for is not None else None)
        nodes.append(node)
        await node.start()


class RealSwarm:
    """`count` in-process nodes over the real network (hivemind DHT + libp2p on 127.0.0.1), as an async
    context manager: node 0 starts alone and the others join it; on entry every node is started and its
    directory lists the others; `run` starts each node's round loop; on exit every loop is cancelled and
    every node shut down (also when the test fails). Use inside a `NetworkGuard`.

    :param count: number of nodes.
    :param config_for: ``(index, initial peers) -> NodeConfig`` of each node.
    :param settings: the daemons' settings (default: `DaemonSettings.in_memory()`).
    :param log: where MoDeST aggregation events go (each protocol's ``on_aggregate``), or None.
    """

    def __init__(self, count: int, config_for: Callable[[int, list[str]], Any], *, settings: Any = None,
                 log: AggregationLog | None = None) -> None:
        self.count = count
        self.config_for = config_for
        self.settings = settings
        self.log = log
        self.nodes: list[Any] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> RealSwarm:
        from p2pnode.daemon.settings import DaemonSettings

        settings = self.settings if self.settings is not None else DaemonSettings.in_memory()
        try:
            await start_real_nodes(self.nodes, self.count, self.config_for, lambda i: settings)
            if self.log is not None:
                for node in self.nodes:
                    node.protocol.hooks.on_aggregate = self.log.on_aggregate
            await wait_for_directory_peers(self.nodes, self.count - 1)
        except BaseException:
            await self._shutdown()
            raise
        return self

    def run(self) -> None:
        """Start every node's round loop."""

        async def loop(node: Any) -> None:
            while True:
                await node.run_round()

        for node in self.nodes:
            self.tasks[node.peer_id] = asyncio.get_running_loop().create_task(loop(node))

    async def stop_loops(self) -> None:
        """Cancel every round loop and wait for them to end (the nodes stay up)."""
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _shutdown(self) -> None:
        await self.stop_loops()
        for node in self.nodes:
            await node.shutdown()

    async def __aexit__(self, *exc: object) -> None:
        await self._shutdown()
