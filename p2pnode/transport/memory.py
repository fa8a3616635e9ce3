"""An in-memory network: many nodes in one process, messages timed by a network model on the loop clock.

This is the simulator's transport, and a product feature in its own right: it runs exactly the framing
and dispatch code of `p2pnode.transport.base.Transport` that the real libp2p transport runs; only the
byte moving differs. Run it on `p2pnode.transport.clock.VirtualClockLoop` (``run_virtual``) so that
delays cost no wall time; on an ordinary loop the delays are real sleeps.

The model, in short:

- **Delay** of one message of ``n`` bytes from ``a`` to ``b``: ``latency_s + n / bandwidth_bytes_per_s``
  of the link ``a -> b`` (`NetworkModel.delivery_delay`), plus the time it waits in ``a``'s uplink.
- **Uplink contention** (on by default, ``MemoryNetwork(uplink_fifo=True)``): each node's uplink is a
  FIFO that transmits one message at a time, so concurrent sends from one node queue behind each other
  (a message occupies the uplink for ``n / bandwidth`` of its link). Receivers' downlinks and the core
  of the network have no contention. With ``uplink_fifo=False`` every message is timed independently.
- **Loss**: each message is lost with the link's probability ``loss``, drawn from the network's own
  ``random.Random(seed)``, so runs are reproducible. A lost request or response is never answered:
  the caller waits out its timeout and gets `PeerUnreachable`.
- **Partitions** (`NetworkModel.partition`): messages between different groups are dropped, also those
  already in flight when the partition starts (checked again on arrival).
- **Crashes** (`MemoryNetwork.crash`): a crashed peer neither answers nor sends. Calls to it hang until
  the caller's timeout; its own new calls fail at once with `PeerUnreachable`; answers to its calls in
  flight are not delivered; handlers it was running when it crashed never answer, even if it is revived
  before they finish.
- **Unknown peer ids** (never registered) fail at once with `PeerUnreachable`, like a refused
  connection. A peer that shut down its transport is known but gone: calls to it hang, as if crashed.

Every message is copied once into a fresh buffer that only its receiver holds, so a receiver never
aliases the sender's tensors.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NoReturn

from p2pnode.errors import PeerUnreachable
from p2pnode.transport import codec
from p2pnode.transport.base import Transport
from p2pnode.transport.compression import Compression

__all__ = ["LinkModel", "MemoryNetwork", "MemoryTransport", "NetworkModel"]

logger = logging.getLogger(__name__)


@dataclass
class LinkModel:
    """Properties of one directed link.

    :param latency_s: one-way propagation delay, in seconds (default 0.005).
    :param bandwidth_bytes_per_s: transmission rate, in bytes per second (default 12.5e6 = 100 Mbit/s).
    :param loss: probability in [0, 1] that a message is lost (default 0.0).
    """

    latency_s: float = 0.005
    bandwidth_bytes_per_s: float = 12.5e6
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"latency_s must be a finite number >= 0, got {self.latency_s!r}")
        if not self.bandwidth_bytes_per_s > 0:  # also rejects NaN; +inf means "no transmission time"
            raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s!r}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be a probability in [0, 1], got {self.loss!r}")

    def transmission_s(self, nbytes: int) -> float:
        """Time to push `nbytes` bytes onto this link, in seconds."""
        return nbytes / self.bandwidth_bytes_per_s


class NetworkModel:
    """Links, their overrides and partitions: decides whether and when a message arrives.

    :param default: the link used between any two peers without an override (default `LinkModel()`).
    """

    def __init__(self, default: LinkModel | None = None) -> None:
        self.default = default if default is not None else LinkModel()
        self._links: dict[tuple[str, str], LinkModel] = {}
        #: Group index of each peer named in the current partition; None when the network is whole.
        self._groups: dict[str, int] | None = None

    # -- links ------------------------------------------------------------------------------------
    def set_link(self, a: str, b: str, link: LinkModel, symmetric: bool = True) -> None:
        """Use `link` for messages from `a` to `b` (and from `b` to `a` when `symmetric`)."""
        self._links[(a, b)] = link
        if symmetric:
            self._links[(b, a)] = link

    def link(self, src: str, dst: str) -> LinkModel:
        """The link that carries messages from `src` to `dst`."""
        return self._links.get((src, dst), self.default)

    # -- partitions -------------------------------------------------------------------------------
    def partition(self, groups: Sequence[Collection[str]]) -> None:
        """Split the network: messages between peers of different groups are dropped.

        Peers named in no group form one more group together (the "rest of the world"), so
        ``partition([{"a", "b"}])`` cuts ``a`` and ``b`` off from everyone else while they still
        reach each other. A new call replaces the previous partition. Raises `ValueError` when a peer
        is named in two groups.
        """
        index: dict[str, int] = {}
        for i, group in enumerate(groups):
            for peer in group:
                if peer in index and index[peer] != i:
                    raise ValueError(f"peer {peer!r} is in two partition groups ({index[peer]} and {i})")
                index[peer] = i
        self._groups = index

    def heal(self) -> None:
        """End the partition: every peer reaches every other again."""
        self._groups = None

    @property
    def partitioned(self) -> bool:
        """Whether a partition is in force."""
        return self._groups is not None

    def reachable(self, src: str, dst: str) -> bool:
        """Whether the current partition lets messages from `src` reach `dst`."""
        if self._groups is None:
            return True
        return self._groups.get(src, -1) == self._groups.get(dst, -1)

    # -- timing -----------------------------------------------------------------------------------
    def delivery_delay(self, src: str, dst: str, nbytes: int, rng: random.Random) -> float | None:
        """Seconds a message of `nbytes` bytes takes from `src` to `dst`, or None if it is dropped.

        Delay = ``latency_s + nbytes / bandwidth_bytes_per_s`` of the link, without any queueing
        (uplink contention is added by `MemoryNetwork`). None when a partition separates the two
        peers or the message is lost; `rng` is drawn only for links with 0 < loss < 1.
        """
        if not self.reachable(src, dst):
            return None
        link = self.link(src, dst)
        if link.loss >= 1.0 or (link.loss > 0.0 and rng.random() < link.loss):
            return None
        return link.latency_s + link.transmission_s(nbytes)


@dataclass
class _PeerState:
    transport: MemoryTransport | None
    alive: bool = True
    #: Bumped on every crash and re-registration: work started under an older epoch never answers.
    epoch: int = 0
    #: Virtual time at which this peer's uplink finishes its queued messages, in seconds.
    uplink_free_at: float = 0.0


class MemoryNetwork:
    """An in-memory network of `MemoryTransport` objects, timed by a `NetworkModel` on the loop clock.

    :param model: links and partitions (default `NetworkModel()`: 5 ms, 100 Mbit/s, no loss).
    :param seed: seed of the network's ``random.Random``, used for message loss (default 0).
    :param uplink_fifo: queue concurrent sends from one node in its uplink (default True); see the
        module docstring.

    Traffic totals count messages and bytes across all peers (requests and responses):
    ``bytes_sent_total``/``messages_sent_total`` every message put on a link, including ones later
    lost or dropped; ``bytes_delivered_total``/``messages_delivered_total`` those handed to their
    receiver; ``messages_dropped_total`` those lost, cut by a partition, or sent to or answered to a
    crashed or departed peer.
    """

    def __init__(self, model: NetworkModel | None = None, seed: int = 0, *, uplink_fifo: bool = True) -> None:
        self.model = model if model is not None else NetworkModel()
        self.rng = random.Random(seed)
        self.uplink_fifo = uplink_fifo
        self._peers: dict[str, _PeerState] = {}
        # Receive-side work runs in tasks of its own (see MemoryTransport._send); keep them referenced.
        self._tasks: set[asyncio.Task[tuple[bytearray, float] | None]] = set()
        self.bytes_sent_total = 0
        self.bytes_delivered_total = 0
        self.messages_sent_total = 0
        self.messages_delivered_total = 0
        self.messages_dropped_total = 0

    # -- membership -------------------------------------------------------------------------------
    def transport(self, peer_id: str, *, max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                  compression: Compression | str | None = None) -> MemoryTransport:
        """Create and register the transport of `peer_id`. Raises `ValueError` if the id is in use.

        :param max_message_bytes: largest message the node sends or accepts, in bytes (default 1 GiB).
        :param compression: the node's wire format for models and updates (default ``none``), see
            `Transport`.
        """
        return MemoryTransport(self, peer_id, max_message_bytes=max_message_bytes, compression=compression)

    def _register(self, transport: MemoryTransport) -> None:
        peer_id = transport.peer_id
        state = self._peers.get(peer_id)
        if state is not None and state.transport is not None:
            raise ValueError(f"peer id {peer_id!r} is already registered on this network")
        if state is None:
            self._peers[peer_id] = _PeerState(transport)
        else:
            # The id comes back after a shutdown: a new process, with an empty uplink.
            state.transport, state.alive = transport, True
            state.epoch += 1
            state.uplink_free_at = 0.0

    def _unregister(self, transport: MemoryTransport) -> None:
        state = self._peers.get(transport.peer_id)
        if state is not None and state.transport is transport:
            state.transport, state.alive = None, False
            state.epoch += 1

    def _registered(self, peer_id: str) -> _PeerState:
        state = self._peers.get(peer_id)
        if state is None or state.transport is None:
            raise ValueError(f"peer {peer_id!r} is not registered on this network")
        return state

    def crash(self, peer_id: str) -> None:
        """Crash `peer_id`: it stops answering and sending until `revive`. Idempotent."""
        state = self._registered(peer_id)
        if state.alive:
            state.alive = False
            state.epoch += 1
            # Messages still queued in its uplink have not left the machine; the queue empties.
            state.uplink_free_at = 0.0

    def revive(self, peer_id: str) -> None:
        """Bring a crashed `peer_id` back (same transport and handlers). Idempotent."""
        self._registered(peer_id).alive = True

    def is_alive(self, peer_id: str) -> bool:
        """Whether `peer_id` is registered and not crashed."""
        state = self._peers.get(peer_id)
        return state is not None and state.transport is not None and state.alive

    def peer_ids(self) -> list[str]:
        """Ids of the registered peers (crashed ones included), sorted."""
        return sorted(p for p, s in self._peers.items() if s.transport is not None)

    # -- moving bytes -----------------------------------------------------------------------------
    def _transmit(self, src: str, dst: str, nbytes: int) -> float | None:
        """Put a message on the link `src -> dst` now; return its delay in seconds, or None if dropped."""
        now = asyncio.get_running_loop().time()
        wait = 0.0
        state = self._peers.get(src)
        if self.uplink_fifo and state is not None:
            start = max(now, state.uplink_free_at)
            state.uplink_free_at = start + self.model.link(src, dst).transmission_s(nbytes)
            wait = start - now
        self.bytes_sent_total += nbytes
        self.messages_sent_total += 1
        delay = self.model.delivery_delay(src, dst, nbytes, self.rng)
        if delay is None:
            self._dropped(src, dst, "lost or partitioned")
            return None
        return wait + delay

    def _delivered(self, nbytes: int) -> None:
        self.bytes_delivered_total += nbytes
        self.messages_delivered_total += 1

    def _dropped(self, src: str, dst: str, why: str) -> None:
        self.messages_dropped_total += 1
        logger.debug("message %s -> %s dropped: %s", src, dst, why)

    async def _serve(self, dst: MemoryTransport, src: str, data: bytearray, epoch: int
                     ) -> tuple[bytearray, float] | None:
        """Run `dst`'s handler on a delivered request; return the response and its delay, or None."""
        parts = await dst._dispatch(src, data)
        state = self._peers.get(dst.peer_id)
        if state is None or state.transport is not dst or not state.alive or state.epoch != epoch:
            self._dropped(dst.peer_id, src, "responder crashed or left while handling the request")
            return None
        response = _copy_joined(parts)
        delay = self._transmit(dst.peer_id, src, len(response))
        if delay is None:
            return None
        return response, delay


def _copy_joined(parts: Sequence[memoryview]) -> bytearray:
    """One writable copy of an encoded message: the receiver builds its tensors over it, unaliased."""
    return bytearray().join(parts)


class MemoryTransport(Transport):
    """The transport of one peer on a `MemoryNetwork` (create it with `MemoryNetwork.transport`).

    :param network: the network to join; the transport registers itself at once.
    :param peer_id: this node's id on the network (any non-empty string).
    :param max_message_bytes: largest message this node sends or accepts, in bytes (default 1 GiB).
    :param compression: the node's wire format for models and updates (default ``none``), see `Transport`.

    Byte and call counters live in `Transport.stats` and are kept by the base class; this class only
    updates the network-wide totals of `MemoryNetwork`.
    """

    def __init__(self, network: MemoryNetwork, peer_id: str, *,
                 max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
                 compression: Compression | str | None = None) -> None:
        if not isinstance(peer_id, str) or not peer_id:
            raise ValueError(f"peer_id must be a non-empty string, got {peer_id!r}")
        super().__init__(max_message_bytes=max_message_bytes, compression=compression)
        self._network = network
        self._peer_id = peer_id
        network._register(self)

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def network(self) -> MemoryNetwork:
        """The network this transport belongs to."""
        return self._network

    async def shutdown(self) -> None:
        """Leave the network: calls from this node fail at once, calls to it hang as if it crashed."""
        self._network._unregister(self)

    async def _send(self, peer_id: str, method: str, parts: Sequence[memoryview], timeout: float
                    ) -> bytearray:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        net = self._network
        me = net._peers.get(self._peer_id)
        if me is None or me.transport is not self:
            raise PeerUnreachable(f"{self._peer_id} has left the network and cannot call {peer_id}")
        if not me.alive:
            raise PeerUnreachable(f"{self._peer_id} is crashed and cannot call {peer_id}")
        if peer_id not in net._peers:
            raise PeerUnreachable(f"unknown peer {peer_id!r}: no such node on this network")
        my_epoch = me.epoch

        request = _copy_joined(parts)
        delay = net._transmit(self._peer_id, peer_id, len(request))
        if delay is None:
            await self._no_answer(peer_id, method, deadline)
        await asyncio.sleep(delay)

        # The request arrives: the destination must be up, and no partition may have cut it meanwhile.
        dst = net._peers[peer_id]
        if dst.transport is None or not dst.alive or not net.model.reachable(self._peer_id, peer_id):
            net._dropped(self._peer_id, peer_id, "destination crashed, left or partitioned")
            await self._no_answer(peer_id, method, deadline)
        net._delivered(len(request))
        # The handler runs in a task of its own, as on a separate machine: when this caller times out
        # and is cancelled, the remote handler still runs to completion (its answer is then discarded).
        server = loop.create_task(net._serve(dst.transport, self._peer_id, request, dst.epoch))
        net._tasks.add(server)
        server.add_done_callback(net._tasks.discard)
        answer = await asyncio.shield(server)
        if answer is None:
            await self._no_answer(peer_id, method, deadline)
        response, delay = answer
        await asyncio.sleep(delay)

        # The response arrives: this node must still be the same live process, and reachable.
        if me.epoch != my_epoch or not me.alive or me.transport is not self:
            net._dropped(peer_id, self._peer_id, "caller crashed or left while waiting")
            raise PeerUnreachable(f"{self._peer_id} crashed or left while waiting for {peer_id}")
        if not net.model.reachable(peer_id, self._peer_id):
            net._dropped(peer_id, self._peer_id, "partitioned")
            await self._no_answer(peer_id, method, deadline)
        net._delivered(len(response))
        return response

    @staticmethod
    async def _no_answer(peer_id: str, method: str, deadline: float) -> NoReturn:
        """Wait, as a real caller would, until the call's deadline, then fail."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        raise PeerUnreachable(f"{peer_id} did not answer {method} in time")
