"""Bulk-tensor throughput on 127.0.0.1: plain TCP, our transport, hivemind's DecentralizedAverager.

Run from the repository root::

    python benchmarks/transport.py                # 100 MB model, medians of 5
    python benchmarks/transport.py --mb 20 --repeats 3 --skip hivemind8

What is measured (every participant is its own OS process, every node its own p2pd; one warm-up round
is run and discarded before the timed repeats; the figure is the median over repeats). Measurements
that are compared with each other (raw TCP and our single call; our all-reduces and hivemind's at the
same size) are started together and their rounds interleaved, so that load from other programs on the
machine falls on all of them alike. CPU time is that of every process involved (workers, their p2pd,
DHT and averager processes), in seconds per GB of model:

- ``raw_tcp``: one TCP connection between two processes; the sender writes the whole model with
  ``sendall`` and waits for a 1-byte acknowledgement; the receiver reads into a preallocated buffer.
- ``ours_pair``: `P2PTransport.call` from one node to another carrying the model as one tensor; the
  handler answers with an empty `Pong`. Time of the whole call.
- ``hivemind<N>``: N peers, each with a `hivemind.DHT` and a `DecentralizedAverager` over the model.
  Matchmaking is not timed: each peer schedules a step with ``require_trigger=True``, waits until its
  group is formed, all peers meet at a barrier, then trigger the all-reduce; the time is from the
  barrier to the slowest peer's result. The averaged values are checked afterwards.
- ``ours_allreduce<N>``: the same all-reduce (butterfly: reduce-scatter then all-gather, the traffic
  pattern hivemind uses) done with our transport: the model is split into N equal slices, slice j
  is owned by node j; every node calls every other node once, sending the owner its slice, and the
  owner answers each call with the averaged slice once all N contributions have arrived. Each node
  sends and receives 2 (N-1)/N of the model, as in hivemind. Time from a barrier to the slowest node.

MB are 10^6 bytes; "MB/s" is the model size divided by the time (for the all-reduces: model bytes per
second of all-reduce, the "algorithm bandwidth"). Ratios: ours_pair / raw_tcp (bandwidth) and
hivemind<N> / ours_allreduce<N> (time, so > 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import logging
import multiprocessing as mp
import os
import platform
import resource
import signal
import socket
import statistics
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from benchmarks.machine import commit, cpu_model  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
#: Longest wait for a worker to start (import torch, start p2pd / DHT), in seconds.
START_TIMEOUT = 120.0
#: Longest wait for one timed round, in seconds.
ROUND_TIMEOUT = 300.0
#: Longest wait for a worker to exit after "stop", in seconds.
STOP_TIMEOUT = 20.0
MB = 1_000_000


# ------------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    kind: str
    rank: int
    n: int
    nbytes: int
    options: dict[str, Any] = field(default_factory=dict)


def worker_main(spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    """Entry point of every worker: set up, report ``ready``, run rounds on ``go``, exit on ``stop``."""
    # The workers are spawned (a clean interpreter each), which makes "spawn" their default start method;
    # hivemind's averager is a default-context Process that must fork (its state does not pickle).
    mp.set_start_method("fork", force=True)
    logging.basicConfig(level=spec.options.get("log_level", "WARNING"),
                        format=f"%(asctime)s {spec.kind}[{spec.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        if spec.kind in ("ours_pair", "ours_allreduce"):
            run_loop(spec.options.get("loop", "asyncio"), ours_worker(spec, conn, barrier))
        elif spec.kind == "hivemind":
            hivemind_worker(spec, conn, barrier)
        elif spec.kind == "raw_tcp":
            raw_tcp_receiver(spec, conn)
        else:
            raise ValueError(spec.kind)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise


def run_loop(loop: str, coro: Any) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


def model_tensor(nbytes: int, value: float) -> Any:
    import torch

    return torch.full((nbytes // 4,), float(value), dtype=torch.float32)


def slice_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    return [(numel * j // n, numel * (j + 1) // n) for j in range(n)]


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


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its live descendants (p2pd, DHT, averager)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += table.get(p, (0, 0.0))[1]
        todo += children.get(p, [])
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- raw TCP -------------------------------------------------------------------------------------
def raw_tcp_receiver(spec: WorkerSpec, conn: Connection) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    conn.send(("ready", srv.getsockname()[1]))
    sock, _ = srv.accept()
    srv.close()
    buf = bytearray(spec.nbytes)
    view = memoryview(buf)
    with sock:
        while True:
            head = sock.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                break
            (size,) = struct.unpack("<Q", head)
            pos = 0
            while pos < size:
                got = sock.recv_into(view[pos:size])
                if got == 0:
                    return
                pos += got
            sock.sendall(b"k")
    conn.send(("bye", None))


class RawTCP:
    """Raw TCP measurement: the sender is this process, the receiver a child process."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.cluster = Cluster("raw_tcp", 1, nbytes, {})
        self.sock: socket.socket | None = None

    def __enter__(self) -> RawTCP:
        self.cluster.__enter__()
        (port,) = self.cluster.infos
        self.payload = memoryview(model_tensor(self.nbytes, 1.0).numpy()).cast("B")
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(ROUND_TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()
        self.cluster.close()

    def prepare(self) -> None:
        pass

    def round(self, step: int) -> tuple[float, float, bool]:
        assert self.sock is not None
        child = self.cluster.procs[0].pid
        t0, cpu0 = time.perf_counter(), own_cpu() + tree_cpu(child)
        self.sock.sendall(struct.pack("<Q", self.nbytes))
        self.sock.sendall(self.payload)
        if self.sock.recv(1) != b"k":
            raise RuntimeError("raw TCP receiver did not acknowledge")
        return time.perf_counter() - t0, own_cpu() + tree_cpu(child) - cpu0, True


# -- our transport -------------------------------------------------------------------------------
async def ours_worker(spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    import torch

    from p2pnode.proto import peer_pb2
    from p2pnode.transport.codec import Message
    from p2pnode.transport.p2p import P2PTransport

    # One intra-op thread: with more, OpenMP workers spin after every tensor op and take the CPU that p2pd
    # needs (on 2 cores this slowed the all-reduce several times over).
    torch.set_num_threads(1)
    opts = spec.options
    transport = await P2PTransport.create(initial_peers=opts.get("initial_peers") or None,
                                          host_maddrs=[LOOPBACK], direct=opts.get("direct", True))
    try:
        numel = spec.nbytes // 4
        bounds = slice_bounds(numel, spec.n)
        original = model_tensor(spec.nbytes, spec.rank)
        out = torch.empty_like(original)
        lo, hi = bounds[spec.rank]
        states: dict[int, dict[str, Any]] = {}

        def state(step: int) -> dict[str, Any]:
            if step not in states:
                states[step] = {"acc": original[lo:hi].clone(), "count": 1, "done": asyncio.Event()}
                for old in [s for s in states if s < step - 1]:
                    del states[old]
            return states[step]

        async def part(sender: str, request: Message[Any]) -> Message[Any]:
            """All-reduce: add a contribution to my slice; answer with the average once all are in."""
            st = state(request.body.round)
            st["acc"] += request.tensors["x"]
            st["count"] += 1
            if st["count"] == spec.n:
                st["acc"] /= spec.n
                st["done"].set()
            async with asyncio.timeout(ROUND_TIMEOUT):
                await st["done"].wait()
            return Message(peer_pb2.Pong(round=request.body.round), {"x": st["acc"]})

        async def sink(sender: str, request: Message[Any]) -> Message[Any]:
            if request.tensors["x"].numel() != numel:
                raise ValueError("truncated model")
            return Message(peer_pb2.Pong(round=request.body.round))

        transport.register("bench.part", peer_pb2.ModelExchange, part)
        transport.register("bench.sink", peer_pb2.ModelExchange, sink)
        conn.send(("ready", (transport.peer_id, transport.addresses())))
        peers: list[str] = []
        while True:
            msg, arg = await asyncio.to_thread(conn.recv)
            if msg == "peers":
                peers = [pid for pid, _ in arg]
                conn.send(("ok", None))
            elif msg == "go":
                step = arg
                await asyncio.to_thread(barrier.wait, ROUND_TIMEOUT)
                t0, cpu0 = time.perf_counter(), tree_cpu(os.getpid())
                ok = True
                if spec.kind == "ours_pair":
                    if spec.rank == 1:
                        await transport.call(peers[0], "bench.sink",
                                             Message(peer_pb2.ModelExchange(round=step), {"x": original}),
                                             peer_pb2.Pong, timeout=ROUND_TIMEOUT)
                else:
                    async def one(j: int, peer: str, step: int) -> None:
                        a, b = bounds[j]
                        request = Message(peer_pb2.ModelExchange(round=step), {"x": original[a:b]})
                        reply = await transport.call(peer, "bench.part", request, peer_pb2.Pong,
                                                     timeout=ROUND_TIMEOUT)
                        out[a:b] = reply.tensors["x"]

                    mine = state(step)
                    await asyncio.gather(*(one(j, peers[j], step) for j in range(spec.n) if j != spec.rank))
                    async with asyncio.timeout(ROUND_TIMEOUT):
                        await mine["done"].wait()
                    out[lo:hi] = mine["acc"]
                elapsed = time.perf_counter() - t0
                # Once everyone is done, no node still works for this round: its CPU time is complete.
                await asyncio.to_thread(barrier.wait, ROUND_TIMEOUT)
                cpu = tree_cpu(os.getpid()) - cpu0
                if spec.kind == "ours_allreduce":  # checked outside the timed part
                    ok = bool(torch.allclose(out, torch.full_like(out, (spec.n - 1) / 2)))
                conn.send(("done", (elapsed, ok, cpu)))
            elif msg == "stop":
                break
    finally:
        await transport.shutdown()
    conn.send(("bye", None))


# -- hivemind ------------------------------------------------------------------------------------
def hivemind_worker(spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    dht = hivemind.DHT(start=True, host_maddrs=[LOOPBACK],
                       initial_peers=spec.options.get("initial_peers") or None)
    averager = None
    try:
        tensor = model_tensor(spec.nbytes, spec.rank)
        averager = hivemind.averaging.DecentralizedAverager(
            [tensor], dht, prefix="bench", target_group_size=spec.n, min_group_size=spec.n,
            min_matchmaking_time=spec.options.get("matchmaking_s", 3.0), request_timeout=10.0, start=True)
        conn.send(("ready", (dht.peer_id.to_base58(), [str(a) for a in dht.get_visible_maddrs()])))
        expected = (spec.n - 1) / 2
        while True:
            msg, _ = conn.recv()
            if msg == "peers":
                conn.send(("ok", None))
            elif msg == "go":
                with averager.get_tensors() as tensors:
                    tensors[0].fill_(float(spec.rank))
                barrier.wait(ROUND_TIMEOUT)
                control = averager.step(wait=False, require_trigger=True, timeout=ROUND_TIMEOUT)
                deadline = time.monotonic() + ROUND_TIMEOUT
                while control.stage != AveragingStage.AWAITING_TRIGGER:
                    if control.done() or time.monotonic() > deadline:
                        raise RuntimeError(f"matchmaking failed: {control.result()}")
                    time.sleep(0.01)
                barrier.wait(ROUND_TIMEOUT)
                t0, cpu0 = time.perf_counter(), tree_cpu(os.getpid())
                control.allow_allreduce()
                control.result(timeout=ROUND_TIMEOUT)
                elapsed = time.perf_counter() - t0
                barrier.wait(ROUND_TIMEOUT)
                cpu = tree_cpu(os.getpid()) - cpu0
                with averager.get_tensors() as tensors:
                    # hivemind reports success even when a slice was not averaged: check every value.
                    ok = bool(torch.allclose(tensors[0], torch.full_like(tensors[0], expected)))
                conn.send(("done", (elapsed, ok, cpu)))
            elif msg == "stop":
                break
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()
    conn.send(("bye", None))


# ------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------
class Cluster:
    """Worker processes of one measurement. Worker 0 starts first; the others bootstrap from it."""

    def __init__(self, kind: str, n: int, nbytes: int, options: dict[str, Any]) -> None:
        self.ctx = mp.get_context("spawn")
        self.kind, self.n, self.nbytes, self.options = kind, n, nbytes, options
        self.barrier = self.ctx.Barrier(n)
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.infos: list[Any] = []
        self.sockets_before = set(glob.glob("/tmp/hivemind-*.sock"))

    def __enter__(self) -> Cluster:
        try:
            self._start(0, self.options)
            first = self._expect(0, "ready", START_TIMEOUT)
            self.infos.append(first)
            opts = dict(self.options)
            if isinstance(first, tuple):
                opts["initial_peers"] = first[1]
            for rank in range(1, self.n):
                self._start(rank, opts)
            self.infos += [self._expect(rank, "ready", START_TIMEOUT) for rank in range(1, self.n)]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, rank: int, options: dict[str, Any]) -> None:
        parent, child = self.ctx.Pipe()
        spec = WorkerSpec(self.kind, rank, self.n, self.nbytes, options)
        proc = self.ctx.Process(target=worker_main, args=(spec, child, self.barrier), daemon=False)
        proc.start()
        child.close()
        self.procs.append(proc)
        self.conns.append(parent)

    def _expect(self, rank: int, what: str, timeout: float) -> Any:
        conn = self.conns[rank]
        if not conn.poll(timeout):
            raise TimeoutError(f"{self.kind} worker {rank} sent no {what!r} within {timeout} s")
        msg, arg = conn.recv()
        if msg == "error":
            raise RuntimeError(f"{self.kind} worker {rank} failed:\n{arg}")
        if msg != what:
            raise RuntimeError(f"{self.kind} worker {rank} sent {msg!r}, expected {what!r}")
        return arg

    def prepare(self) -> None:
        """Tell every worker who its peers are."""
        for conn in self.conns:
            conn.send(("peers", self.infos))
        for rank in range(self.n):
            self._expect(rank, "ok", START_TIMEOUT)

    def round(self, step: int) -> tuple[float, float, bool]:
        """Run one round: the slowest worker's time, the CPU seconds of all workers and their child
        processes together, and whether every worker ended with the right values."""
        for conn in self.conns:
            conn.send(("go", step))
        results = [self._expect(rank, "done", ROUND_TIMEOUT) for rank in range(self.n)]
        return (max(t for t, _, _ in results), sum(c for _, _, c in results),
                all(ok for _, ok, _ in results))

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                print(f"  worker {proc.pid} did not stop; killing its process group", file=sys.stderr)
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


def kill_tree(pid: int) -> None:
    """Kill a process and its descendants (found through /proc)."""
    children: dict[int, list[int]] = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(stat_path) as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(stat_path.split("/")[2]))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in reversed(found):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def machine() -> dict[str, str]:
    import hivemind
    import torch

    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "hivemind": hivemind.__version__, "platform": platform.platform(),
            "commit": commit()}


@dataclass
class Result:
    name: str
    times: list[float]
    cpus: list[float]
    nbytes: int
    ok: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def mbps(self) -> float:
        return self.nbytes / MB / self.median

    @property
    def cpu_per_gb(self) -> float:
        """CPU seconds of all processes involved per GB of model."""
        return statistics.median(self.cpus) / (self.nbytes / 1e9)


#: (key, label, kind, number of nodes or None for --nodes, options). Keys are what --only / --skip take.
PLAN: list[tuple[str, str, str, int | None, dict[str, Any]]] = [
    ("raw_tcp", "raw TCP, 1 connection", "raw_tcp", 1, {}),
    ("pair_libp2p", "ours, 1 call, libp2p streams", "ours_pair", 2, {"direct": False}),
    ("pair_direct", "ours, 1 call, direct TLS", "ours_pair", 2, {"direct": True}),
    ("ar2_libp2p", "ours all-reduce, 2 nodes, libp2p streams", "ours_allreduce", 2, {"direct": False}),
    ("ar2_direct", "ours all-reduce, 2 nodes, direct TLS", "ours_allreduce", 2, {"direct": True}),
    ("hivemind2", "hivemind averager, 2 peers", "hivemind", 2, {}),
    ("arN_libp2p", "ours all-reduce, {n} nodes, libp2p streams", "ours_allreduce", None, {"direct": False}),
    ("arN_direct", "ours all-reduce, {n} nodes, direct TLS", "ours_allreduce", None, {"direct": True}),
    ("hivemindN", "hivemind averager, {n} peers", "hivemind", None, {}),
]


#: Measurements compared with each other run together (see `main`).
GROUPS = [
    ("raw_tcp", "pair_libp2p", "pair_direct"),
    ("ar2_libp2p", "ar2_direct", "hivemind2"),
    ("arN_libp2p", "arN_direct", "hivemindN"),
]


def available_memory() -> float:
    """MemAvailable from /proc/meminfo, in bytes (infinite if unknown)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float("inf")


def run_batch(batch: list[tuple[str, str, str, int | None, dict[str, Any]]], n: int, nbytes: int,
              args: argparse.Namespace, results: dict[str, Result]) -> None:
    """Start the measurements of `batch` together and run their rounds interleaved."""
    with contextlib.ExitStack() as stack:
        runners: list[tuple[str, Any]] = []
        for key, label, kind, nodes, options in batch:
            if kind == "raw_tcp":
                runner: Any = stack.enter_context(RawTCP(nbytes))
            else:
                opts = (dict(options, loop=args.loop, log_level=args.log_level) if kind != "hivemind"
                        else dict(options))
                runner = stack.enter_context(Cluster(kind, nodes or n, nbytes, opts))
            runner.prepare()
            runners.append((key, runner))
            results[key] = Result(label.format(n=n), [], [], nbytes)
        for step in range(args.repeats + 1):  # round 0 is the warm-up
            for key, runner in runners:
                elapsed, cpu, ok = runner.round(step)
                if step > 0:
                    r = results[key]
                    r.times.append(elapsed)
                    r.cpus.append(cpu)
                    r.ok = r.ok and ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="model size in MB (10^6 bytes); default 100")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement; default 5")
    parser.add_argument("--nodes", type=int, default=8, help="peers of the large all-reduces; default 8")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="event loop of our nodes; default asyncio")
    parser.add_argument("--log-level", default="WARNING", help="log level of our nodes; default WARNING")
    keys = [key for key, *_ in PLAN]
    parser.add_argument("--only", nargs="*", choices=keys, help="run only these measurements")
    parser.add_argument("--skip", nargs="*", choices=keys, default=[], help="skip these measurements")
    args = parser.parse_args(argv)
    nbytes = int(args.mb * MB) // 4 * 4
    n = args.nodes
    info = machine()
    with contextlib.suppress(OSError):
        info["load average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"model: {nbytes / MB:.1f} MB float32, median of {args.repeats} (after one warm-up), "
          f"loop={args.loop}")
    cmd = ["python", "benchmarks/transport.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"command: {' '.join(cmd)}")

    # The measurements of one group run side by side, their rounds interleaved (a, b, c, a, b, c, ...), so
    # that load from other programs on the machine affects each of them alike and the ratios hold.
    results: dict[str, Result] = {}
    for group in GROUPS:
        chosen = [entry for entry in PLAN if entry[0] in group and entry[0] not in args.skip
                  and (not args.only or entry[0] in args.only)]
        if not chosen:
            continue
        # Side by side only when memory allows (about 1.5 GB per worker at 100 MB: torch, the model,
        # buffers); otherwise one after another.
        workers = sum(nodes or n for _, _, _, nodes, _ in chosen)
        need = workers * (0.6e9 + 9 * nbytes) + 2e9
        batches = [chosen] if available_memory() > need else [[entry] for entry in chosen]
        mode = "interleaved" if len(batches) == 1 and len(chosen) > 1 else "one after another"
        print(f"running {', '.join(key for key, *_ in chosen)} ({mode}) ...", flush=True)
        for batch in batches:
            run_batch(batch, n, nbytes, args, results)
        for key, *_ in chosen:
            r = results[key]
            print(f"  {r.name}: {r.median:.3f} s, {r.mbps:,.0f} MB/s, {r.cpu_per_gb:.1f} CPU s/GB"
                  f"{'' if r.ok else '  (VALUES WRONG: not every slice was averaged)'}", flush=True)

    print()
    print("| path | median s | MB/s | CPU s/GB | values right | runs (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results.values():
        runs = ", ".join(f"{t:.3f}" for t in r.times)
        print(f"| {r.name} | {r.median:.3f} | {r.mbps:,.0f} | {r.cpu_per_gb:.1f} | {'yes' if r.ok else 'NO'} "
              f"| {runs} |")
    print()
    raw = results.get("raw_tcp")
    for key in ("pair_libp2p", "pair_direct"):
        if raw and key in results:
            ratio = results[key].mbps / raw.mbps
            print(f"{results[key].name} / raw TCP (MB/s): {ratio:.2f} (target >= 0.50)")
    for hkey, peers in (("hivemind2", 2), ("hivemindN", n)):
        for channel in ("libp2p", "direct"):
            okey = f"ar{'2' if hkey == 'hivemind2' else 'N'}_{channel}"
            if hkey in results and okey in results:
                ratio = results[hkey].median / results[okey].median
                print(f"hivemind / ours ({channel}), all-reduce time, {peers} peers: {ratio:.1f}x "
                      "(target >= 5x)")


if __name__ == "__main__":
    main()
