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
  (`benchmarks.cluster.Butterfly`, which `vs_hivemind.py` runs with compression.)

MB are 10^6 bytes; "MB/s" is the model size divided by the time (for the all-reduces: model bytes per
second of all-reduce, the "algorithm bandwidth"). Ratios: ours_pair / raw_tcp (bandwidth) and
hivemind<N> / ours_allreduce<N> (time, so > 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from benchmarks.cluster import (  # noqa: E402
    MB,
    Butterfly,
    Cluster,
    WorkerSpec,
    allreduce,
    available_memory,
    await_trigger,
    dht_info,
    hivemind_dht,
    machine_line,
    own_cpu,
    start_transport,
    timed,
    timed_async,
    tree_cpu,
)

#: Longest wait for a worker to start (import torch, start p2pd / DHT), in seconds.
START_TIMEOUT = 120.0
#: Longest wait for one timed round, in seconds.
ROUND_TIMEOUT = 300.0


# ------------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------------
def worker_main(spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    """Every worker: set up, report ``ready``, run rounds on ``go``, exit on ``stop``."""
    if spec.kind in ("ours_pair", "ours_allreduce"):
        run_loop(spec.options.get("loop", "asyncio"), ours_worker(spec, conn, barrier))
    elif spec.kind == "hivemind":
        hivemind_worker(spec, conn, barrier)
    elif spec.kind == "raw_tcp":
        raw_tcp_receiver(spec, conn)
    else:
        raise ValueError(spec.kind)


def run_loop(loop: str, coro: Any) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


def model_tensor(nbytes: int, value: float) -> Any:
    import torch

    return torch.full((nbytes // 4,), float(value), dtype=torch.float32)


class RoundCluster(Cluster):
    """The workers of one measurement: ``go`` starts a round, each answers ``done``."""

    def __init__(self, kind: str, n: int, nbytes: int, options: dict[str, Any]) -> None:
        super().__init__(kind, n, worker_main, dict(options, nbytes=nbytes), start_timeout=START_TIMEOUT)

    def round(self, step: int) -> tuple[float, float, bool]:
        """Run one round: the slowest worker's time, the CPU seconds of all workers and their child
        processes together, and whether every worker ended with the right values."""
        self.send_all("go", step)
        results = self.expect_all("done", ROUND_TIMEOUT)
        return (max(t for t, _, _ in results), sum(c for _, _, c in results),
                all(ok for _, ok, _ in results))


# -- raw TCP -------------------------------------------------------------------------------------
def raw_tcp_receiver(spec: WorkerSpec, conn: Connection) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    conn.send(("ready", srv.getsockname()[1]))
    sock, _ = srv.accept()
    srv.close()
    buf = bytearray(spec.options["nbytes"])
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
        self.cluster = RoundCluster("raw_tcp", 1, nbytes, {})
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

    # One intra-op thread: with more, OpenMP workers spin after every tensor op and take the CPU that p2pd
    # needs (on 2 cores this slowed the all-reduce several times over).
    torch.set_num_threads(1)
    transport = await start_transport(spec)
    try:
        nbytes = spec.options["nbytes"]
        numel = nbytes // 4
        original = model_tensor(nbytes, spec.rank)
        out = torch.empty_like(original)
        butterfly = Butterfly(transport, original, spec.rank, spec.n, timeout=ROUND_TIMEOUT)

        async def sink(sender: str, request: Message[Any]) -> Message[Any]:
            if request.tensors["x"].numel() != numel:
                raise ValueError("truncated model")
            return Message(peer_pb2.Pong(round=request.body.round))

        butterfly.register()
        transport.register("bench.sink", peer_pb2.ModelExchange, sink)
        conn.send(("ready", (transport.peer_id, transport.addresses())))
        peers: list[str] = []

        async def pair(step: int) -> None:
            if spec.rank == 1:
                await transport.call(peers[0], "bench.sink",
                                     Message(peer_pb2.ModelExchange(round=step), {"x": original}),
                                     peer_pb2.Pong, timeout=ROUND_TIMEOUT)

        while True:
            msg, arg = await asyncio.to_thread(conn.recv)
            if msg == "peers":
                peers = [pid for pid, _ in arg]
                conn.send(("ok", None))
            elif msg == "go":
                step = arg
                if spec.kind == "ours_pair":
                    elapsed, cpu = await timed_async(barrier, ROUND_TIMEOUT, pair, step)
                    ok = True
                else:
                    elapsed, cpu = await timed_async(barrier, ROUND_TIMEOUT, butterfly.run, step, peers, out)
                    # checked outside the timed part
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

    dht = hivemind_dht(spec)
    averager = None
    try:
        tensor = model_tensor(spec.options["nbytes"], spec.rank)
        averager = hivemind.averaging.DecentralizedAverager(
            [tensor], dht, prefix="bench", target_group_size=spec.n, min_group_size=spec.n,
            min_matchmaking_time=spec.options.get("matchmaking_s", 3.0), request_timeout=10.0, start=True)
        conn.send(("ready", dht_info(dht)))
        expected = (spec.n - 1) / 2
        while True:
            msg, _ = conn.recv()
            if msg == "peers":
                conn.send(("ok", None))
            elif msg == "go":
                with averager.get_tensors() as tensors:
                    tensors[0].fill_(float(spec.rank))
                barrier.wait(ROUND_TIMEOUT)
                control = await_trigger(averager, ROUND_TIMEOUT)
                elapsed, cpu = timed(barrier, ROUND_TIMEOUT, allreduce, control, ROUND_TIMEOUT)
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
                runner = stack.enter_context(RoundCluster(kind, nodes or n, nbytes, opts))
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
    print(machine_line())
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
