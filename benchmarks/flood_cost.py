"""What one request with a huge method name costs the node that refuses it, in CPU per request.

Run from the repository root::

    python benchmarks/flood_cost.py                   # 8 s of 2 MB method names
    python benchmarks/flood_cost.py --name-bytes 200000 --seconds 4

One `P2PTransport` (its own p2pd, libp2p streams only) serves in this process; a flooder in its own
(spawned) process with a bare p2pd opens a stream per request and writes a request whose method name is
``--name-bytes`` long, back to back, as `benchmarks/hostile.py`'s ``flood`` attack does, then reads the
answer (or sees the stream closed). Printed: the requests the node refused (``unknown_method``) and the
streams it held unread past the flooder's refusal budget (``tarpit``), the CPU seconds per stream of the
node's Python process, of its p2pd, and of the flooder's processes, the node's ``refused_bytes_read`` /
``refused_bytes_drained`` per refused request, and the cores each used over the flood. CPU per stream
hardly depends on the machine's load, unlike the request rate; with the refusal budget the cores used
are the figure to compare (the flooder is slowed, so per-stream costs cover few streams).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import platform
import sys
import time
from multiprocessing.connection import Connection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

from hivemind.p2p import P2P, PeerID  # noqa: E402

from benchmarks.hostile import cpu_seconds, process_tree  # noqa: E402
from benchmarks.machine import commit, cpu_model  # noqa: E402
from p2pnode.proto import peer_pb2  # noqa: E402
from p2pnode.transport import codec  # noqa: E402
from p2pnode.transport.p2p import RPC_HANDLER, P2PTransport  # noqa: E402


async def _flood(maddrs: list[str], victim: str, seconds: float, name_bytes: int, conn: Connection) -> None:
    raw = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    conn.send("ready")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        frame = codec.join(codec.encode("m" * name_bytes, peer_pb2.Ping()))  # a fresh nonce each
        with contextlib.suppress(Exception):
            _, reader, writer = await raw.call_binary_stream_handler(PeerID.from_base58(victim), RPC_HANDLER)
            try:
                writer.write(frame)
                await writer.drain()
                async with asyncio.timeout(10):
                    await reader.readexactly(codec.parse_header(await reader.readexactly(4)))
            finally:
                writer.close()
    conn.send("done")
    await raw.shutdown()


def flood_main(maddrs: list[str], victim: str, seconds: float, name_bytes: int, conn: Connection) -> None:
    """Entry point of the flooder process."""
    asyncio.run(_flood(maddrs, victim, seconds, name_bytes, conn))


async def bench(seconds: float, name_bytes: int) -> None:
    victim = await P2PTransport.create(direct=False)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=flood_main, args=(victim.addresses(), victim.peer_id, seconds, name_bytes, child))
    proc.start()
    try:
        if not await asyncio.to_thread(parent.poll, 120.0):
            raise RuntimeError("the flooder did not start within 120 s")
        parent.recv()
        me = os.getpid()
        flooder = process_tree([proc.pid or -1])
        groups = {"node python": {me}, "node p2pd": process_tree([me]) - {me} - flooder, "flooder": flooder}
        cpu0 = {k: cpu_seconds(v) for k, v in groups.items()}
        t0 = time.monotonic()
        await asyncio.to_thread(parent.recv)
        elapsed = time.monotonic() - t0
        cpu = {k: cpu_seconds(v) - cpu0[k] for k, v in groups.items()}
        await asyncio.to_thread(proc.join, 30.0)
    finally:
        if proc.is_alive():
            proc.kill()
        await victim.shutdown()
    n = victim.stats.rejected["unknown_method"]
    held = victim.stats.rejected["tarpit"]  # 0 on a tree without the refusal budget
    print(f"# machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} cpus "
          f"(load {os.getloadavg()[0]:.1f}), python {platform.python_version()}; commit {commit()}")
    print(f"# {seconds:g} s of requests with a {name_bytes}-byte method name")
    print(f"refused {n} requests ({n / elapsed:.0f}/s), held {held} streams (tarpit); per stream: "
          + ", ".join(f"{k} {v / max(n + held, 1) * 1000:.2f} ms CPU" for k, v in cpu.items())
          + f"; read {per_request(victim, 'refused_bytes_read', n)}, "
            f"drained {per_request(victim, 'refused_bytes_drained', n)} per refused request")
    print("cores used during the flood: " + ", ".join(f"{k} {v / elapsed:.3f}" for k, v in cpu.items()))


def per_request(transport: P2PTransport, counter: str, n: int) -> str:
    """A byte counter of `transport.stats` per refused request ("n/a" on a tree without the counter)."""
    value = getattr(transport.stats, counter, None)
    return "n/a" if value is None else f"{value / max(n, 1):.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the flood (default 8)")
    parser.add_argument("--name-bytes", type=int, default=2 * 1000 * 1000, help="method name length (2 MB)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(bench(args.seconds, args.name_bytes))


if __name__ == "__main__":
    main()
