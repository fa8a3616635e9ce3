"""Framed messages over a libp2p stream (`StreamIO`) or a direct TLS connection (`TLSIO`).

On either channel the caller writes one framed request (see `p2pnode.transport.codec`) and the receiver
answers with one framed response, both written in pieces of `CHUNK_BYTES`. A reader first reads the
4-byte header and the envelope, checks them against its size limits, and only then maps one buffer for
the whole message and reads the tensor bytes into it (`read_message`; the buffer comes from
`p2pnode.transport.receive_buffers`), so an oversized or malformed message is refused before its
payload is read. A request's method name is read before the rest of its envelope (`read_envelope`): a
name longer than `codec.MAX_METHOD_BYTES` or not served here is refused at once (``unknown_method``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from p2pnode.errors import BadMessage
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.rate import RateGuard
from p2pnode.transport.receive_buffers import ReceiveBuffers, lazy_buffer
from p2pnode.transport.refusals import clip
from p2pnode.transport.tls import TLSConnection

#: Size of the pieces in which a message is written and read, in bytes (1 MiB). Near 1 MB avoids the
#: allocator churn measured with 4 MB pieces and keeps per-piece overhead small.
CHUNK_BYTES = 1 << 20


class StreamIO:
    """A libp2p stream (reader and writer from p2pd) as a message source and sink.

    :param idle_timeout: longest wait for the next bytes, or for the peer to take the next piece, in s.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 idle_timeout: float) -> None:
        self.reader, self.writer, self.idle_timeout = reader, writer, idle_timeout
        #: Bytes read from the stream so far (`drain` included), in bytes.
        self.bytes_read = 0

    async def readexactly(self, n: int) -> bytes:
        async with asyncio.timeout(self.idle_timeout):
            data = await self.reader.readexactly(n)
        self.bytes_read += n
        return data

    async def readinto(self, view: memoryview, rate: RateGuard | None = None) -> None:
        pos, total = 0, view.nbytes
        while pos < total:
            try:
                async with asyncio.timeout(self.idle_timeout if rate is None else rate.wait_s(self.idle_timeout)):
                    chunk = await self.reader.read(min(CHUNK_BYTES, total - pos))
            except TimeoutError:
                if rate is None:
                    raise
                rate.progress(0)  # raises TooSlow when the window that just ended was too slow
                if rate.idle_for() >= self.idle_timeout:
                    raise
                continue
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(view[:pos]), total)
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
            self.bytes_read += len(chunk)
            if rate is not None:
                rate.progress(len(chunk))

    async def write(self, view: memoryview) -> None:
        for offset in range(0, view.nbytes, CHUNK_BYTES):
            self.writer.write(view[offset:offset + CHUNK_BYTES])
            async with asyncio.timeout(self.idle_timeout):
                await self.writer.drain()

    async def drain(self, seconds: float, max_bytes: int | None = None) -> int:
        """Read and drop what the peer still sends, until it closes the stream, `seconds` pass or (when
        given) `max_bytes` are read; return the bytes dropped.

        After an early refusal the caller is still sending its payload. Closing at once would make p2pd
        reset the stream, and a reset can overtake the refusal we wrote: the caller would see a broken
        stream instead of the reason. The caller closes as soon as it has read the refusal.
        """
        dropped = 0
        with contextlib.suppress(TimeoutError, OSError, asyncio.IncompleteReadError):
            async with asyncio.timeout(seconds):
                while max_bytes is None or dropped < max_bytes:
                    chunk = await self.reader.read(CHUNK_BYTES if max_bytes is None
                                                   else min(CHUNK_BYTES, max_bytes - dropped))
                    if not chunk:
                        break
                    dropped += len(chunk)
        self.bytes_read += dropped
        return dropped


class TLSIO:
    """A direct-channel connection as a message source and sink (see `StreamIO`)."""

    def __init__(self, conn: TLSConnection, idle_timeout: float) -> None:
        self.conn, self.idle_timeout = conn, idle_timeout

    async def readexactly(self, n: int) -> bytes:
        return await self.conn.readexactly(n, self.idle_timeout)

    async def readinto(self, view: memoryview, rate: RateGuard | None = None) -> None:
        await self.conn.readinto(view, self.idle_timeout, rate)

    async def write(self, view: memoryview) -> None:
        await self.conn.write(view, self.idle_timeout)


MessageIO = StreamIO | TLSIO


async def write_message(io: MessageIO, parts: Sequence[memoryview]) -> None:
    """Write an encoded message (its parts in order)."""
    for part in parts:
        await io.write(part.cast("B") if part.format != "B" else part)


async def read_message(io: MessageIO, max_message_bytes: int,
                       reserve: Callable[[int], None] | None = None,
                       buffers: ReceiveBuffers | None = None, rate: RateGuard | None = None,
                       admit: Callable[[peer_pb2.Envelope], None] | None = None,
                       known_method: Callable[[str], bool] | None = None) -> memoryview:
    """Read one framed message, checking the limits before its payload is read.

    The header and envelope are read and checked first (`codec.parse_header`, `codec.parse_envelope`);
    then one buffer of the announced size is mapped (`lazy_buffer`: it costs memory as bytes arrive, not
    at once) and the tensor bytes are read into it.

    :param max_message_bytes: largest accepted message, in bytes.
    :param reserve: optional ``reserve(nbytes)``, called before the buffer is allocated; it may raise to
        refuse the message (used for the receive budget).
    :param buffers: where to take the buffer from (default: a fresh one); a buffer whose message does
        not arrive completely is dropped from it.
    :param rate: minimum-rate check of the payload (started when the payload starts).
    :param admit: optional ``admit(envelope)``, called before anything else is done with the message; it
        raises `BadMessage` to refuse it (admission control: an outsider's payload is never read).
    :param known_method: optional ``known_method(name)`` (serving side): an envelope that starts with its
        method name (every one of ours does) is refused as ``unknown_method`` once the name is read, if the
        name is unknown or longer than `codec.MAX_METHOD_BYTES`, before the rest of the envelope is read
        (`read_envelope`).
    :raises BadMessage: the message is malformed or oversized (nothing after the envelope was read).
    :raises rate.TooSlow: the payload arrived below the minimum rate.
    :raises asyncio.IncompleteReadError: the stream ended inside the message.
    :raises TimeoutError: no bytes arrived for the channel's idle timeout.
    """
    head = await io.readexactly(codec.HEADER.size)
    n = codec.parse_header(head, max_message_bytes)
    env_bytes = await read_envelope(io, n, known_method)
    env = codec.parse_envelope(env_bytes, max_message_bytes)
    if admit is not None:
        admit(env)
    start = codec.HEADER.size + n
    total = start + env.payload_bytes
    if reserve is not None:
        reserve(total)
    buf = buffers.take(total) if buffers is not None else lazy_buffer(total)
    buf[:codec.HEADER.size] = head
    buf[codec.HEADER.size:start] = env_bytes
    if rate is not None:
        rate.restart()  # the rate is the payload's: the header and envelope were checked already
    try:
        await io.readinto(buf[start:], rate)
    except BaseException:
        if buffers is not None:
            buffers.discard(buf)
        raise
    return buf


async def read_envelope(io: MessageIO, n: int, known_method: Callable[[str], bool] | None = None) -> bytes:
    """Read an envelope of `n` bytes; with `known_method`, refuse an unknown method after reading its name.

    The envelope's first bytes say where its method name lies (`codec.method_prefix`): a name longer than
    `codec.MAX_METHOD_BYTES` is refused from its length alone, an unknown one once its bytes are read, so a
    request with a 2 MB method name costs 3 bytes read, not 2 MB. An envelope that does not start with its
    method (no encoder of ours writes one) is read whole and checked after parsing, as before.

    :raises BadMessage: ``unknown_method``.
    """
    if known_method is None or n < 3:
        return await io.readexactly(n)
    first = await io.readexactly(3)
    where = codec.method_prefix(first)
    if where is None or where[0] + where[1] > n:
        return first + await io.readexactly(n - len(first))  # malformed or reordered: the parser decides
    start, length = where
    read = first + await io.readexactly(start + length - len(first)) if start + length > len(first) else first
    try:
        name = read[start:start + length].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMessage(f"method name is not UTF-8: {e}", code="malformed") from e
    if not known_method(name):
        raise BadMessage(f"unknown method {clip(repr(name), 100)}", code="unknown_method")
    return read + await io.readexactly(n - len(read))
