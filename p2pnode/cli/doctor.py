"""`p2pnode doctor`: checks that this machine can take part in a run, each with a fix-it line.

Checks, in order:

=============  ==============================================================================================
p2pd           hivemind's libp2p daemon starts and listens on ``--host``/``--port``
initial peers  each initial peer answers a DHT ping (through a DHT started with them as bootstrap peers)
reachability   the peers could open a stream back to this node (hivemind's validated ping), and whether
               this node's addresses can be dialed from where the peers are, or it needs a relay
clock          skew of this machine's clock against each peer's (hivemind refuses peers more than 3 s off)
gpu            CUDA devices, their memory and how much is free (none: the node trains on the CPU)
state dir      the state dir (or its nearest existing parent) is writable and has room for checkpoints
identity       the node's identity key in the state dir is intact and readable by its owner only
=============  ==============================================================================================

Each check ends ``ok``, ``warn`` (works, but worse than it could), ``fail`` or ``skip`` (the check could
not be performed, and the line says why). Exit code: 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

#: Statuses of a check, and how they print.
STATUSES = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
#: Clock skew above which the clock check warns, in seconds; hivemind refuses peers beyond its own limit (3 s).
SKEW_WARN_S = 1.0
#: Free space in the state dir below which the disk check fails / warns, in bytes.
DISK_FAIL_BYTES = 256 << 20
DISK_WARN_BYTES = 2 << 30
#: Free GPU memory below which the GPU check warns, in bytes.
GPU_FREE_WARN_BYTES = 1 << 30


@dataclass
class Check:
    """The result of one check.

    :param name: what was checked.
    :param status: ``ok``, ``warn``, ``fail`` or ``skip``.
    :param detail: what was found.
    :param fix: what to do about it (empty when nothing needs doing).
    :param data: measured values (for ``--json``).
    """

    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict[str, Any] | None = None


def _maddr(host: str, port: int) -> str:
    family = "ip6" if ":" in host else "ip4"
    return f"/{family}/{host}/tcp/{port}"


def _peer_id_of(maddr: str) -> str | None:
    parts = maddr.rstrip("/").split("/")
    for i, p in enumerate(parts[:-1]):
        if p in ("p2p", "ipfs"):
            return parts[i + 1]
    return None


def _ip_of(maddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    parts = maddr.split("/")
    for i, p in enumerate(parts[:-1]):
        if p in ("ip4", "ip6"):
            with contextlib.suppress(ValueError):
                return ipaddress.ip_address(parts[i + 1])
    return None


def _is_public(maddr: str) -> bool:
    ip = _ip_of(maddr)
    return ip is not None and ip.is_global


# ------------------------------------------------------------------------------------------- network
async def check_p2pd(host: str, port: int, timeout: float) -> Check:
    """Start a p2pd of our own on `host`:`port` and stop it again."""
    from hivemind.p2p import P2P

    t0 = time.monotonic()
    try:
        p2p = await asyncio.wait_for(P2P.create(host_maddrs=[_maddr(host, port)], startup_timeout=timeout), timeout)
    except Exception as e:
        return Check("p2pd", "fail", f"p2pd did not start on {_maddr(host, port)}: {e}",
                     "reinstall hivemind (pip install --force-reinstall hivemind; its wheel ships the p2pd binary), "
                     "and check that --host is an address of this machine and --port is free")
    try:
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    finally:
        await p2p.shutdown()
    return Check("p2pd", "ok", f"started in {time.monotonic() - t0:.1f} s, listening on {', '.join(maddrs)}",
                 data={"maddrs": maddrs, "seconds": round(time.monotonic() - t0, 3)})


async def _ping(_dht: Any, node: Any, *, peer_id: str, timeout: float) -> dict[str, Any]:
    """Runs inside the DHT process: ping `peer_id` asking it to ping us back; time the answer."""
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2
    from hivemind.utils.timed_storage import get_dht_time

    request = dht_pb2.PingRequest(peer=node.protocol.node_info, validate=True)
    t0 = get_dht_time()
    try:
        stub = node.protocol.get_stub(PeerID.from_base58(peer_id))
        response = await asyncio.wait_for(stub.rpc_ping(request, timeout=timeout), timeout)
    except Exception as e:
        return {"answered": False, "error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__}
    t1 = get_dht_time()
    return {"answered": True, "available": bool(response.available), "peer_time": response.dht_time,
            "sent": t0, "received": t1}


def _start_dht(peers: list[str], host: str, port: int, timeout: float) -> Any:
    import hivemind

    return hivemind.DHT(initial_peers=peers, host_maddrs=[_maddr(host, port)], start=True, await_ready=True,
                        startup_timeout=timeout, ensure_bootstrap_success=False)


async def check_peers(peers: list[str], host: str, port: int, timeout: float) -> list[Check]:
    """The initial peers, reachability and clock checks (one DHT, one validated ping per peer)."""
    names = ("initial peers", "reachability", "clock")
    if not peers:
        why = "no initial peer given (pass --initial-peer MULTIADDR, the address a running node prints)"
        return [Check(n, "skip", why) for n in names]
    bad = [m for m in peers if _peer_id_of(m) is None]
    good = [m for m in peers if m not in bad]
    if not good:
        return [Check("initial peers", "fail", f"no /p2p/<peer id> in {', '.join(bad)}",
                      "give the full multiaddr that the node prints in its ready line, ending in /p2p/<peer id>"),
                *(Check(n, "skip", "no initial peer could be asked") for n in names[1:])]
    # On this (the main) thread, after a garbage collection: hivemind forks the DHT process, and objects
    # that only another thread's stack holds, or uncollected garbage, would be finalized in the child,
    # where grpc's hang.
    gc.collect()
    try:
        dht = _start_dht(good, host, port, timeout)
    except Exception as e:
        return [Check("initial peers", "fail", f"none of {len(good)} initial peer(s) answered: {e}",
                      "check the addresses, that the nodes run, and that no firewall blocks their TCP ports"),
                *(Check(n, "skip", "no initial peer answered") for n in names[1:])]
    try:
        results = {}
        for m in good:
            pid = _peer_id_of(m)
            assert pid is not None
            future = dht.run_coroutine(functools.partial(_ping, peer_id=pid, timeout=timeout), return_future=True)
            results[m] = await asyncio.wait_for(asyncio.wrap_future(future), timeout + 5)
        own = [str(a) for a in await asyncio.to_thread(dht.get_visible_maddrs)]
    finally:
        await asyncio.to_thread(dht.shutdown)
    return _judge(results, bad, own)


def _judge(results: dict[str, dict[str, Any]], bad: list[str], own: list[str]) -> list[Check]:
    answered = {m: r for m, r in results.items() if r.get("answered")}
    silent = [m for m in results if m not in answered] + bad
    out: list[Check] = []
    detail = f"{len(answered)} of {len(results) + len(bad)} answered"
    if silent:
        reasons = "; ".join(f"{m}: {results[m].get('error', 'no answer') if m in results else 'no /p2p/ id'}"
                            for m in silent)
        detail += f" (silent: {reasons})"
    if not answered:
        out.append(Check("initial peers", "fail", detail,
                         "check the addresses, that the nodes run, and that no firewall blocks their TCP ports"))
        return [*out, Check("reachability", "skip", "no initial peer answered"),
                Check("clock", "skip", "no initial peer answered")]
    out.append(Check("initial peers", "warn" if silent else "ok", detail,
                     "remove or fix the silent addresses" if silent else "", data={"answered": sorted(answered)}))

    back = [m for m, r in answered.items() if r.get("available")]
    peers_public = any(_is_public(m) for m in answered)
    own_public = [a for a in own if _is_public(a)]
    if not back:
        out.append(Check("reachability", "fail", "the peers could not open a connection back to this node",
                         "allow incoming TCP on the node's --port in the firewall, or forward it on the router",
                         data={"addresses": own}))
    elif own_public or not peers_public:
        where = (f"public address {', '.join(own_public)}" if own_public
                 else "the same private network as the peers")
        out.append(Check("reachability", "ok", f"{len(back)} peer(s) opened a stream back; this node is on {where}",
                         data={"addresses": own}))
    else:
        out.append(Check("reachability", "warn",
                         f"the peers answered over the connection this node opened, but its addresses "
                         f"({', '.join(own) or 'none'}) are private: peers on the internet cannot dial it and "
                         "reach it only through a libp2p relay or connections it starts",
                         "forward the node's TCP --port on your router to this machine and start it with "
                         "--host 0.0.0.0 --port <that port>", data={"addresses": own}))

    skews = {m: r["peer_time"] - (r["sent"] + r["received"]) / 2 for m, r in answered.items() if r.get("peer_time")}
    if not skews:
        out.append(Check("clock", "skip", "the peers did not report their time"))
        return out
    worst = max(skews.values(), key=abs)
    from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS as limit

    status = "ok" if abs(worst) <= SKEW_WARN_S else ("warn" if abs(worst) <= limit else "fail")
    out.append(Check("clock", status, f"largest skew against a peer: {worst:+.3f} s (hivemind refuses peers more "
                                      f"than {limit} s off)",
                     "" if status == "ok" else "turn on time synchronisation: timedatectl set-ntp true, or chrony",
                     data={"skew_s": {m: round(s, 4) for m, s in skews.items()}}))
    return out


# ------------------------------------------------------------------------------------------- local
def check_gpu() -> Check:
    """CUDA devices seen by torch, with their total and free memory."""
    try:
        import torch
    except Exception as e:
        return Check("gpu", "skip", f"torch cannot be imported: {e}", "reinstall p2pnode with its dependencies")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return Check("gpu", "warn", f"torch {torch.__version__} is a CPU-only build: the node trains on the CPU",
                         "on a machine with an NVIDIA GPU, install a CUDA build of torch "
                         "(https://pytorch.org/get-started/locally/)")
        return Check("gpu", "warn", f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: the node "
                                    "trains on the CPU",
                     "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    devices: list[dict[str, Any]] = []
    low = []
    parts = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except Exception:  # some drivers refuse the query; the total is still known
            free, total = -1, props.total_memory
        devices.append({"index": i, "name": props.name, "total_bytes": total, "free_bytes": free})
        if 0 <= free < GPU_FREE_WARN_BYTES:
            low.append(i)
        parts.append(f"cuda:{i} {props.name}, {total / 2**30:.1f} GiB, "
                     + (f"{free / 2**30:.1f} GiB free" if free >= 0 else "free unknown"))
    detail = "; ".join(parts)
    if low:
        return Check("gpu", "warn", detail, f"other processes use most of GPU {low}: free it, or cap this node with "
                                            "--max-gpu-memory", data={"devices": devices})
    return Check("gpu", "ok", detail, data={"devices": devices})


def check_state_dir(state_dir: Path) -> list[Check]:
    """Free space and writability of the state dir, and the identity key in it."""
    from p2pnode.daemon.identity import IDENTITY_FILE, IdentityError, load_or_create_identity

    existing = state_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    out: list[Check] = []
    if not existing.is_dir():
        out.append(Check("state dir", "fail", f"{existing} is not a directory",
                         "pass --state-dir with a directory path"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        out.append(Check("state dir", "fail", f"{existing} is not writable by this user",
                         f"pass --state-dir with a directory you own, or fix the permissions of {existing}"))
    else:
        free = shutil.disk_usage(existing).free
        note = "" if existing == state_dir else f" (will be created under {existing})"
        detail = f"{state_dir}{note}: {free / 2**30:.1f} GiB free"
        status = "ok" if free >= DISK_WARN_BYTES else ("warn" if free >= DISK_FAIL_BYTES else "fail")
        fix = "" if status == "ok" else ("free disk space, lower --keep-checkpoints, or pass a --state-dir on a "
                                         "larger disk")
        out.append(Check("state dir", status, detail, fix, data={"free_bytes": free}))
    key = state_dir / IDENTITY_FILE
    if not key.exists():
        out.append(Check("identity", "skip", f"no identity key yet: the first start creates {key}"))
        return out
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        out.append(Check("identity", "warn", f"{key} has mode {mode:o}: other users can read the node's private key",
                         f"chmod 400 {key} (and consider the key leaked)"))
        return out
    if not os.access(key, os.R_OK):
        out.append(Check("identity", "fail", f"{key} is not readable by this user",
                         "run the node as the user that created the state dir"))
        return out
    try:
        identity = load_or_create_identity(state_dir)
    except IdentityError as e:
        out.append(Check("identity", "fail", str(e), "restore the key from a backup, or delete it to start under a "
                                                     "new peer id"))
        return out
    out.append(Check("identity", "ok", f"{key}: peer id {identity.peer_id}", data={"peer_id": identity.peer_id}))
    return out


async def run_checks(peers: list[str], *, host: str, port: int, state_dir: Path, timeout: float) -> list[Check]:
    """Every check, in the order of the module doc."""
    checks = [await check_p2pd(host, port, timeout)]
    if checks[0].status == "fail":
        checks += [Check(n, "skip", "p2pd does not start") for n in ("initial peers", "reachability", "clock")]
    else:
        checks += await check_peers(peers, host, port, timeout)
    checks.append(check_gpu())
    checks += check_state_dir(state_dir)
    return checks


def print_checks(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        click.echo(f"{STATUSES[c.status]:<5} {c.name:<{width}}  {c.detail}")
        if c.fix:
            click.echo(f"{'':<5} {'':<{width}}  fix: {c.fix}")


@click.command()
@click.argument("multiaddr", nargs=-1)
@click.option("--initial-peer", "initial_peers", multiple=True, metavar="MULTIADDR",
              help="Multiaddr of a peer to check against (repeatable; same as the arguments).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on, as `run` would.")
@click.option("--port", default=0, show_default=True, type=int, help="Port to listen on, as `run` would (0: any).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="P2PNODE_STATE_DIR",
              default=Path("~/.p2pnode").expanduser(), show_default="~/.p2pnode", help="The node's state dir.")
@click.option("--timeout", default=15.0, show_default=True, type=float, help="Seconds allowed for each network step.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
def doctor(multiaddr: tuple[str, ...], initial_peers: tuple[str, ...], host: str, port: int, state_dir: Path,
           timeout: float, as_json: bool) -> None:
    """Check that this machine can run a node: p2pd, initial peers, reachability, clock, GPU, disk.

    Each check prints ok, WARN, FAIL or skip (could not be performed, with the reason), and a fix for
    anything that is not ok. Exit code 0 when no check failed, 1 otherwise.
    """
    import logging

    logging.getLogger("hivemind").setLevel(logging.ERROR)  # the checks report failures themselves
    peers = list(dict.fromkeys([*multiaddr, *initial_peers]))
    checks = asyncio.run(run_checks(peers, host=host, port=port, state_dir=Path(state_dir).expanduser(),
                                    timeout=timeout))
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks], indent=2, default=str))
    else:
        print_checks(checks)
        failed = sum(c.status == "fail" for c in checks)
        click.echo(f"{len(checks)} checks: {failed} failed" if failed else f"{len(checks)} checks: none failed")
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


__all__ = ["Check", "check_gpu", "check_p2pd", "check_peers", "check_state_dir", "doctor", "run_checks"]
