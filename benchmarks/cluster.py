"""Worker-process plumbing shared by the multi-process benchmarks (`transport.py`, `vs_hivemind.py`).

- `Cluster`: N spawned worker processes of one measurement, each with a pipe to this process and one
  barrier between them; worker 0 starts first and the others bootstrap from its addresses. A worker
  reports ``("ready", info)``, then answers the benchmark's own messages; ``("stop", None)`` ends it.
- `worker_entry`: what every worker runs around the benchmark's own worker function.
- `/proc` helpers: the CPU time of a process tree (`tree_cpu`), its descendants (`descendants`), killing
  one (`kill_tree`), available memory, and the one ``machine:`` line both benchmarks print.
- hivemind steps (`await_trigger`, `hivemind_dht`) and timing between two barriers (`timed`,
  `timed_async`), the same for every side so that the figures compare.
- `Butterfly`: the butterfly all-reduce (reduce-scatter then all-gather) over `P2PTransport`.

Importing this module imports neither torch, hivemind nor p2pnode: the workers import them, after
``spawn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import multiprocessing as mp
import os
import platform
import resource
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from benchmarks.machine import commit, cpu_model  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
MB = 1_000_000
#: Longest wait for a worker to exit after "stop", in seconds.
STOP_TIMEOUT = 20.0
#: Most pieces a butterfly slice may travel in: the message id of piece ``p`` of step ``s`` is
#: ``s * MAX_PIECES + p``.
MAX_PIECES = 64


# ------------------------------------------------------------------------------------------------
# /proc
# ------------------------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(stat_path) as f:
                stat = f.read()
            fields = stat[stat.rfind(")") + 2:].split()
            table[int(stat_path.split("/")[2])] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def _children(table: dict[int, tuple[int, float]]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    return children


def _subtree(children: dict[int, list[int]], root: int) -> list[int]:
    """`root` and its descendants, parents before children."""
    todo, found = [root], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its live descendants (p2pd, DHT, averager)."""
    table = _proc_table()
    return sum(table.get(p, (0, 0.0))[1] for p in _subtree(_children(table), pid))


def descendants(pids: Iterable[int]) -> dict[int, int]:
    """Every live descendant of each of `pids` (and the pid itself) -> that root pid."""
    children = _children(_proc_table())
    return {p: root for root in pids for p in _subtree(children, root)}


def kill_tree(pid: int) -> None:
    """Kill a process and its descendants (found through /proc), children first."""
    for p in reversed(_subtree(_children(_proc_table()), pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def own_cpu() -> float:
    """CPU seconds (user + system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def available_memory() -> float:
    """MemAvailable from /proc/meminfo, in bytes (infinite if unknown)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float("inf")


def machine() -> dict[str, str]:
    """CPU, cores, versions, platform and commit of this run (imports torch and hivemind)."""
    import hivemind
    import torch

    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "hivemind": hivemind.__version__, "platform": platform.platform(),
            "commit": commit()}


def machine_line() -> str:
    """The ``machine: ...`` line the benchmarks print first: `machine` and the load average."""
    info = machine()
    with contextlib.suppress(OSError):
        info["load average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return "machine: " + ", ".join(f"{k}={v}" for k, v in info.items())


# ------------------------------------------------------------------------------------------------
# workers
# ------------------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """What a worker is: its side (`kind`), its rank among `n`, and the benchmark's `options` (sizes,
    formats, ``initial_peers`` for every rank but 0, ``log_level``)."""

    kind: str
    rank: int
    n: int
    options: dict[str, Any] = field(default_factory=dict)


Target = Callable[[WorkerSpec, Connection, Any], None]


def worker_entry(target: Target, spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    """Entry point of every worker: logging, then `target`; a failure is sent as ``("error", traceback)``."""
    # The workers are spawned (a clean interpreter each), which makes "spawn" their default start method;
    # hivemind's averager is a default-context Process that must fork (its state does not pickle).
    mp.set_start_method("fork", force=True)
    logging.basicConfig(level=spec.options.get("log_level", "WARNING"),
                        format=f"%(asctime)s {spec.kind}[{spec.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        target(spec, conn, barrier)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise


class Cluster:
    """The `n` worker processes of one measurement, each running ``target(spec, conn, barrier)``.

    Worker 0 starts first; when its ``ready`` info is ``(peer id, addresses)`` the others get the
    addresses as ``initial_peers``. `start_timeout` (seconds) bounds each worker's start and `prepare`.
    """

    def __init__(self, kind: str, n: int, target: Target, options: dict[str, Any], *, start_timeout: float) -> None:
        self.ctx = mp.get_context("spawn")
        self.kind, self.n, self.target, self.options = kind, n, target, options
        self.start_timeout = start_timeout
        self.barrier = self.ctx.Barrier(n)
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.infos: list[Any] = []
        self.sockets_before = set(glob.glob("/tmp/hivemind-*.sock"))

    def __enter__(self) -> Cluster:
        try:
            self._start(0, self.options)
            first = self.expect(0, "ready", self.start_timeout)
            self.infos.append(first)
            opts = dict(self.options)
            if isinstance(first, tuple):
                opts["initial_peers"] = first[1]
            for rank in range(1, self.n):
                self._start(rank, opts)
            self.infos += [self.expect(rank, "ready", self.start_timeout) for rank in range(1, self.n)]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, rank: int, options: dict[str, Any]) -> None:
        parent, child = self.ctx.Pipe()
        spec = WorkerSpec(self.kind, rank, self.n, options)
        proc = self.ctx.Process(target=worker_entry, args=(self.target, spec, child, self.barrier), daemon=False)
        proc.start()
        child.close()
        self.procs.append(proc)
        self.conns.append(parent)

    def send_all(self, msg: str, arg: Any) -> None:
        for conn in self.conns:
            conn.send((msg, arg))

    def expect(self, rank: int, what: str, timeout: float) -> Any:
        """Worker `rank`'s next message, which must be `what` (within `timeout` seconds); its argument."""
        conn = self.conns[rank]
        if not conn.poll(timeout):
            raise TimeoutError(f"{self.kind} worker {rank} sent no {what!r} within {timeout} s")
        msg, arg = conn.recv()
        if msg == "error":
            raise RuntimeError(f"{self.kind} worker {rank} failed:\n{arg}")
        if msg != what:
            raise RuntimeError(f"{self.kind} worker {rank} sent {msg!r}, expected {what!r}")
        return arg

    def expect_all(self, what: str, timeout: float) -> list[Any]:
        return [self.expect(rank, what, timeout) for rank in range(self.n)]

    def prepare(self) -> None:
        """Tell every worker who its peers are (``("peers", infos)``, answered ``ok``)."""
        self.send_all("peers", self.infos)
        self.expect_all("ok", self.start_timeout)

    def close(self) -> None:
        self.send_all_quietly("stop", None)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                print(f"  worker {proc.pid} did not stop; killing its process tree", file=sys.stderr)
                kill_tree(proc.pid)
                proc.join(5)
        # Remove the socket files the workers left behind, but not those of other programs running
        # hivemind on this machine at the same time: a file still bound by a live process is not ours.
        bound = set()
        with contextlib.suppress(OSError), open("/proc/net/unix") as f:
            bound = {line.split()[7] for line in f if len(line.split()) >= 8}
        for path in set(glob.glob("/tmp/hivemind-*.sock")) - self.sockets_before - bound:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def send_all_quietly(self, msg: str, arg: Any) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send((msg, arg))


# ------------------------------------------------------------------------------------------------
# one timed step, the same for every side
# ------------------------------------------------------------------------------------------------
def timed(barrier: Any, timeout: float, run: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """All workers meet at `barrier`, run ``run(*args)``, meet again: (own wall seconds, CPU seconds of this process
    tree). The CPU time is read after the second barrier: once everyone is done, no process of this tree
    still works for the step."""
    barrier.wait(timeout)
    t0, cpu0 = time.perf_counter(), tree_cpu(os.getpid())
    run(*args)
    elapsed = time.perf_counter() - t0
    barrier.wait(timeout)
    return elapsed, tree_cpu(os.getpid()) - cpu0


async def timed_async(barrier: Any, timeout: float, run: Callable[..., Awaitable[Any]], *args: Any
                      ) -> tuple[float, float]:
    """`timed` for a coroutine, the barrier waited for off the event loop (it keeps serving peers)."""
    await asyncio.to_thread(barrier.wait, timeout)
    t0, cpu0 = time.perf_counter(), tree_cpu(os.getpid())
    await run(*args)
    elapsed = time.perf_counter() - t0
    await asyncio.to_thread(barrier.wait, timeout)
    return elapsed, tree_cpu(os.getpid()) - cpu0


# ------------------------------------------------------------------------------------------------
# hivemind
# ------------------------------------------------------------------------------------------------
def hivemind_dht(spec: WorkerSpec) -> Any:
    """A started `hivemind.DHT` on 127.0.0.1, bootstrapped from ``options["initial_peers"]`` (rank 0: none)."""
    import hivemind

    return hivemind.DHT(start=True, host_maddrs=[LOOPBACK], initial_peers=spec.options.get("initial_peers") or None)


def dht_info(dht: Any) -> tuple[str, list[str]]:
    """What a hivemind worker reports as ``ready``: (peer id, visible addresses)."""
    return dht.peer_id.to_base58(), [str(a) for a in dht.get_visible_maddrs()]


def await_trigger(averager: Any, timeout: float) -> Any:
    """Schedule an all-reduce step that waits for a trigger; return its control once the group is formed
    (matchmaking is not timed). Raises `RuntimeError` if matchmaking fails or takes over `timeout` s."""
    from hivemind.averaging.control import AveragingStage

    control = averager.step(wait=False, require_trigger=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while control.stage != AveragingStage.AWAITING_TRIGGER:
        if control.done() or time.monotonic() > deadline:
            raise RuntimeError(f"matchmaking failed: {control.result()}")
        time.sleep(0.01)
    return control


def allreduce(control: Any, timeout: float) -> None:
    """Trigger the step `await_trigger` formed and wait (at most `timeout` s) for its result."""
    control.allow_allreduce()
    control.result(timeout=timeout)


# ------------------------------------------------------------------------------------------------
# our transport
# ------------------------------------------------------------------------------------------------
async def start_transport(spec: WorkerSpec) -> Any:
    """A `P2PTransport` on 127.0.0.1 (``options["direct"]``: the direct TLS channel, default on)."""
    from p2pnode.transport.p2p import P2PTransport

    opts = spec.options
    return await P2PTransport.create(initial_peers=opts.get("initial_peers") or None, host_maddrs=[LOOPBACK],
                                     direct=opts.get("direct", True))


def slice_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """[start, end) of each of `n` near-equal slices of `numel` elements."""
    return [(numel * j // n, numel * (j + 1) // n) for j in range(n)]


@dataclass
class Sum:
    """Contributions to one all-reduce message id: the running float32 sum (the own part first), how many
    are in, set once all `n` are (then `acc` is their mean), and the compressed answer, made once."""

    acc: Any
    n: int
    count: int = 1
    done: asyncio.Event = field(default_factory=asyncio.Event)
    reply: Any = None

    def add(self, x: Any) -> None:
        self.acc += x
        self.count += 1
        if self.count == self.n:
            self.acc /= self.n
            self.done.set()


class Sums:
    """The `Sum` of each message id, started from ``own(id)``; ids older than ``2 * MAX_PIECES`` below the
    newest are dropped."""

    def __init__(self, n: int, own: Callable[[int], Any]) -> None:
        self.n, self.own = n, own
        self._sums: dict[int, Sum] = {}

    def __getitem__(self, wire_id: int) -> Sum:
        if wire_id not in self._sums:
            self._sums[wire_id] = Sum(self.own(wire_id).clone(), self.n)
            for old in [s for s in self._sums if s < wire_id - 2 * MAX_PIECES]:
                del self._sums[old]
        return self._sums[wire_id]


class Butterfly:
    """Butterfly all-reduce of one float32 tensor among `n` nodes over our transport (hivemind's pattern).

    Slice ``j`` (of `slice_bounds`) belongs to node ``j``. Every node calls every other node once per
    piece (``pieces`` concurrent calls per slice, default 1), sending the owner its part of the slice
    (reduce-scatter); the owner adds the contributions in float32 and answers every call with the
    averaged part once all `n` are in (all-gather). Each node sends and receives 2 (N-1)/N of the
    tensor; its own slice stays exact. With `compression` set, requests travel in that format and
    each answer is compressed once, the same bytes for every caller.

    This stays in the benchmarks rather than in p2pnode: it is the reference traffic pattern the
    benchmarks measure our transport and hivemind's averager with, not a protocol a node could run.
    It waits for all `n` nodes (one missing node stalls the step until `timeout`), checks no input,
    keeps no counters and does not report what fraction it combined, none of which a p2pnode protocol
    may leave out; and no p2pnode round needs an all-reduce of one tensor among a fixed group.
    """

    METHOD = "bench.part"

    def __init__(self, transport: Any, tensor: Any, rank: int, n: int, *, timeout: float, pieces: int = 1) -> None:
        if not 1 <= pieces <= MAX_PIECES:
            raise ValueError(f"pieces={pieces}; allowed 1..{MAX_PIECES}")
        self.transport, self.tensor, self.rank, self.n = transport, tensor, rank, n
        self.timeout, self.pieces = timeout, pieces
        self.bounds = slice_bounds(tensor.numel(), n)
        #: Wire format of the step to come (None: raw float32); set before the step starts on any node.
        self.compression: Any = None
        self.sums = Sums(n, lambda wire_id: self.tensor[slice(*self.piece(self.rank, wire_id % MAX_PIECES))])

    def piece(self, j: int, p: int) -> tuple[int, int]:
        """Bounds of piece `p` of slice `j`."""
        a, b = self.bounds[j]
        return a + (b - a) * p // self.pieces, a + (b - a) * (p + 1) // self.pieces

    def register(self) -> None:
        from p2pnode.proto import peer_pb2

        self.transport.register(self.METHOD, peer_pb2.ModelExchange, self._part)

    async def _part(self, sender: str, request: Any) -> Any:
        """Add a contribution to my slice; answer with the average once all N are in."""
        from p2pnode.proto import peer_pb2
        from p2pnode.transport.codec import Message
        from p2pnode.transport.compression import compress

        st = self.sums[request.body.round]
        st.add(request.tensors["x"])
        async with asyncio.timeout(self.timeout):
            await st.done.wait()
        body = peer_pb2.Pong(round=request.body.round)
        if self.compression is None:
            return Message(body, {"x": st.acc})
        if st.reply is None:  # compressed once, the same bytes for every caller
            st.reply = compress(st.acc, self.compression)
        return Message(body, compressed={"x": st.reply})

    async def run(self, step: int, peers: list[str], out: Any) -> None:
        """All-reduce step `step` with `peers` (peer ids by rank); the average goes into `out`."""
        from p2pnode.proto import peer_pb2
        from p2pnode.transport.codec import Message

        async def one(j: int, p: int) -> None:
            a, b = self.piece(j, p)
            request = Message(peer_pb2.ModelExchange(round=step * MAX_PIECES + p), {"x": self.tensor[a:b]},
                              compression=self.compression)
            reply = await self.transport.call(peers[j], self.METHOD, request, peer_pb2.Pong, timeout=self.timeout)
            out[a:b] = reply.tensors["x"]

        mine = [self.sums[step * MAX_PIECES + p] for p in range(self.pieces)]
        await asyncio.gather(*(one(j, p) for p in range(self.pieces) for j in range(self.n) if j != self.rank))
        for p, st in enumerate(mine):
            async with asyncio.timeout(self.timeout):
                await st.done.wait()
            a, b = self.piece(self.rank, p)
            out[a:b] = st.acc
