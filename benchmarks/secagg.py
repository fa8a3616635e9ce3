"""Secure aggregation: a secure round against a plain round over the same transport, and the mask generator.

Run from the repository root::

    python benchmarks/secagg.py                      # s = 10 peers, d = 1M and 10M, medians of 3
    python benchmarks/secagg.py --dims 1000000 --peers 20 --repeats 5

What is measured. Both rounds run among ``--peers`` users and one aggregator, each with its own
`MemoryTransport` on one `MemoryNetwork` (links: 5 ms, ``--mbit`` Mbit/s (default 100), uplink FIFO)
on the virtual clock, all in this one process and thread:

- ``plain``: every user sends its float32 vector of d coordinates to the aggregator (one call, the
  tensor as raw bytes); the aggregator adds each arrival into a float32 sum and answers once all are in.
- ``secure``: the real protocol (`p2pnode.secagg.run_instance`): complete graph, t = 7 of 10 (2/3 + 1),
  modulus 2^32, 2^22 levels, AES-256-CTR masks, no dropouts.

Figures per round (medians over ``--repeats`` after one warm-up round):

- ``wall_s``: wall-clock seconds of the whole in-process round: all parties one after the other
  (users' keys, shares, masks and encoding; the aggregator's sums, reconstruction and decoding; the
  in-memory network's message copies). Network time is not in it (virtual clock). On a shared machine
  other tenants inflate it.
- ``cpu_s``: the process CPU seconds of the same round (``time.process_time``): the work itself,
  whatever else the machine runs.
- ``net_s``: the round's duration on the virtual clock: the network model alone, CPU counted as zero.
- ``user_s``: the slowest user's protocol CPU seconds (``UserReport.compute_s``, thread CPU time);
  ``mask_s`` the part of it spent on masks and rounding noise, which do not depend on the input and run
  while a MoDeST trainer trains; ``input_s`` the largest CPU time of a user after its input was
  available (``UserReport.input_s``: encoding the input into the masks, the survivor check, revealing
  shares): everything else a user computes (keys, shares, masks, noise) runs before it awaits the input.
- ``agg_s``: the aggregator's protocol CPU seconds (``SecAggResult.compute_s``; plain: the additions,
  measured the same way).
- ``round_s``: the modelled duration of a round in a deployment where every party has its own CPU:
  ``net_s + user critical path + agg_s``, where the user critical path is ``input_s`` (the work before
  the input overlapped with training) and, in brackets, ``user_s`` (nothing overlapped). All of
  ``agg_s`` counts after ``net_s``: the model's uploads all end at the same time, so the additions of
  the inputs, though done on arrival, overlap nothing.
- ``bytes``: all bytes the network carried (requests and responses, envelopes included).

The mask generator's throughput is `MaskGenerator.apply` on a d-word accumulator (keystream generation
plus the modular addition), in GB of mask per CPU second (thread time; median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from benchmarks.machine import commit, cpu_model  # noqa: E402
from p2pnode.proto import peer_pb2  # noqa: E402
from p2pnode.secagg import SecAggSettings, run_instance  # noqa: E402
from p2pnode.secagg.prg import ALGORITHMS, MaskGenerator  # noqa: E402
from p2pnode.transport.clock import run_virtual  # noqa: E402
from p2pnode.transport.codec import Message  # noqa: E402
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel  # noqa: E402


def machine() -> str:
    """CPU model, cores, commit and versions: these figures depend on all of them."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu_model()}, {os.cpu_count()} cores, load {load}; Python {platform.python_version()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch threads; commit {commit()}")


def network(mbit: float) -> MemoryNetwork:
    """The in-memory network with every link at `mbit` Mbit/s and 5 ms."""
    return MemoryNetwork(NetworkModel(LinkModel(latency_s=0.005, bandwidth_bytes_per_s=mbit * 125_000)))


async def plain_round(xs: list[torch.Tensor], mbit: float) -> dict[str, float]:
    """Users send float32 vectors; the aggregator sums them and answers when all are in."""
    net = network(mbit)
    agg = net.transport("aggregator")
    n = len(xs)
    total = torch.zeros_like(xs[0])
    arrived = asyncio.Event()
    count = 0
    agg_s = 0.0

    async def handler(sender: str, msg: Message[Any]) -> Message[Any]:
        nonlocal count, agg_s
        t0 = time.thread_time()
        total.add_(msg.tensors["x"])
        agg_s += time.thread_time() - t0
        count += 1
        if count == n:
            arrived.set()
        await arrived.wait()
        return Message(peer_pb2.Pong(round=count))

    agg.register("plain.sum", peer_pb2.Ping, handler)
    users = [net.transport(f"user-{i:02d}") for i in range(n)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(u.call("aggregator", "plain.sum", Message(peer_pb2.Ping(round=0), {"x": x}),
                                  peer_pb2.Pong, 600.0) for u, x in zip(users, xs, strict=True)))
    return {"net_s": loop.time() - start, "user_s": 0.0, "mask_s": 0.0, "input_s": 0.0, "agg_s": agg_s,
            "bytes": float(net.bytes_sent_total)}


async def secure_round(xs: list[torch.Tensor], mbit: float) -> dict[str, float]:
    net = network(mbit)
    out = await run_instance(xs, SecAggSettings(), network=net, seed=1)
    assert out.result is not None, out.error
    slowest = max(out.reports, key=lambda r: r.compute_s)
    return {"net_s": out.elapsed_s, "user_s": slowest.compute_s, "mask_s": slowest.mask_s,
            "input_s": max(r.input_s for r in out.reports),
            "agg_s": out.result.compute_s, "bytes": float(net.bytes_sent_total)}


def timed(kind: str, xs: list[torch.Tensor], mbit: float) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    r = run_virtual(plain_round(xs, mbit) if kind == "plain" else secure_round(xs, mbit))
    r["wall_s"] = time.perf_counter() - t0
    r["cpu_s"] = time.process_time() - c0
    r["round_s"] = r["net_s"] + r["input_s"] + r["agg_s"]
    r["round_nooverlap_s"] = r["net_s"] + r["user_s"] + r["agg_s"]
    return r


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def prg_throughput(d: int, repeats: int) -> dict[str, float]:
    acc = np.zeros(d, dtype=np.uint32)
    out = {}
    for alg in ALGORITHMS:
        gen = MaskGenerator(alg, 32)
        best = []
        for r in range(repeats + 1):
            t0 = time.thread_time()
            gen.apply(acc, bytes([r]) * 32, 1)
            best.append(time.thread_time() - t0)
        out[alg] = 4 * d / statistics.median(best[1:]) / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    ap.add_argument("--dims", default="1000000,10000000", help="comma-separated vector lengths d")
    ap.add_argument("--peers", type=int, default=10, help="users per round (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per figure (default 3)")
    ap.add_argument("--mbit", type=float, default=100.0, help="link bandwidth in Mbit/s (default 100)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: every party is one thread, as on its own machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"peers={args.peers}, repeats={args.repeats}, links 5 ms / {args.mbit:g} Mbit/s, uplink FIFO\n")
    for d in (int(x) for x in args.dims.split(",")):
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(d, generator=g) for _ in range(args.peers)]
        res: dict[str, dict[str, float]] = {}
        for kind in ("plain", "secure"):
            timed(kind, xs, args.mbit)  # warm-up
            res[kind] = median_of([timed(kind, xs, args.mbit) for _ in range(args.repeats)])
        print(f"d = {d:,}")
        print(f"  {'':8} {'wall_s':>8} {'cpu_s':>8} {'net_s':>8} {'user_s':>8} {'mask_s':>8} {'input_s':>8} "
              f"{'agg_s':>8} {'round_s':>16} {'MB':>10}")
        for kind, r in res.items():
            print(f"  {kind:8} {r['wall_s']:8.3f} {r['cpu_s']:8.3f} {r['net_s']:8.3f} {r['user_s']:8.3f} "
                  f"{r['mask_s']:8.3f} {r['input_s']:8.3f} {r['agg_s']:8.3f} {r['round_s']:7.3f} "
                  f"({r['round_nooverlap_s']:6.3f}) "
                  f"{r['bytes'] / 1e6:10.3f}")
        p, s = res["plain"], res["secure"]
        print(f"  secure / plain: wall {s['wall_s'] / p['wall_s']:.2f}x, cpu {s['cpu_s'] / p['cpu_s']:.2f}x, "
              f"modelled round {s['round_s'] / p['round_s']:.3f}x "
              f"({s['round_nooverlap_s'] / p['round_nooverlap_s']:.3f}x without overlap), "
              f"bytes {s['bytes'] / p['bytes']:.4f}x")
        tp = prg_throughput(d, args.repeats)
        print("  mask generator: " + ", ".join(f"{a} {v:.2f} GB/s" for a, v in tp.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
