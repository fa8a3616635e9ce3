"""Resource limits for volunteers: CPU threads, GPU memory, and the upload rate to peers.

- `apply_cpu_threads`: ``torch.set_num_threads`` in the daemon process only (the simulator and tests
  that build nodes in their own process are not affected unless they ask).
- `apply_gpu_memory_limit`: ``torch.cuda.set_per_process_memory_fraction`` on the training device;
  allocations beyond the cap fail with an out-of-memory error instead of taking the whole GPU.
- `ThrottledTransport`: a token bucket in front of a `Transport` that holds every outgoing message
  (requests this node sends, and its responses to peers' requests) until the bucket has room for it.
  The cap is on the average rate: a message waits before it leaves, then goes at the link's speed;
  over any period the bytes sent stay below ``rate * period + burst``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from google.protobuf.message import Message as ProtoMessage

from p2pnode.errors import ConfigError
from p2pnode.transport import Message, Transport
from p2pnode.transport.base import Handler
from p2pnode.transport.codec import B

logger = logging.getLogger(__name__)

#: Bytes per message added to the tensor and body sizes when estimating a message's size on the wire.
MESSAGE_OVERHEAD_BYTES = 64


def apply_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count when `threads` is given; return the count in effect."""
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info("torch uses %d CPU threads", threads)
    return torch.get_num_threads()


def apply_gpu_memory_limit(device: torch.device, *, gib: float | None = None,
                           fraction: float | None = None) -> float | None:
    """Cap this process's allocations on `device` to `gib` GiB or `fraction` of its memory.

    :returns: the fraction applied, or None when nothing was capped (no cap asked, or a CPU device).
    :raises ConfigError: `gib` is more than the device has.
    """
    if gib is None and fraction is None:
        return None
    if device.type != "cuda":
        logger.warning("--max-gpu-memory is ignored: the node trains on %s", device)
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if gib is not None:
        fraction = gib * (1 << 30) / total
        if fraction > 1:
            raise ConfigError(f"max_gpu_memory_gib={gib}: GPU {index} has only {total / (1 << 30):.1f} GiB; "
                              "allowed: up to that, or a fraction in (0, 1]")
    assert fraction is not None
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    logger.info("GPU %d memory capped at %.2f GiB (%.0f %% of %.1f GiB)", index, fraction * total / (1 << 30),
                fraction * 100, total / (1 << 30))
    return fraction


class TokenBucket:
    """A token bucket over a byte rate.

    :param rate_bytes_per_s: refill rate, in bytes per second.
    :param burst_bytes: bucket size, in bytes (default: one second of `rate_bytes_per_s`).
    :param clock: monotonic clock in seconds (default `time.monotonic`).

    `take(n)` removes `n` tokens and waits until the bucket is no longer in debt. A message larger than
    the bucket is allowed (it drives the bucket into debt and later takers wait for it), so that any
    message size works while the long-run average stays at the rate.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError(f"rate_bytes_per_s must be > 0, got {rate_bytes_per_s}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else rate_bytes_per_s)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        #: Seconds takers have spent waiting, in total.
        self.waited_s = 0.0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay_for(self, nbytes: int) -> float:
        """Take `nbytes` tokens now; return how long the taker must wait, in seconds."""
        self._refill()
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def take(self, nbytes: int) -> None:
        """Take `nbytes` tokens, waiting as long as the bucket is in debt."""
        delay = self.delay_for(nbytes)
        if delay > 0:
            self.waited_s += delay
            await asyncio.sleep(delay)


def message_size(msg: Message[Any]) -> int:
    """Estimated size of `msg` on the wire, in bytes: its body, its tensors' bytes, a small overhead."""
    body: ProtoMessage = msg.body
    tensors = sum(t.numel() * t.element_size() for t in msg.tensors.values())
    return body.ByteSize() + tensors + MESSAGE_OVERHEAD_BYTES * (1 + len(msg.tensors))


class ThrottledTransport(Transport):
    """A `Transport` whose outgoing messages pass through a `TokenBucket` first.

    It wraps `inner`: requests go through ``inner.call`` after the bucket lets them go, handlers are
    registered on `inner` wrapped so that each response waits for the bucket before it is returned.
    Counters (`stats`) are those of `inner`; anything else is looked up on `inner`.
    """

    def __init__(self, inner: Transport, bucket: TokenBucket) -> None:
        super().__init__(max_message_bytes=inner.max_message_bytes)
        self.inner = inner
        self.bucket = bucket
        self.stats = inner.stats

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def addresses(self) -> list[str]:
        return self.inner.addresses()

    async def start(self) -> None:
        await self.inner.start()

    async def shutdown(self) -> None:
        await self.inner.shutdown()

    def reject(self, peer_id: str, reason: str, message: str) -> None:
        self.inner.reject(peer_id, reason, message)

    def register(self, method: str, request_type: type[ProtoMessage], handler: Handler) -> None:
        async def throttled(sender: str, request: Message[Any]) -> Message[Any]:
            response = await handler(sender, request)
            await self.bucket.take(message_size(response))
            return response

        self.inner.register(method, request_type, throttled)

    async def call(self, peer_id: str, method: str, request: Message[Any], response_type: type[B],
                   timeout: float) -> Message[B]:
        await self.bucket.take(message_size(request))
        return await self.inner.call(peer_id, method, request, response_type, timeout)

    async def _send(self, peer_id: str, method: str, parts: Any, timeout: float) -> bytes:
        raise NotImplementedError("ThrottledTransport sends through its inner transport")  # call() is overridden

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this wrapper lacks (for example P2PTransport's own ones).
        if name == "inner":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


__all__ = ["ThrottledTransport", "TokenBucket", "apply_cpu_threads", "apply_gpu_memory_limit", "message_size"]
