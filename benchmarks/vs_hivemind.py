"""Compressed averaging side by side: hivemind's DecentralizedAverager against our transport.

Run from the repository root::

    python benchmarks/vs_hivemind.py                      # 100 MB, 2 and 8 peers, medians of 3
    python benchmarks/vs_hivemind.py --mb 4 --peers 2 --repeats 2

One float32 tensor (``--mb`` MB, 25M elements at 100 MB) is averaged among N peers (``--peers``), each
peer its own OS process on 127.0.0.1 with its own p2pd. Peer ``r`` holds ``randn`` values drawn from
seed ``r``, so that lossy compression has something to lose; every peer must end with the average of
all N. Compared, per N and per format:

- ``hivemind``: hivemind 1.1.12's `DecentralizedAverager` (one DHT per peer, all N peers in one group,
  one all-reduce step) with ``compression=Float16Compression()`` (fp16) or
  ``Uniform8BitQuantization()`` (int8: hivemind 1.1.12 has no class named ``Uint8Quantization``; its
  8-bit formats are ``Uniform8BitQuantization``, 256 uniform bins over +-3 sigma with a 256-entry
  codebook per part, ``Quantile8BitQuantization`` (``--hivemind-int8 quantile``), and
  ``BlockwiseQuantization``, which needs bitsandbytes). Its pattern is the butterfly all-reduce: peer j
  owns 1/N of the tensor; every peer streams each owner that owner's part, compressed (reduce-scatter),
  and the owner streams back the averaged part minus the sender's own, compressed again (all-gather):
  each peer sends 2 (N-1)/N of the compressed tensor. Matchmaking is not timed: each peer schedules a
  step with ``require_trigger=True`` and waits until its group is formed before the clock starts.
- ``ours butterfly``: the same all-reduce on `P2PTransport` (what nodes use: libp2p streams, and the
  direct TLS channel for messages of 1 MiB or more) with our formats (`p2pnode.transport.compression`:
  ``fp16``, ``int8`` blockwise with one float32 scale per 1024 elements). Slice j belongs to node j;
  every node calls every other node once with that node's slice, compressed; the owner adds the decoded
  contributions in float32 and answers every call with the averaged slice, compressed once. Each node
  sends 2 (N-1)/N of the compressed tensor, as in hivemind; the owner keeps its own slice exact.
  ``--pieces K`` sends each slice as K concurrent calls instead of one (default 1).
- ``ours all-to-all`` (``--patterns butterfly,alltoall``): every node sends its whole compressed tensor
  to every other node (the pattern of a gossip push to everyone) and averages what it got with its own;
  each node sends (N-1) compressed tensors, so it only matches the butterfly's bytes at N = 2.

Per configuration (median over ``--repeats`` timed steps after one warm-up step):

- ``TCP MB/peer``: TCP payload bytes sent per peer during the step, measured the same way for both:
  ``ss -tinp`` (the kernel's ``tcpi_bytes_sent``) read before the clock starts and after every peer is
  done, summed over the TCP sockets of each peer's process tree (worker, DHT and averager processes,
  p2pd), then averaged over peers. It includes every framing the bytes get on the way (protobuf, yamux,
  noise / TLS records, libp2p control and ticket messages). A socket opened and closed within the step
  would be missed; ours reuses its connections (and the warm-up opens them), hivemind's p2pd keeps its.
- ``ours accounted MB/peer``: our transport's own accounting, ``stats.bytes_sent`` (whole encoded messages).
- ``ideal MB/peer``: the compressed tensor bytes the pattern must send (2 (N-1)/N or N-1 times 2 bytes
  per element for fp16, 1 + 4/1024 for our int8, 1 for hivemind's codes plus its codebooks).
- ``time s``: wall time of the step from a barrier to the slowest peer's result.
- ``max abs err``: the largest ``|result - exact|`` over all elements and all peers, where ``exact`` is
  the float64 average of the N inputs; the median over steps, and the worst step (hivemind reports
  success for a step in which a part from a peer was missing and left at the local values: that step's
  error is of the order of the values themselves, and only the worst-step column shows it).
- ``CPU s``: user + system CPU time of every process involved during the step (the machine may be
  loaded by other work: this depends much less on that load than wall time does).

Measurements of the same N run side by side and their steps interleaved (hivemind fp16, ours fp16,
hivemind int8, ours int8, ...), so that load from other programs falls on both alike; when memory is
short the two clusters run one after the other. Ratios are ours / hivemind (bytes, time, error: < 1 is
ours smaller / faster); "speedup" is hivemind time / ours time, "CPU hivemind/ours" likewise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from benchmarks.cluster import (  # noqa: E402
    MAX_PIECES,
    MB,
    Butterfly,
    Cluster,
    Sums,
    WorkerSpec,
    allreduce,
    available_memory,
    await_trigger,
    descendants,
    dht_info,
    hivemind_dht,
    machine_line,
    start_transport,
    timed,
    timed_async,
)

#: Longest wait for a worker to start (import torch, start p2pd / DHT), in seconds.
START_TIMEOUT = 180.0
#: Longest wait for matchmaking or one timed step, in seconds.
STEP_TIMEOUT = 300.0
#: Our int8 block (elements per float32 scale); the default of `p2pnode.transport.compression`.
INT8_BLOCK = 1024
FORMATS = ("fp16", "int8")
PATTERNS = ("butterfly", "alltoall")


def peer_values(numel: int, rank: int) -> Any:
    """Peer `rank`'s input: float32 standard normal values from seed ``rank``."""
    import torch

    gen = torch.Generator().manual_seed(rank)
    return torch.randn(numel, generator=gen, dtype=torch.float32)


def max_abs_error(result: Any, exact_path: str) -> float:
    """max |result - exact| with `exact` the float64 file at `exact_path`, read in pieces."""
    import numpy as np

    exact = np.memmap(exact_path, dtype=np.float64, mode="r")
    got = result.numpy()
    worst = 0.0
    step = 1 << 20
    for a in range(0, got.size, step):
        worst = max(worst, float(np.max(np.abs(got[a:a + step].astype(np.float64) - exact[a:a + step]))))
    return worst


# ------------------------------------------------------------------------------------------------
# workers
# ------------------------------------------------------------------------------------------------
def worker_main(spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    """Every worker: set up, report ``ready``; ``arm`` / ``fire`` per step; ``stop``."""
    import torch

    # One intra-op thread: more OpenMP workers spin after each op and take the CPU that p2pd needs.
    torch.set_num_threads(1)
    if spec.kind == "hivemind":
        hivemind_worker(spec, conn, barrier)
    else:
        asyncio.run(ours_worker(spec, conn, barrier))


def patch_hivemind_quantization() -> None:
    """Make hivemind 1.1.12's 8-bit formats decode under NumPy 2.

    ``Quantization.extract`` reads the codebook size with ``int(np.frombuffer(..., count=1))``, a 1-element
    array, which NumPy 2.4 (installed here; deprecated since 1.25) refuses (``TypeError: only
    0-dimensional arrays can be converted to Python scalars``). The
    averager catches the error per part and still reports success, with every part that came from a
    peer left out (the tensor is then averaged only over the peer's own share). This is the same method
    with ``[0]``; done in the worker before its averagers fork, so they inherit it.
    """
    import numpy as np
    import torch
    from hivemind.compression.quantization import Quantization

    def extract(self: Any, serialized_tensor: Any) -> torch.Tensor:
        codebook_size = int(np.frombuffer(serialized_tensor.buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(serialized_tensor.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(serialized_tensor.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized_t = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        codebook_t = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook_t[quantized_t].requires_grad_(serialized_tensor.requires_grad)

    Quantization.extract = extract  # type: ignore[method-assign]


def hivemind_worker(spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    import hivemind
    from hivemind.compression import Float16Compression, Quantile8BitQuantization, Uniform8BitQuantization

    if not spec.options.get("hivemind_unpatched"):
        patch_hivemind_quantization()
    int8 = Quantile8BitQuantization if spec.options.get("hivemind_int8") == "quantile" else Uniform8BitQuantization
    formats = {"fp16": Float16Compression(), "int8": int8()}
    dht = hivemind_dht(spec)
    original = peer_values(spec.options["numel"], spec.rank)
    averagers: dict[str, Any] = {}
    try:
        for fmt in spec.options["formats"]:
            # One averager per format on the same DHT (distinct prefixes: distinct groups and handlers).
            averagers[fmt] = hivemind.averaging.DecentralizedAverager(
                [original.clone()], dht, prefix=f"bench_{fmt}", target_group_size=spec.n, min_group_size=spec.n,
                min_matchmaking_time=spec.options.get("matchmaking_s", 3.0), request_timeout=30.0,
                compression=formats[fmt], start=True)
        conn.send(("ready", dht_info(dht)))
        control = None
        averager = None
        while True:
            msg, arg = conn.recv()
            if msg == "peers":
                conn.send(("ok", None))
            elif msg == "arm":
                averager = averagers[arg["format"]]
                with averager.get_tensors() as tensors:
                    tensors[0].copy_(original)
                control = await_trigger(averager, STEP_TIMEOUT)
                conn.send(("armed", None))
            elif msg == "fire":
                assert control is not None and averager is not None
                elapsed, cpu = timed(barrier, STEP_TIMEOUT, allreduce, control, STEP_TIMEOUT)
                with averager.get_tensors() as tensors:
                    err = max_abs_error(tensors[0], spec.options["exact_path"])
                conn.send(("done", (elapsed, err, cpu, 0)))
            elif msg == "stop":
                break
    finally:
        for averager in averagers.values():
            averager.shutdown()
        dht.shutdown()
    conn.send(("bye", None))


async def ours_worker(spec: WorkerSpec, conn: Connection, barrier: Any) -> None:
    import torch

    from p2pnode.proto import peer_pb2
    from p2pnode.transport.codec import Message
    from p2pnode.transport.compression import Compression, compress

    formats = {"fp16": Compression("fp16"), "int8": Compression("int8", block_size=INT8_BLOCK)}
    transport = await start_transport(spec)
    n, numel = spec.n, spec.options["numel"]
    original = peer_values(numel, spec.rank)
    butterfly = Butterfly(transport, original, spec.rank, n, timeout=STEP_TIMEOUT,
                          pieces=int(spec.options.get("pieces", 1)))
    #: All-to-all: the sum of the whole tensors of one step (message id ``step * MAX_PIECES``).
    pushed = Sums(n, lambda wire_id: original)
    current: dict[str, Any] = {}

    async def push(sender: str, request: Message[Any]) -> Message[Any]:
        """All-to-all: add a peer's whole tensor to my sum."""
        pushed[request.body.round].add(request.tensors["x"])
        return Message(peer_pb2.Pong(round=request.body.round))

    butterfly.register()
    transport.register("bench.push", peer_pb2.ModelExchange, push)
    conn.send(("ready", (transport.peer_id, transport.addresses())))
    peers: list[str] = []
    out = torch.empty_like(original)

    async def all_to_all(step: int, c: Compression) -> None:
        """Send my whole tensor, compressed once, to every other node; average what they sent me."""
        mine = pushed[step * MAX_PIECES]
        sent = compress(original, c)
        request = Message(peer_pb2.ModelExchange(round=step * MAX_PIECES), compressed={"x": sent})
        await asyncio.gather(*(transport.call(peers[j], "bench.push", request, peer_pb2.Pong, timeout=STEP_TIMEOUT)
                               for j in range(n) if j != spec.rank))
        async with asyncio.timeout(STEP_TIMEOUT):
            await mine.done.wait()
        out.copy_(mine.acc)

    try:
        while True:
            msg, arg = await asyncio.to_thread(conn.recv)
            if msg == "peers":
                peers = [pid for pid, _ in arg]
                conn.send(("ok", None))
            elif msg == "arm":
                current.update(arg)
                # Set on every node before any node fires: the owners answer in the step's format.
                butterfly.compression = formats[current["format"]]
                conn.send(("armed", None))
            elif msg == "fire":
                sent0 = transport.stats.bytes_sent
                if current["pattern"] == "butterfly":
                    elapsed, cpu = await timed_async(barrier, STEP_TIMEOUT, butterfly.run, current["step"], peers, out)
                else:
                    elapsed, cpu = await timed_async(barrier, STEP_TIMEOUT, all_to_all, current["step"],
                                                     formats[current["format"]])
                err = max_abs_error(out, spec.options["exact_path"])
                conn.send(("done", (elapsed, err, cpu, transport.stats.bytes_sent - sent0)))
            elif msg == "stop":
                break
    finally:
        await transport.shutdown()
    conn.send(("bye", None))


# ------------------------------------------------------------------------------------------------
# TCP byte counting
# ------------------------------------------------------------------------------------------------
_USERS = re.compile(r"pid=(\d+)")
_SENT = re.compile(r"\bbytes_sent:(\d+)")


def tcp_sent() -> dict[tuple[str, str, int], int]:
    """(local address, peer address, owning pid) -> bytes sent so far, of every established TCP socket."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True,
                         check=True).stdout
    table: dict[tuple[str, str, int], int] = {}
    key: tuple[str, str, int] | None = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            cols = line.split()
            pid = _USERS.search(line)
            # With "state established" ss leaves out the state column: recv-q, send-q, local, peer, users.
            key = (cols[2], cols[3], int(pid.group(1))) if pid and len(cols) >= 4 else None
        elif key is not None:
            sent = _SENT.search(line)
            table[key] = int(sent.group(1)) if sent else 0
            key = None
    return table


def sent_per_root(before: dict[tuple[str, str, int], int], after: dict[tuple[str, str, int], int],
                  owner: dict[int, int]) -> dict[int, int]:
    """Bytes sent between two `tcp_sent` snapshots, per root process (sockets new since `before` count
    from 0)."""
    per: dict[int, int] = {}
    for key, sent in after.items():
        root = owner.get(key[2])
        if root is not None:
            per[root] = per.get(root, 0) + sent - before.get(key, 0)
    return per


# ------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------
class StepCluster(Cluster):
    """The N worker processes of one side: ``arm`` forms a step's group, ``fire`` runs it."""

    def __init__(self, kind: str, n: int, numel: int, exact_path: str, options: dict[str, Any]) -> None:
        super().__init__(kind, n, worker_main, dict(options, numel=numel, exact_path=exact_path),
                         start_timeout=START_TIMEOUT)

    def __enter__(self) -> StepCluster:
        super().__enter__()
        try:
            self.prepare()
        except BaseException:
            self.close()
            raise
        return self

    def step(self, config: dict[str, Any]) -> tuple[float, float, float, float, float]:
        """One timed step: (slowest peer's time, max abs error over peers, CPU s of all processes,
        TCP bytes sent per peer (mean), our accounted bytes sent per peer (mean; 0 for hivemind))."""
        self.send_all("arm", config)
        self.expect_all("armed", STEP_TIMEOUT)
        owner = descendants(p.pid for p in self.procs)
        before = tcp_sent()
        self.send_all("fire", None)
        results = self.expect_all("done", STEP_TIMEOUT)
        after = tcp_sent()
        per = sent_per_root(before, after, owner)
        tcp = sum(per.get(p.pid, 0) for p in self.procs) / self.n
        return (max(r[0] for r in results), max(r[1] for r in results), sum(r[2] for r in results), tcp,
                sum(r[3] for r in results) / self.n)


@dataclass
class Row:
    side: str  # "hivemind" or "ours <pattern>"
    fmt: str
    n: int
    ideal: float  # bytes per peer
    times: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    tcp: list[float] = field(default_factory=list)
    accounted: list[float] = field(default_factory=list)

    def add(self, result: tuple[float, float, float, float, float]) -> None:
        for values, x in zip((self.times, self.errors, self.cpus, self.tcp, self.accounted), result, strict=True):
            values.append(x)

    @property
    def time(self) -> float:
        return statistics.median(self.times)

    @property
    def error(self) -> float:
        """Max abs error of the median step (a worst step can be one where hivemind left a part out)."""
        return statistics.median(self.errors)

    @property
    def bytes(self) -> float:
        return statistics.median(self.tcp)


def ideal_bytes(side: str, fmt: str, n: int, numel: int) -> float:
    """Compressed tensor bytes one peer must send in this configuration (see the module docstring)."""
    share = 2 * (n - 1) / n if side != "ours alltoall" else float(n - 1)
    if fmt == "fp16":
        per_element = 2.0
    elif side == "hivemind":
        per_element = 1.0  # plus 256 float32 codebook entries per part of at most 512 KiB, negligible
    else:
        per_element = 1.0 + 4.0 / INT8_BLOCK
    return share * numel * per_element


def write_exact(numel: int, n: int, path: str) -> None:
    """The float64 average of the N peers' inputs, written to `path` (raw little-endian float64)."""
    import torch

    total = torch.zeros(numel, dtype=torch.float64)
    for rank in range(n):
        total += peer_values(numel, rank).double()
    total /= n
    total.numpy().tofile(path)


def run_steps(clusters: dict[str, StepCluster], sides: list[tuple[str, str, dict[str, Any]]],
              args: argparse.Namespace, mine: dict[str, list[Row]]) -> None:
    """Run a warm-up step and ``args.repeats`` timed steps of every (format, side) whose cluster is up,
    interleaved: for each repeat, each format, each side in turn."""
    seq = 0  # the id of each step on the wire: unique per cluster
    for step in range(args.repeats + 1):  # step 0 is the warm-up
        for i, fmt in enumerate(args.formats):
            for side, kind, _ in sides:
                if kind not in clusters:
                    continue
                seq += 1
                result = clusters[kind].step({"format": fmt, "step": seq, "pattern": side.split()[-1]})
                if step > 0:
                    mine[side][i].add(result)
                print(f"  step {step} {side} {fmt}: {result[0]:.3f} s, {result[3] / MB:.2f} TCP MB/peer, "
                      f"err {result[1]:.2e}", flush=True)


def run_n(n: int, numel: int, args: argparse.Namespace, rows: list[Row]) -> None:
    fd, exact_path = tempfile.mkstemp(prefix="p2pnode-vs-hivemind-", suffix=".f64",
                                      dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.close(fd)
    try:
        write_exact(numel, n, exact_path)
        hm_opts = {"formats": args.formats, "matchmaking_s": args.matchmaking_s, "hivemind_int8": args.hivemind_int8,
                   "log_level": args.log_level, "hivemind_unpatched": args.hivemind_unpatched}
        ours_opts = {"log_level": args.log_level, "pieces": args.pieces}
        sides: list[tuple[str, str, dict[str, Any]]] = [("hivemind", "hivemind", hm_opts)]
        sides += [(f"ours {p}", "ours", ours_opts) for p in args.patterns]
        mine = {side: [Row(side, fmt, n, ideal_bytes(side, fmt, n, numel)) for fmt in args.formats]
                for side, _, _ in sides}
        # About 1 GB per worker at 100 MB (torch, the inputs, the averagers' copies, buffers) plus headroom.
        need = 2 * n * (0.5e9 + 8 * numel * 4) + 2e9
        together = available_memory() > need
        print(f"{n} peers: hivemind and ours {'side by side, steps interleaved' if together else 'one after the other'}"
              , flush=True)
        if together:
            with StepCluster("hivemind", n, numel, exact_path, hm_opts) as hm, \
                    StepCluster("ours", n, numel, exact_path, ours_opts) as ours:
                run_steps({"hivemind": hm, "ours": ours}, sides, args, mine)
        else:
            for kind, opts in (("hivemind", hm_opts), ("ours", ours_opts)):
                with StepCluster(kind, n, numel, exact_path, opts) as cluster:
                    run_steps({kind: cluster}, sides, args, mine)
        for side, _, _ in sides:
            rows += mine[side]
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(exact_path)


def print_table(rows: list[Row]) -> None:
    print()
    print("| peers | format | side | time s (median) | TCP MB/peer | ours accounted MB/peer | ideal MB/peer "
          "| max abs err (median step) | max abs err (worst step) | CPU s | times (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        acc = f"{statistics.median(r.accounted) / MB:.2f}" if r.side != "hivemind" else "-"
        print(f"| {r.n} | {r.fmt} | {r.side} | {r.time:.3f} | {r.bytes / MB:.2f} | {acc} | {r.ideal / MB:.2f} "
              f"| {r.error:.2e} | {max(r.errors):.2e} | {statistics.median(r.cpus):.2f} | "
              f"{', '.join(f'{t:.3f}' for t in r.times)} |")
    print()
    print("| peers | format | ours pattern | bytes ours/hivemind | time ours/hivemind | speedup | CPU hivemind/ours "
          "| err ours/hivemind | bytes target <= 1 | speed target >= 3x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r.side == "hivemind":
            continue
        h = next(x for x in rows if x.side == "hivemind" and x.n == r.n and x.fmt == r.fmt)
        b, t = r.bytes / h.bytes, r.time / h.time
        e = r.error / h.error if h.error > 0 else math.inf
        cpu = statistics.median(h.cpus) / max(statistics.median(r.cpus), 1e-9)
        print(f"| {r.n} | {r.fmt} | {r.side.split()[-1]} | {b:.3f} | {t:.3f} | {1 / t:.1f}x | {cpu:.1f}x | {e:.3f} "
              f"| {'met' if b <= 1 else 'NOT met'} | {'met' if 1 / t >= 3 else 'NOT met'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="tensor size in MB (10^6 bytes); default 100")
    parser.add_argument("--peers", default="2,8", help="comma-separated group sizes; default 2,8")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration; default 3")
    parser.add_argument("--formats", default="fp16,int8", help="comma-separated: fp16, int8; default both")
    parser.add_argument("--patterns", default="butterfly",
                        help="our patterns, comma-separated: butterfly, alltoall; default butterfly")
    parser.add_argument("--pieces", type=int, default=1,
                        help=f"our butterfly: calls per slice (1..{MAX_PIECES}), concurrent, so that the "
                             "reduce and the gather of different pieces overlap; default 1")
    parser.add_argument("--hivemind-int8", choices=["uniform", "quantile"], default="uniform",
                        help="hivemind's 8-bit format: Uniform8BitQuantization (default) or Quantile8BitQuantization")
    parser.add_argument("--hivemind-unpatched", action="store_true",
                        help="run hivemind's 8-bit decoding as shipped (fails under NumPy 2: see "
                             "patch_hivemind_quantization)")
    parser.add_argument("--matchmaking-s", type=float, default=3.0,
                        help="hivemind's min_matchmaking_time (not timed), in seconds; default 3")
    parser.add_argument("--log-level", default="WARNING", help="log level of the workers; default WARNING")
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    peers = [int(p) for p in args.peers.split(",") if p.strip()]
    if not set(args.formats) <= set(FORMATS) or not set(args.patterns) <= set(PATTERNS) or not args.formats:
        parser.error(f"formats must be among {FORMATS}, patterns among {PATTERNS}")
    if not 1 <= args.pieces <= MAX_PIECES:
        parser.error(f"--pieces must be in [1, {MAX_PIECES}]")
    if any(p < 2 for p in peers) or args.repeats < 1:
        parser.error("every group needs at least 2 peers, and --repeats must be >= 1")
    numel = int(args.mb * MB) // 4
    print(machine_line())
    print(f"tensor: {numel:,} float32 ({numel * 4 / MB:.1f} MB), randn per peer; median of {args.repeats} "
          f"(after one warm-up); hivemind int8 = {args.hivemind_int8}; ours int8 = blocks of {INT8_BLOCK}")
    cmd = ["python", "benchmarks/vs_hivemind.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"command: {' '.join(cmd)}")
    rows: list[Row] = []
    for n in peers:
        run_n(n, numel, args, rows)
    print_table(rows)


if __name__ == "__main__":
    main()
