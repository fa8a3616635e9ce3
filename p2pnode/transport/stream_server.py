"""`StreamServer`: admits inbound libp2p streams within the stream limits and the tarpit.

p2pd hands every inbound stream of the transport's handler to `StreamServer.handle`, which decides what
the stream gets before any byte of it is read:

- beyond ``max_streams`` streams at once (all peers), nothing but a close (``busy``): answering a flood
  would cost more than it;
- a peer in the tarpit (`tarpit.Tarpit`) has the stream held unread for ``hold_s``, then closed
  (``tarpit``); streams beyond its per-peer limit are closed at once, and so are all once ``max_held``
  streams are held, all peers together (``tarpit_full``: many tarpitted identities must not tie up the
  node's stream total);
- beyond ``max_streams_per_peer`` streams of one peer, a ``busy`` error answer, read for at most
  `BUSY_DRAIN_S` (and counted towards the tarpit); the drains of a peer stop when it trips the tarpit
  (`stop_drains`), so that a parallel flooder's last refusals do not each cost a second of a stream;
- otherwise the stream's one request is served by `request_server.RequestServer`.

The serving tasks are kept so that `cancel_all` (on shutdown) can stop them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from p2pnode.transport.framing import StreamIO
from p2pnode.transport.inbound_limits import InboundLimits
from p2pnode.transport.refusals import RejectCallback
from p2pnode.transport.request_server import RequestServer
from p2pnode.transport.tarpit import STREAMS_PER_PEER, Tarpit, host_key

logger = logging.getLogger(__name__)

#: Longest time a stream refused for the per-peer stream limit is drained before it closes, in seconds.
BUSY_DRAIN_S = 1.0


class StreamServer:
    """Admits or refuses inbound libp2p streams, then serves the admitted ones' requests.

    :param inbound: the transport's receive budget and stream counts.
    :param tarpit: the transport's per-peer refusal budget.
    :param requests: serves one request on an admitted stream.
    :param reject: counts a refusal (the transport's `Transport.reject`, which also tells the tarpit).
    :param idle_timeout: longest wait for the next bytes of a request or for the caller to take the
        response, in seconds.
    :param max_held: most streams held by the tarpit at once, all peers together (default 32, a quarter of
        the default ``max_streams``).
    """

    def __init__(self, inbound: InboundLimits, tarpit: Tarpit, requests: RequestServer, reject: RejectCallback,
                 idle_timeout: float, *, max_held: int = 32) -> None:
        self.inbound = inbound
        self.tarpit = tarpit
        self.requests = requests
        self._reject = reject
        self.idle_timeout = idle_timeout
        #: Serving tasks (one per inbound stream), cancelled by `cancel_all`.
        self.serving: set[asyncio.Task[Any]] = set()
        self.max_held = max_held
        #: Streams held by the tarpit now.
        self.held = 0
        #: Per peer: the drains of its streams refused for its stream limit (`stop_drains` cancels them).
        self._busy_drains: dict[str, set[asyncio.Future[None]]] = {}
        #: Per peer: the holds of its streams in the tarpit (`release_holds` ends them).
        self._holds: dict[str, set[asyncio.Future[None]]] = {}
        #: Whether `cancel_all` is cancelling the serving tasks now.
        self._cancelling = False

    async def handle(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve or refuse one inbound stream (the handler registered with p2pd); closes it at the end."""
        sender = info.peer_id.to_base58()
        self.tarpit.seen(sender, host_key(str(info.addr)))
        if self.inbound.streams_full:
            # Beyond the total, a stream gets nothing but a close: answering a flood would cost more.
            self._reject(sender, "busy", f"{self.inbound.streams} inbound streams are being served; the limit "
                                         f"is {self.inbound.max_streams}")
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self.serving.add(task)
        mine = self.inbound.open_stream(sender)
        io = StreamIO(reader, writer, self.idle_timeout)
        try:
            if self.tarpit.holds(sender):
                await self._hold(sender, mine)
            elif mine >= self.inbound.max_streams_per_peer:
                await self._refuse_busy(sender, mine, io)
            else:
                await self.requests.serve_one(sender, io)
        except asyncio.CancelledError:
            if self._cancelling:
                # Stopped by `cancel_all` at shutdown. This task is the one asyncio's stream server made for
                # the stream, which nothing awaits, and Python 3.11's callback on it logs a cancelled task as
                # an error ("Exception in callback ... CancelledError"): end it normally instead.
                return
            raise
        except Exception:
            logger.exception("unexpected error while serving a stream from %s", info.peer_id)
        finally:
            writer.close()
            self.inbound.close_stream(sender)
            if task is not None:
                self.serving.discard(task)

    async def _hold(self, sender: str, mine: int) -> None:
        """A stream of a peer past its refusal budget: nothing is read or answered; it waits, then closes."""
        if self.held >= self.max_held:
            self._reject(sender, "tarpit_full", f"in the tarpit, and {self.held} streams are held already (the "
                                                f"limit is {self.max_held}); closed at once")
            return
        self._reject(sender, "tarpit", f"refused more than {self.tarpit.max_refusals} times in "
                                       f"{self.tarpit.window_s:g} s (or its host or the node was); streams held for "
                                       f"{self.tarpit.hold_s:g} s")
        if mine >= self.inbound.max_streams_per_peer:
            return
        self.held += 1
        try:
            # Also ends when `release_holds` cancels it.
            await _wait_tracked(self._holds, sender, asyncio.ensure_future(asyncio.sleep(self.tarpit.hold_s)))
        finally:
            self.held -= 1

    async def _refuse_busy(self, sender: str, mine: int, io: StreamIO) -> None:
        """A stream beyond the peer's own stream limit: answered ``busy`` and drained for at most `BUSY_DRAIN_S`
        (so that a reset does not overtake the answer), unless or until the peer trips the tarpit."""
        message = (f"{mine} streams of this peer are being served; the limit is "
                   f"{self.inbound.max_streams_per_peer}; retry later")
        self._reject(sender, "busy", message)
        self._reject(sender, STREAMS_PER_PEER, message)  # counted towards the tarpit only
        if self.tarpit.holds(sender):
            # This one tripped it: the answer goes out, but no drain is worth a second of a flooder's stream.
            await self.requests.answer_error(io, "busy", message, drain_s=0.0)
            return
        drain = asyncio.ensure_future(self.requests.answer_error(io, "busy", message, drain_s=BUSY_DRAIN_S))
        await _wait_tracked(self._busy_drains, sender, drain)  # also ends when `stop_drains` cancels it

    def release_holds(self, peer_id: str) -> None:
        """End the holds of `peer_id`'s streams now: its connection was dropped (`connection_guard`), so
        they are dead, and their places in ``max_held`` go to its (or others') next streams, which are
        held again while it is in the tarpit; otherwise a peer that dials again would find the tarpit full
        of its dead streams and have its new ones closed at once, and loop faster than when held."""
        _cancel_tracked(self._holds, peer_id)

    def stop_drains(self, peer_id: str) -> None:
        """Stop draining `peer_id`'s streams refused for its stream limit (it has just tripped the tarpit)."""
        _cancel_tracked(self._busy_drains, peer_id)

    async def cancel_all(self) -> None:
        """Cancel the serving tasks (except the caller's own) and wait for them to end."""
        tasks = [t for t in self.serving if t is not asyncio.current_task()]
        self._cancelling = True
        try:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._cancelling = False


async def _wait_tracked(table: dict[str, set[asyncio.Future[None]]], peer_id: str, fut: asyncio.Future[None]) -> None:
    """Wait for `fut` (cancelled on the way out), listed under ``table[peer_id]`` meanwhile so that
    `_cancel_tracked` can end it early; the peer's entry goes when its last future does."""
    futs = table.setdefault(peer_id, set())
    futs.add(fut)
    try:
        await asyncio.wait({fut})
    finally:
        fut.cancel()
        futs.discard(fut)
        if not futs:
            table.pop(peer_id, None)


def _cancel_tracked(table: dict[str, set[asyncio.Future[None]]], peer_id: str) -> None:
    """Cancel the futures `_wait_tracked` is waiting for under ``table[peer_id]``."""
    for fut in table.get(peer_id, ()):
        fut.cancel()
