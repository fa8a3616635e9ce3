"""Who is sampled: the candidate order of a round, model digests (the ordering keys), and pings.

Round ``k``'s trainers and aggregators are the first responsive peers of one pure function,
`candidate_order`, over the node's view of the active peers. With ``sample_key="model"`` the order of
round ``k >= 3`` is keyed by the digest (`model_digest`) of model version ``k - 2`` (`Core.key`).
`Sampler` finds the responsive ones by pinging them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping, Sequence

import torch

from p2pnode.errors import PeerUnreachable, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.modest.state import Core
from p2pnode.protocols.modest.wire import PING
from p2pnode.transport import Message


def candidate_order(peer_ids: Sequence[str], round: int, *, key: bytes = b"") -> list[str]:
    """The order in which peers are considered for the sample and aggregators of `round`.

    Peers (duplicates removed) sorted by ``SHA-256(key || utf8(peer_id) || b"-" || ascii(round))``, ties
    by peer id. A pure function of its arguments: every node with the same view derives the same
    order. With the default empty `key` this is the reference ordering with SHA-256 instead of MD5.
    """
    suffix = b"-" + str(int(round)).encode("ascii")
    return sorted(sorted(set(peer_ids)), key=lambda p: hashlib.sha256(key + p.encode("utf-8") + suffix).digest())


def model_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over a model's entries (sorted names, dtypes, shapes and raw bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return h.digest()


class Sampler:
    """Pings candidates and picks the responsive ones, over the node's `Core` (its view and peer health)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def ping(self, peer: str, round_: int) -> peer_pb2.ModestPong | None:
        """Ping `peer` every ``ping_interval_s`` until it answers or ``ping_timeout_s`` passes."""
        s = self.core.settings
        body = peer_pb2.ModestPing(run_id=s.run_id, config_hash=s.config_hash, round_estimate=self.core.round,
                                   index=self.core.own_index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.ping_timeout_s
        while (remaining := deadline - loop.time()) > 0:
            t0 = loop.time()
            try:
                resp = await self.core.transport.call(peer, PING, Message(body), peer_pb2.ModestPong,
                                                 timeout=min(s.ping_interval_s, remaining))
            except PeerUnreachable:
                # Re-ping on the interval (a fast failure, e.g. no route yet, must not spin).
                await asyncio.sleep(max(0.0, min(s.ping_interval_s - (loop.time() - t0), deadline - loop.time())))
                continue
            except TransportError:
                break
            self.core.heard(peer, resp.body.round_estimate)
            self.core.health.succeeded(peer, self.core.round)
            return resp.body
        self.core.health.failed(peer, round_)
        return None

    async def available(self, round_: int, count: int, key: bytes, exclude: Iterable[str] = (), *,
                         ordered: bool = False) -> list[str]:
        """Up to `count` responsive peers of ``candidate_order(active peers, round_, key)``, in arrival order
        (with `ordered`, in candidate order: the same list on every node that found the same peers).

        The first `count` candidates are pinged in parallel; each one that does not answer is replaced by
        the next unused candidate. This node counts as available without a ping. Candidates in back-off
        after a failed ping are skipped without one.
        """
        if count <= 0:
            return []
        skip = set(exclude)
        order = [p for p in candidate_order(self.core.view.active(round_), round_, key=key) if p not in skip]
        position = {p: i for i, p in enumerate(order)}
        it = iter(order)
        found: list[str] = []
        pending: dict[asyncio.Task[peer_pb2.ModestPong | None], str] = {}
        loop = asyncio.get_running_loop()

        def launch() -> None:
            while len(found) + len(pending) < count:
                p = next(it, None)
                if p is None:
                    return
                if p == self.core.me:
                    found.append(p)
                elif self.core.health.usable(p, round_):
                    pending[loop.create_task(self.ping(p, round_))] = p

        launch()
        try:
            while pending and len(found) < count:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: position[pending[t]]):  # deterministic order
                    peer = pending.pop(task)
                    if task.result() is not None and len(found) < count:
                        found.append(peer)
                launch()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return sorted(found, key=position.__getitem__) if ordered else found
