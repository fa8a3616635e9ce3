"""Receive buffers: lazily mapped (`lazy_buffer`) and reused once nothing refers to them (`ReceiveBuffers`).

A reader maps one buffer for a whole message once its header and envelope have passed the size checks
(`p2pnode.transport.framing.read_message`). A buffer of at least `LAZY_MIN_BYTES` is an anonymous
private mapping (`lazy_buffer`): its pages cost memory only when bytes are written into them, so an
announced message costs resident memory at the rate its bytes arrive, not at its announced size (the
receive budget still reserves the announced size, as accounting).

A fresh 100 MB buffer costs about as much CPU as receiving it over a plain socket (zero-filling and page
faults), so buffers of at least `POOLED_MIN_BYTES` are kept and handed out again (`ReceiveBuffers`, at
most ``max_bytes``, default 512 MiB); a buffer whose message was refused is dropped from the pool, so
that large malformed messages do not leave the pool holding memory.
"""

from __future__ import annotations

import mmap
import sys

#: Default most bytes of receive buffers kept for reuse (512 MiB); 0 turns reuse off.
DEFAULT_RECEIVE_POOL_BYTES = 512 << 20
#: Messages smaller than this get a fresh buffer (reuse pays off for large ones only), in bytes.
POOLED_MIN_BYTES = 1 << 20
#: Receive buffers of at least this many bytes are anonymous mappings whose pages are touched only as
#: bytes arrive (`lazy_buffer`); smaller ones are plain `bytearray`s (a mapping costs two system calls,
#: not worth it for so few bytes; a peer holds at most ``max_streams_per_peer`` of them at once).
LAZY_MIN_BYTES = 256 << 10

#: A receive buffer: a `bytearray` (small) or an anonymous private mapping (large, see `lazy_buffer`).
Buffer = bytearray | mmap.mmap


def lazy_buffer(nbytes: int) -> memoryview:
    """A writable, zero-filled buffer of `nbytes` bytes that costs resident memory only where it is written.

    From `LAZY_MIN_BYTES` on, the buffer is an anonymous private mapping: the kernel hands out its pages
    (zeroed) on the first write to each, so a message announced at 1 GiB whose sender then stalls costs
    the bytes it sent, not 1 GiB. (``bytearray(n)`` zero-fills, so touches, every page at once.) The
    mapping is unmapped when the last reference to it (a memoryview, a tensor built on it) is gone.
    """
    if nbytes < LAZY_MIN_BYTES:
        return memoryview(bytearray(nbytes))
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))


class ReceiveBuffers:
    """Receive buffers that are reused once nothing refers to them any more.

    A fresh 100 MB buffer costs about as much CPU as receiving it over a plain socket (zero-filling and
    page faults), so large buffers are kept and handed out again. A buffer is free when its only
    reference is this pool's: tensors decoded from a message keep a reference to its buffer (through
    the memoryview they were built on), so a buffer whose tensors a handler kept is never overwritten.

    :param max_bytes: most bytes kept for reuse (default 512 MiB); 0 turns reuse off.
    """

    def __init__(self, max_bytes: int = DEFAULT_RECEIVE_POOL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._bufs: list[Buffer] = []
        self.reused = 0
        #: Buffers dropped from the pool because their message was refused or broke off.
        self.discarded = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers the pool keeps (free or in use)."""
        return sum(len(b) for b in self._bufs)

    def discard(self, view: memoryview) -> None:
        """Drop the buffer under `view` from the pool: its message was refused or never completed.

        A refused message says nothing about the sizes honest peers send; keeping its buffer would let
        large malformed messages leave the pool holding up to ``max_bytes``. The memory is freed once
        the caller's last reference to `view` is gone.
        """
        obj = view.obj
        for i, buf in enumerate(self._bufs):
            if buf is obj:
                del self._bufs[i]
                self.discarded += 1
                return

    def trim(self, max_bytes: int = 0) -> int:
        """Drop free buffers, oldest first, until at most `max_bytes` are kept; return the bytes dropped."""
        dropped, i = 0, 0
        total = self.held_bytes
        while i < len(self._bufs) and total > max_bytes:
            if sys.getrefcount(self._bufs[i]) == 2:
                total -= len(self._bufs[i])
                dropped += len(self._bufs[i])
                del self._bufs[i]
            else:
                i += 1
        return dropped

    def take(self, nbytes: int) -> memoryview:
        """A writable buffer of exactly `nbytes` bytes (its contents are undefined).

        A new buffer is a `lazy_buffer`: it costs memory as it is written. A reused one was written
        before, so it costs nothing more.
        """
        if nbytes < POOLED_MIN_BYTES or nbytes > self.max_bytes:
            return lazy_buffer(nbytes)
        best = -1
        for i in range(len(self._bufs)):
            size = len(self._bufs[i])
            # 2 references: this list and getrefcount's argument. Sizes up to 2x avoid wasting a huge
            # buffer on a small message.
            if (nbytes <= size <= 2 * nbytes and sys.getrefcount(self._bufs[i]) == 2
                    and (best < 0 or size < len(self._bufs[best]))):
                best = i
        if best >= 0:
            self.reused += 1
            return memoryview(self._bufs[best])[:nbytes]
        view = lazy_buffer(nbytes)
        self._admit(view.obj)  # type: ignore[arg-type]
        return view

    def _admit(self, buf: Buffer) -> None:
        total = sum(len(b) for b in self._bufs)
        if total + len(buf) > self.max_bytes:
            # Drop free buffers, oldest first, until the new one fits.
            i = 0
            while i < len(self._bufs) and total + len(buf) > self.max_bytes:
                if sys.getrefcount(self._bufs[i]) == 2:
                    total -= len(self._bufs[i])
                    del self._bufs[i]
                else:
                    i += 1
        if total + len(buf) <= self.max_bytes:
            self._bufs.append(buf)
