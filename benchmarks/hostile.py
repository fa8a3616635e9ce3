"""A 3-node real swarm under outside attacks: round rate, memory and the counters that caught each attack.

Run from the repository root::

    python benchmarks/hostile.py                          # 8 s clean window, 8 s per attack
    python benchmarks/hostile.py --seconds 3 --attacks deep,replay

What is measured. Three in-process nodes (`create_real_node`: each with its hivemind DHT process and
p2pd on 127.0.0.1; task digits-mlp, topology gossip, 5 local steps per round so rounds are short) run
their round loops throughout. A clean window of ``--seconds`` gives the swarm's round rate (rounds
completed by all nodes together, per second), measured again right before each attack (the machine is
often shared: an attack is compared with the clean window next to it). Then each attack runs for
``--seconds`` from an outside
client that no node knows (its own process, spawned, so that it does not share the nodes' event loop; the
window starts once its DHT or p2pd is up), while the rounds go on; per attack the benchmark reports:

- ``rounds_x``: the round rate during the attack divided by the rate of the clean window just before it
  (``clean/s``);
- ``rss_mib``: the peak growth of the resident memory of the nodes' processes (this process plus each
  node's DHT process and its p2pd, sampled every 0.1 s; the outsider's own processes are not counted),
  over what they held when the attack started, in MiB;
- ``caught``: how much each refusal counter of the nodes grew (`Transport.stats.rejected` and
  `PeerDirectory.rejected`, whose ``dht_*`` reasons are the DHT processes' refusals), summed over nodes.

Attacks (DHT ones from a stock ``hivemind.DHT`` bootstrapped from node 0, a fresh one per attack;
transport ones from a bare p2pd against node 1, over raw libp2p streams of the nodes' RPC protocol):

- ``deep``: values and subkeys nested 200 tuples deep under the run's key ``<run_id>/peers``;
- ``plain``: a plain value (not a dictionary) under ``<run_id>/peers``, expiring after the records;
- ``junk``: 3,000 peer-id-like subkeys with bytes that are no record (expiring within the run's record
  lifetime, so that the replicas' validator lets them in), stored straight at each node's DHT in batches
  of 500 with a deadline each, repeated every second with a later expiration. (The subkeys are made
  inside the outsider's DHT process: hivemind's pipe to that process breaks on a message larger than the
  pipe's buffer, which is why a ``store_many`` of 3,000 subkeys sent through it never returned.)
- ``replay``: one captured request (a gossip exchange without a model) sent again 1,000 times, each on a new
  stream;
- ``slow``: two streams each announcing a message of about 1 GiB, then trickling 4 KiB/s;
- ``flood``: requests with a 2 MB method name, back to back;
- ``flood-parallel``: the same from `PARALLEL_STREAMS` (32) streams at once, each opening its next stream
  as soon as the last one is answered or closed;
- ``sybil-flood``: the same 32 streams spread over `SYBIL_IDENTITIES` (16) identities (16 bare p2pds of the
  attacker's process on one host, 2 streams each), so that no identity is past its own refusal budget
  before the others have spent theirs;
- ``sybil-hosts``: the same flood from 16 identities each on a host of its own (p2pds listening, and so
  dialling, on the loopback addresses 127.0.0.2 to 127.0.0.17, which the nodes see as 16 remote hosts),
  so that no identity and no host is past its own budget before the others have spent theirs: only the
  node-wide budget (``tarpit_node_refusals``) binds them;
- ``sybil-idle``: the same 16 identities connect and send nothing (what 16 idle libp2p connections and
  their daemons cost; nothing is refused: the nodes' connection guards drop all but 4 of them per node,
  counted as ``conn_host_cap``, and a tree without the guard shows it as ``uncounted``).

The attacker runs on the nodes' machine, so part of what it costs the rounds is only its own CPU. Right
after each attack window a ``burn`` window of the same length runs a process that burns the CPU time the
attacker's processes used during the attack (cores on average, measured from their CPU times; in
``ceil(cores)`` processes, each tracking its own CPU time so that it gets what it asks for under load),
and touches nothing of the nodes. Per attack, the report prints the round rate relative to the clean
window before it (``x clean``) and relative to its burn window (``x burn``): ``x burn`` is the cost the
attack imposes on the nodes beyond sharing the machine; ``burn/clean`` the cost of sharing alone.

Targets, per attack: no node crashed (every DHT process alive, every round loop running), the attack
was counted (some refusal counter grew), rounds >= 0.8x clean, RSS growth <= 256 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script from a checkout

import base58  # noqa: E402
import hivemind  # noqa: E402
import torch  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402
from hivemind.utils.timed_storage import get_dht_time  # noqa: E402

from benchmarks.machine import commit, cpu_model  # noqa: E402
from p2pnode.config import NodeConfig  # noqa: E402
from p2pnode.daemon.children import child_pids  # noqa: E402
from p2pnode.daemon.node import Node  # noqa: E402
from p2pnode.daemon.real import create_real_node  # noqa: E402
from p2pnode.daemon.settings import DaemonSettings  # noqa: E402
from p2pnode.discovery.dht import DHTDirectory  # noqa: E402
from p2pnode.discovery.validator import directory_key  # noqa: E402
from p2pnode.proto import peer_pb2  # noqa: E402
from p2pnode.protocols.gossip import EXCHANGE  # noqa: E402
from p2pnode.transport import codec  # noqa: E402
from p2pnode.transport.p2p import RPC_HANDLER  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
RUN_ID = "bench-hostile"
MiB = 1 << 20
#: Seconds allowed for a DHT (the outsider's) to start, per attempt.
DHT_START_TIMEOUT_S = 60.0
#: Targets (see the module docstring).
MIN_ROUNDS_X = 0.8
MAX_RSS_MIB = 256.0
ATTACKS = ("deep", "plain", "junk", "replay", "slow", "flood", "flood-parallel", "sybil-flood", "sybil-hosts",
           "sybil-idle")
#: Streams the ``flood-parallel`` attacker keeps open at once (also the ``sybil-flood`` one, all identities).
PARALLEL_STREAMS = 32
#: Identities (bare p2pds) of the ``sybil-flood`` attacker.
SYBIL_IDENTITIES = 16


# ------------------------------------------------------------------------------------------------ memory
def process_tree(roots: list[int]) -> set[int]:
    """`roots` and all their live descendants (from /proc)."""
    out, todo = set(roots), list(roots)
    while todo:
        for child in child_pids(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def rss_bytes(pids: set[int]) -> int:
    """Sum of VmRSS of `pids` (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU time of `pids` so far, in seconds (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------ swarm
@dataclass
class Swarm:
    nodes: list[Node]
    rounds: list[int]
    loops: list[asyncio.Task[None]]
    errors: list[str]

    def dhts(self) -> list[hivemind.DHT]:
        """Each node's DHT (the real nodes' directories are `DHTDirectory`)."""
        out = []
        for n in self.nodes:
            assert isinstance(n.directory, DHTDirectory)
            out.append(n.directory.dht)
        return out

    def node_pids(self, attacker: int) -> set[int]:
        """This process and each node's DHT process with its p2pd (not the `attacker` process and its own)."""
        return process_tree([os.getpid(), *(d.pid for d in self.dhts() if d.pid)]) - process_tree([attacker])

    def target(self) -> Target:
        return Target([str(a) for d in self.dhts() for a in d.get_visible_maddrs()[:1]],
                      self.nodes[0].transport.addresses()[:1], self.nodes[1].peer_id,
                      [d.peer_id.to_base58() for d in self.dhts()])

    def alive(self) -> bool:
        return (all(d.is_alive() for d in self.dhts()) and not self.errors
                and all(not t.done() for t in self.loops))

    async def counters(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for n in self.nodes:
            with contextlib.suppress(Exception):
                assert isinstance(n.directory, DHTDirectory)
                await asyncio.wait_for(n.directory.refresh(), 10)  # also copies the DHT process's refusals
            out.update({f"transport.{k}": v for k, v in n.transport.stats.rejected.items()})
            out.update({f"directory.{k}": v for k, v in n.directory.rejected.items()})
        return out



async def start_swarm(local_steps: int, options: dict[str, Any] | None = None) -> Swarm:
    settings = DaemonSettings.in_memory(cpu_threads=1)
    nodes: list[Node] = []
    for i in range(3):
        initial = [] if i == 0 else nodes[0].transport.addresses()[:1]
        config = NodeConfig(run_id=RUN_ID, seed=5, shard=(i, 3), device="cpu", initial_peers=initial,
                            task="digits-mlp", topology="gossip", exchange_timeout_s=10.0, announce_ttl_s=20.0,
                            local_steps=local_steps, model_seed_mode="independent", **(options or {})).validate()
        node = await create_real_node(config, settings)
        nodes.append(node)
        await node.start()
    deadline = time.monotonic() + 60
    while not all([len(await n.directory.peers()) >= 2 for n in nodes]):
        if time.monotonic() > deadline:
            raise RuntimeError("the nodes did not find each other through the DHT within 60 s")
        await asyncio.sleep(0.3)
    swarm = Swarm(nodes, [0, 0, 0], [], [])

    async def loop(i: int) -> None:
        while True:
            try:
                await nodes[i].run_round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # counted as a failure of the row, the loop goes on
                swarm.errors.append(f"node {i}: {e!r}")
                await asyncio.sleep(0.5)
            swarm.rounds[i] += 1

    swarm.loops = [asyncio.create_task(loop(i)) for i in range(3)]
    return swarm


#: Longest wait for the round loops to end once cancelled, in seconds (a round takes well under one).
STOP_TIMEOUT_S = 30.0


async def stop_swarm(swarm: Swarm) -> None:
    for t in swarm.loops:
        t.cancel()
    # Bounded: a loop whose cancellation is swallowed inside a round runs on for ever (this once made the
    # benchmark stall until its outer timeout); say so instead.
    _, running = await asyncio.wait(swarm.loops, timeout=STOP_TIMEOUT_S)
    if running:
        print(f"# {len(running)} round loop(s) did not stop within {STOP_TIMEOUT_S:g} s of being cancelled",
              flush=True)
    for n in swarm.nodes:
        with contextlib.suppress(Exception):
            await n.shutdown()


@dataclass
class Target:
    """What the attacker process knows of the swarm: public addresses only."""

    dht_maddrs: list[str]  # the nodes' DHTs (one address each)
    transport_maddrs: list[str]  # node 0's p2pd
    victim: str  # node 1's peer id
    replicas: list[str]  # the nodes' DHT peer ids


async def start_outsider(target: Target) -> hivemind.DHT:
    """A stock hivemind DHT (no validators) bootstrapped from the nodes; retried once if it hangs at start."""
    for attempt in range(2):
        gc.collect()
        dht = hivemind.DHT(initial_peers=target.dht_maddrs, host_maddrs=[LOOPBACK], start=True, await_ready=False)
        try:
            await asyncio.to_thread(dht.wait_until_ready, DHT_START_TIMEOUT_S)
            return dht
        except TimeoutError:
            with contextlib.suppress(Exception):
                dht.shutdown()
            if attempt:
                raise
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ attacks
def nested_tuple(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = (value,)
    return value


def junk_subkeys(count: int, seed: int) -> list[str]:
    """`count` peer-id-like subkeys (base58 sha2-256 multihashes of random bytes)."""
    rng = random.Random(seed)
    return [base58.b58encode(bytes([0x12, 0x20]) + rng.randbytes(32)).decode() for _ in range(count)]


async def _store_direct(_dht: hivemind.DHT, node: Any, key: str, count: int, seed: int, value: bytes,
                        expiration: float, peers: list[str], batch: int = 500, timeout: float = 5.0) -> int:
    """Runs in the outsider's DHT process: store `junk_subkeys(count, seed)` straight at `peers` (the
    replicas), `batch` records per request, each request with a deadline; returns how many they accepted."""
    from hivemind.dht.routing import DHTID

    subkeys = junk_subkeys(count, seed)
    key_id, value_bytes = DHTID.generate(source=key), node.protocol.serializer.dumps(value)
    stored = 0
    for peer in peers:
        for i in range(0, len(subkeys), batch):
            part = subkeys[i:i + batch]
            with contextlib.suppress(Exception):
                ok = await asyncio.wait_for(node.protocol.call_store(
                    PeerID.from_base58(peer), [key_id] * len(part), [value_bytes] * len(part), expiration,
                    subkeys=part), timeout)
                stored += sum(ok or [])
    return stored


async def open_stream(raw: P2P, peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    _, reader, writer = await raw.call_binary_stream_handler(PeerID.from_base58(peer_id), RPC_HANDLER)
    return reader, writer


async def exchange_raw(raw: P2P, peer_id: str, data: bytes, timeout: float = 10.0) -> None:
    reader, writer = await open_stream(raw, peer_id)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readexactly(4)
            await reader.readexactly(codec.parse_header(head))
    finally:
        writer.close()


def announcing(nbytes: int) -> bytes:
    """Header and envelope of a well-formed gossip request whose `nbytes` payload is still to come."""
    env = peer_pb2.Envelope(method=EXCHANGE, body=peer_pb2.ModelExchange().SerializeToString(),
                            payload_bytes=nbytes, nonce=random.randbytes(16), sent_at=time.time())
    env.tensors.add(name="x", dtype="uint8", shape=[nbytes])
    head = env.SerializeToString()
    return codec.HEADER.pack(len(head)) + head


@dataclass
class Client:
    """The attacker's side: a stock DHT (DHT attacks) or a bare p2pd (transport attacks), started already."""

    target: Target
    outsider: hivemind.DHT | None = None
    raw: P2P | None = None
    #: More identities, besides `raw` (``sybil-flood``).
    sybils: list[P2P] = field(default_factory=list)


Attack = Callable[[Client, float], Coroutine[Any, Any, None]]
DHT_ATTACKS = ("deep", "plain", "junk")


async def attack_dht(client: Client, deadline: float, shot: Callable[[hivemind.DHT], Awaitable[Any]],
                     pause_s: float) -> None:
    assert client.outsider is not None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(shot(client.outsider), max(0.1, deadline - time.monotonic()))
        await asyncio.sleep(pause_s)


async def attack_deep(client: Client, deadline: float) -> None:
    key, deep = directory_key(RUN_ID), nested_tuple(200)

    async def shot(outsider: hivemind.DHT) -> None:
        exp = get_dht_time() + 30
        await outsider.store(key, b"value", exp, subkey=deep, exclude_self=True, return_future=True)
        await outsider.store(key, deep, exp, subkey="subkey", exclude_self=True, return_future=True)

    await attack_dht(client, deadline, shot, 0.2)


async def attack_plain(client: Client, deadline: float) -> None:
    key = directory_key(RUN_ID)

    async def shot(outsider: hivemind.DHT) -> None:
        await outsider.store(key, b"plain", get_dht_time() + 100, exclude_self=True, return_future=True)

    await attack_dht(client, deadline, shot, 0.2)


async def attack_junk(client: Client, deadline: float) -> None:
    key = directory_key(RUN_ID)

    async def shot(outsider: hivemind.DHT) -> None:
        await outsider.run_coroutine(partial(_store_direct, key=key, count=3000, seed=0, value=b"\xff" * 20,
                                             expiration=get_dht_time() + 15, peers=client.target.replicas),
                                     return_future=True)

    await attack_dht(client, deadline, shot, 1.0)


async def attack_replay(client: Client, deadline: float) -> None:
    victim, raw = client.target.victim, client.raw
    assert raw is not None
    # A method the nodes serve: a request to an unknown one is refused from its name, before the replay guard.
    captured = codec.join(codec.encode(EXCHANGE, peer_pb2.ModelExchange()))
    for _ in range(1001):  # the original, then 1,000 replays
        if time.monotonic() >= deadline:
            break
        with contextlib.suppress(Exception):
            await exchange_raw(raw, victim, captured)


async def attack_slow(client: Client, deadline: float) -> None:
    victim, raw = client.target.victim, client.raw
    assert raw is not None

    async def slow_stream() -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                _, writer = await open_stream(raw, victim)
                try:
                    writer.write(announcing((1 << 30) - 4096))
                    await writer.drain()
                    while time.monotonic() < deadline:  # 4 KiB/s until the node cuts it off
                        writer.write(b"\x00" * 1024)
                        await writer.drain()
                        await asyncio.sleep(0.25)
                finally:
                    writer.close()
            await asyncio.sleep(0.1)

    await asyncio.gather(slow_stream(), slow_stream())


async def attack_flood(client: Client, deadline: float, raw: P2P | None = None) -> None:
    victim, raw = client.target.victim, raw or client.raw
    assert raw is not None
    while time.monotonic() < deadline:
        frame = codec.join(codec.encode("m" * (2 * 1000 * 1000), peer_pb2.Ping()))  # a fresh nonce each
        with contextlib.suppress(Exception):
            await exchange_raw(raw, victim, frame)


async def attack_flood_parallel(client: Client, deadline: float) -> None:
    await asyncio.gather(*(attack_flood(client, deadline) for _ in range(PARALLEL_STREAMS)))


async def attack_sybil_flood(client: Client, deadline: float) -> None:
    identities = [client.raw, *client.sybils]
    await asyncio.gather(*(attack_flood(client, deadline, identities[i % len(identities)])
                           for i in range(PARALLEL_STREAMS)))


async def attack_sybil_idle(client: Client, deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


ATTACK_FUNCS: dict[str, Attack] = {"deep": attack_deep, "plain": attack_plain, "junk": attack_junk,
                                   "replay": attack_replay, "slow": attack_slow, "flood": attack_flood,
                                   "flood-parallel": attack_flood_parallel, "sybil-flood": attack_sybil_flood,
                                   "sybil-hosts": attack_sybil_flood, "sybil-idle": attack_sybil_idle}


async def _attacker(name: str, target: Target, seconds: float, conn: Connection) -> None:
    client = Client(target)
    try:
        if name in DHT_ATTACKS:
            client.outsider = await start_outsider(target)
        else:
            # sybil-hosts: identity i listens (and so dials) on 127.0.0.(2 + i), a remote host of its own.
            hosts = ([f"/ip4/127.0.0.{2 + i}/tcp/0" for i in range(SYBIL_IDENTITIES)] if name == "sybil-hosts"
                     else [LOOPBACK] * SYBIL_IDENTITIES)
            client.raw = await P2P.create(initial_peers=target.transport_maddrs, host_maddrs=[hosts[0]])
            if name in ("sybil-flood", "sybil-hosts", "sybil-idle"):
                client.sybils = list(await asyncio.gather(*(
                    P2P.create(initial_peers=target.transport_maddrs, host_maddrs=[host]) for host in hosts[1:])))
        conn.send("ready")
        await ATTACK_FUNCS[name](client, time.monotonic() + seconds)
    finally:
        if client.outsider is not None:
            await asyncio.to_thread(client.outsider.shutdown)
        for sybil in client.sybils:
            await sybil.shutdown()
        if client.raw is not None:
            await client.raw.shutdown()


def attacker_main(name: str, target: Target, seconds: float, conn: Connection) -> None:
    """Entry point of the attacker process: set up its client, say "ready", attack for `seconds`."""
    logging.basicConfig(level=logging.CRITICAL)
    asyncio.run(_attacker(name, target, seconds, conn))


# ------------------------------------------------------------------------------------------------ burn control
#: Length of one burn step, in seconds: the burner spins or sleeps in steps this long.
BURN_STEP_S = 0.002


def burn_main(cores: float, seconds: float, conn: Connection) -> None:
    """Entry point of a burner process: use `cores` of CPU time (0 to 1) for `seconds`, then exit.

    It compares its own CPU time (`time.process_time`) with ``cores x elapsed`` and spins while behind,
    sleeps while ahead, so that it gets the CPU time it asks for also when the machine is loaded (a fixed
    duty cycle of wall time would get less, since spinning wall time is not CPU time under contention).
    """
    conn.send("ready")
    t0, c0 = time.monotonic(), time.process_time()
    while (now := time.monotonic()) - t0 < seconds:
        if time.process_time() - c0 < cores * (now - t0):
            end = now + BURN_STEP_S
            while time.monotonic() < end:
                pass
        else:
            time.sleep(BURN_STEP_S)


def start_burners(cores: float, seconds: float) -> list[BaseProcess]:
    """Spawn ``ceil(cores)`` burner processes sharing `cores` equally (none for 0); returns once they run."""
    count = math.ceil(cores - 1e-9) if cores > 0 else 0
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []
    for _ in range(count):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=burn_main, args=(cores / count, seconds, child))
        proc.start()
        if not parent.poll(60.0):
            proc.kill()
            raise RuntimeError("a burner process did not start within 60 s")
        parent.recv()
        procs.append(proc)
    return procs


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class Row:
    name: str
    rate: float
    rss_mib: float
    caught: dict[str, int]
    alive: bool
    #: CPU cores used on average during the window: this process (the nodes' round loops), the nodes'
    #: DHT processes and p2pds, the attacker's processes.
    cpu: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Round rate of the clean window measured just before this one (the first clean window's own rate).
    clean_rate: float = 0.0
    #: Round rate of the burn window right after this attack (0: none), and the cores its burners used.
    burn_rate: float = 0.0
    burn_cpu: float = 0.0


async def window(swarm: Swarm, seconds: float, attack: str | None, burn: float = 0.0
                 ) -> tuple[float, float, tuple[float, float, float]]:
    """Rounds per second over `seconds` (with the `attack` process running, or burners using `burn` cores),
    the peak RSS growth in MiB, and the CPU cores used on average by this process, the nodes' other
    processes and the attacker's (or the burners').

    The attacker is its own (spawned) process, so that its work does not run on the nodes' event loop; the
    window starts once it has started its DHT or p2pd.
    """
    proc: BaseProcess | None = None
    attacker = -1
    burners: list[BaseProcess] = []
    if burn > 0:
        burners = await asyncio.to_thread(start_burners, burn, seconds)
    if attack is not None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=attacker_main, args=(attack, swarm.target(), seconds, child))
        proc.start()
        attacker = proc.pid or -1
        if not await asyncio.to_thread(parent.poll, 120.0):  # False also when the child died
            proc.kill()
            raise RuntimeError(f"the attacker process of {attack} did not start within 120 s")
        parent.recv()
    pids = swarm.node_pids(attacker) - {p.pid for p in burners if p.pid}
    outside = process_tree([attacker]) if attacker > 0 else {p.pid for p in burners if p.pid}
    groups = [{os.getpid()}, pids - {os.getpid()}, outside]
    cpu0 = [cpu_seconds(g) for g in groups]
    base = rss_bytes(pids)
    peak = base
    start_rounds, t0 = sum(swarm.rounds), time.monotonic()
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(0.1)
        peak = max(peak, rss_bytes(pids))
    elapsed = time.monotonic() - t0
    rate = (sum(swarm.rounds) - start_rounds) / elapsed
    main_cpu, dht_cpu, attacker_cpu = ((cpu_seconds(g) - c) / elapsed for g, c in zip(groups, cpu0, strict=True))
    if proc is not None:
        await asyncio.to_thread(proc.join, 30.0)
        if proc.exitcode is None:  # its DHT still busy with a store: not the nodes' problem
            proc.kill()
            print(f"# {attack}: the attacker process did not stop within 30 s, killed", flush=True)
    for b in burners:
        await asyncio.to_thread(b.join, 10.0)
        if b.exitcode is None:
            b.kill()
    return rate, (peak - base) / MiB, (main_cpu, dht_cpu, attacker_cpu)


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} cpus (load {load[0]:.1f}), python "
            f"{platform.python_version()}, torch {torch.__version__}, hivemind {hivemind.__version__}; "
            f"commit {commit()}")


async def bench(seconds: float, attacks: list[str], local_steps: int, burn: bool = True,
                options: dict[str, Any] | None = None) -> list[Row]:
    swarm = await start_swarm(local_steps, options)
    rows: list[Row] = []
    try:
        await window(swarm, 2.0, None)  # warm-up, not reported
        clean, _, cpu = await window(swarm, seconds, None)
        rows.append(Row("clean", clean, 0.0, {}, swarm.alive(), cpu, clean))
        for i, name in enumerate(attacks):
            if i:
                clean, _, _ = await window(swarm, seconds, None)
            before = await swarm.counters()
            swarm.errors.clear()
            rate, rss, cpu = await window(swarm, seconds, name)
            after = await swarm.counters()
            caught = {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] > before.get(k, 0)}
            row = Row(name, rate, rss, caught, swarm.alive(), cpu, clean)
            rows.append(row)
            if swarm.errors:
                print(f"# {name}: {swarm.errors[:3]}", flush=True)
            await asyncio.sleep(1.0)  # let the last refusals settle before the next attack
            if burn:
                # The control: the attacker's CPU, burnt by a process that touches nothing of the nodes.
                row.burn_rate, _, burn_cpu = await window(swarm, seconds, None, burn=cpu[2])
                row.burn_cpu = burn_cpu[2]
    finally:
        await stop_swarm(swarm)
    return rows


def report(rows: list[Row], seconds: float) -> bool:
    if not rows:
        return False
    clean = rows[0].rate
    print(f"# machine: {machine()}")
    print(f"# windows: {seconds:g} s; targets: no crash, counted, rounds >= {MIN_ROUNDS_X}x clean, "
          f"RSS growth <= {MAX_RSS_MIB:g} MiB; cpu: cores used by the round loops / the nodes' DHT processes "
          "and p2pds / the attacker; burn/s: rounds/s while a process burns the attacker's cores (burn cpu), "
          "x burn: rounds/s over burn/s (the attack's cost beyond sharing the machine)")
    print(f"{'attack':<14} {'clean/s':>8} {'rounds/s':>8} {'x clean':>7} {'burn/s':>7} {'burn cpu':>8} "
          f"{'x burn':>6} {'rss MiB':>8} {'cpu':>14} {'alive':>5}  {'verdict':<7} caught by")
    ok = True
    for r in rows:
        x = r.rate / r.clean_rate if r.clean_rate else 0.0
        xb = f"{r.rate / r.burn_rate:6.2f}" if r.burn_rate else f"{'-':>6}"
        burn = f"{r.burn_rate:7.2f} {r.burn_cpu:8.2f}" if r.burn_rate else f"{'-':>7} {'-':>8}"
        if r.name == "clean":
            verdict, caught = ("pass" if r.alive and clean > 0 else "FAIL"), "-"
        else:
            fails = [why for why, bad in (("crash", not r.alive), ("uncounted", not r.caught),
                                          ("slow", x < MIN_ROUNDS_X), ("memory", r.rss_mib > MAX_RSS_MIB)) if bad]
            verdict = "pass" if not fails else "FAIL:" + ",".join(fails)
            caught = ", ".join(f"{k}+{v}" for k, v in r.caught.items()) or "-"
        ok = ok and verdict == "pass"
        cpu = "/".join(f"{c:.2f}" for c in r.cpu)
        print(f"{r.name:<14} {r.clean_rate:8.2f} {r.rate:8.2f} {x:7.2f} {burn} {xb} {r.rss_mib:8.1f} {cpu:>14} "
              f"{'yes' if r.alive else 'NO':>5}  {verdict:<7} {caught}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the clean window and of each attack")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {','.join(ATTACKS)}")
    parser.add_argument("--local-steps", type=int, default=5, help="local SGD steps per round (default 5)")
    parser.add_argument("--no-burn", action="store_true", help="skip the burn control window after each attack")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a node setting (a NodeConfig field, value parsed as JSON where it parses, e.g. "
                             "tarpit_node_refusals=0); repeatable")
    args = parser.parse_args()
    options: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in attacks if a not in ATTACK_FUNCS]
    if unknown:
        parser.error(f"unknown attacks {unknown}; choose from {','.join(ATTACKS)}")
    # The nodes log every (rate-limited) refusal as a warning: keep the table readable.
    logging.basicConfig(level=logging.ERROR)
    if options:
        print(f"node settings: {options}")
    rows = asyncio.run(bench(args.seconds, attacks, args.local_steps, burn=not args.no_burn, options=options))
    sys.exit(0 if report(rows, args.seconds) else 1)


if __name__ == "__main__":
    main()
