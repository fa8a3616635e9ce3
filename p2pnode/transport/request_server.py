"""`RequestServer`: serves one inbound request on a libp2p stream or a direct connection, within the limits.

It reads the request (`framing.read_message`: header and envelope first, then the payload into a
receive buffer), dispatches it through the transport (`Transport._dispatch_checked`) and writes the
answer. Refusals (each counted in the transport's ``stats.rejected`` under the reason given):

- the receive budget is reserved before the payload is read (`inbound_limits.InboundLimits`; ``busy``);
- a payload that arrives below ``min_receive_rate`` (default 64 KiB/s, measured over windows of 3 s after
  a grace of 5 s) is refused and its reservation released (``too_slow``); so is a request that stalls
  for ``idle_timeout``; a stream that ends inside a request is counted as ``truncated``;
- a request's method name is read before the rest of its envelope (`framing.read_envelope`): a name
  longer than `codec.MAX_METHOD_BYTES` or not served here is refused at once (``unknown_method``), and
  at most `UNKNOWN_METHOD_DRAIN_BYTES` more of the stream are read before it closes;
- `Transport.admits` is asked before a request's payload is read (``not_admitted``);
- a receive buffer whose message was refused is dropped from the reuse pool, so that large malformed
  messages do not leave the pool holding memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from p2pnode.errors import BadMessage
from p2pnode.transport import codec
from p2pnode.transport.base import Transport
from p2pnode.transport.framing import MessageIO, StreamIO, read_message, write_message
from p2pnode.transport.inbound_limits import InboundLimits, OverBudget
from p2pnode.transport.rate import DEFAULT_GRACE_S, DEFAULT_MIN_RATE, RateGuard, TooSlow
from p2pnode.transport.receive_buffers import ReceiveBuffers

logger = logging.getLogger(__name__)

#: Longest time a refused request's remaining bytes are read and dropped before the stream closes, in s.
REFUSAL_DRAIN_S = 5.0
#: Most bytes read and dropped after a request refused for its method (``unknown_method``), before the
#: stream closes (64 KiB). An honest caller reads the refusal while it writes and closes at once; one that
#: keeps writing a large request to a method this node lacks may see the stream reset instead. Without the
#: bound a flood of requests with megabyte method names cost their whole size in reads (see
#: docs/benchmarks.md, hostile swarm).
UNKNOWN_METHOD_DRAIN_BYTES = 64 << 10
#: Seconds an answered libp2p stream waits at most for the caller to close it (`RequestServer.serve_one`).
ANSWER_LINGER_S = 5.0


class RequestServer:
    """Reads, dispatches and answers inbound requests of one transport.

    :param transport: whose handlers serve the requests, and which counts the refusals.
    :param inbound: the receive budget (shared with the transport, which also counts streams on it).
    :param buffers: where receive buffers come from (the transport's pool).
    :param idle_timeout: longest a refused or answered libp2p stream is drained, at most, in s (the
        transport's ``idle_timeout``, default 30).
    :param min_receive_rate: smallest accepted rate of a request's payload, in bytes per second (default
        64 KiB/s; 0: off).
    :param receive_grace_s: time after a payload starts during which any rate is accepted, in s (default 5).
    """

    def __init__(self, transport: Transport, inbound: InboundLimits, buffers: ReceiveBuffers, *,
                 idle_timeout: float, min_receive_rate: float = DEFAULT_MIN_RATE,
                 receive_grace_s: float = DEFAULT_GRACE_S) -> None:
        self._transport = transport
        self.inbound = inbound
        self.buffers = buffers
        self.idle_timeout = idle_timeout
        self.min_receive_rate = min_receive_rate
        self.receive_grace_s = receive_grace_s

    async def serve_one(self, sender: str, io: MessageIO) -> bool:
        """Read one request from `sender`, dispatch it and write the response.

        Returns False when the channel must be closed (closed or broken by the peer, or a refused
        request whose remaining bytes were not read).
        """
        reserved = 0

        def reserve(nbytes: int) -> None:
            nonlocal reserved
            self.inbound.reserve(sender, nbytes)
            reserved = nbytes

        try:
            try:
                data = await read_message(io, self._transport.max_message_bytes, reserve, self.buffers,
                                          RateGuard(self.min_receive_rate, grace_s=self.receive_grace_s),
                                          admit=lambda env: self._transport.check_admission(sender, env),
                                          known_method=self._transport.serves)
            except TooSlow as e:
                # The payload was cut off: the reservation goes back now, and a slow sender is not drained.
                self._transport.reject(sender, e.code, str(e))
                await self.answer_error(io, e.code, str(e), drain_s=0.0)
                return False
            except BadMessage as e:
                # Refused before the payload was read: answer with the reason, then close.
                self._transport.reject(sender, e.code, str(e))
                self._count_refused_read(io)
                await self.answer_error(io, e.code, str(e), drain_bytes=(
                    UNKNOWN_METHOD_DRAIN_BYTES if e.code == "unknown_method" else None))
                return False
            except OverBudget as e:
                self._transport.reject(sender, e.code, str(e))
                await self.answer_error(io, e.code, str(e))
                return False
            except asyncio.IncompleteReadError as e:
                if e.partial or e.expected != codec.HEADER.size:
                    self._transport.reject(sender, "truncated", f"the stream ended inside a request, after "
                                           f"{len(e.partial)} of {e.expected} bytes of one of its parts")
                return False
            except TimeoutError:
                self._transport.reject(sender, "too_slow", f"no bytes of a request for {io.idle_timeout:.0f} s")
                return False
            except (OSError, ssl.SSLError) as e:
                logger.debug("stream from %s failed while reading a request: %r", sender[-8:], e)
                return False
            # Admission was checked on the envelope before the payload was read (`read_message`'s `admit`).
            parts, ok = await self._transport._dispatch_checked(sender, data, admitted=True)
            if not ok:
                self.buffers.discard(data)
            del data
        finally:
            self.inbound.release(sender, reserved)
        try:
            await write_message(io, parts)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            # The caller gave up (timed out or was cancelled); it reports the failure on its side.
            logger.debug("could not answer %s: %r", sender[-8:], e)
            return False
        if isinstance(io, StreamIO):
            # Close only once the caller has read the answer and closed its side: a close while p2pd still
            # holds the answer's tail can make it reset the stream, and the caller then reads a truncated
            # answer (seen with 16 MiB answers on a loaded machine).
            await io.drain(min(self.idle_timeout, ANSWER_LINGER_S))
        return True

    def _count_refused_read(self, io: MessageIO) -> None:
        if isinstance(io, StreamIO):
            self._transport.stats.refused_bytes_read += io.bytes_read

    async def answer_error(self, io: MessageIO, code: str, message: str, drain_s: float = REFUSAL_DRAIN_S,
                           drain_bytes: int | None = None) -> None:
        """Answer a request refused before its payload was read (then drain a libp2p stream for at most
        `drain_s` seconds and, when given, `drain_bytes` bytes, see `StreamIO.drain`; counted in
        ``stats.refused_bytes_drained``)."""
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            await write_message(io, self._transport._error("", code, message))
        if isinstance(io, StreamIO) and drain_s > 0:
            self._transport.stats.refused_bytes_drained += await io.drain(min(self.idle_timeout, drain_s), drain_bytes)
        # On the direct channel, refusals of size happen at the ticket; a message that differs from its
        # ticket is not worth draining: the connection is closed and the caller sees it break.
