"""A depth and size guard in front of hivemind's msgpack decoder (`MSGPackSerializer.loads`).

Why a patch. hivemind 1.1.12 decodes peer data before it validates it: ``DHTProtocol.rpc_store`` calls
``serializer.loads`` on the subkey of every store request and on whole dictionaries, ``call_find``
decodes every ``FOUND_DICTIONARY`` reply, and a reader decodes every value it gets, all before (or
without) any `RecordValidatorBase` seeing the bytes. The decoder recurses through the C stack once per
nested tuple (each tuple is an ext type whose hook calls ``msgpack.unpackb`` again), so one value of
about 1 KB, tuples nested 200 deep, crashes the DHT process with a segmentation fault (150 levels still
decode). Whoever can reach a node's DHT port can send it, on every replica of a key. No validator can
stop it, since validators run after the decoder; the only place to stop it is the decoder itself.

What the guard does. `install` wraps ``MSGPackSerializer.loads`` with `check`: an iterative
(non-recursive) scan of the msgpack bytes that follows arrays, maps and the payloads of the ext types
that hivemind decodes (tuples and registered types such as its ``DictionaryDHTValue``), and raises
`HostileMsgpack` (a `ValueError`) when the nesting is deeper than `MAX_DEPTH` or the buffer is larger
than `MAX_BYTES`, before the real decoder runs. hivemind treats it as it treats any malformed peer
data: an RPC handler fails that one request, a `call_find` counts the peer as not responding, a store
is refused. Honest hivemind data nests about five levels deep, so nothing it sends is refused.

Upstream-compatible: the wrapper keeps the signature and the result of ``loads`` for every input it
lets through, installing it twice is a no-op, and it changes nothing else in hivemind. Install it
before the DHT process forks (importing `p2pnode.discovery.dht` does it): the child inherits the patched
class. Refusals are counted per process in `refusals` (the DHT child's counts can be read through
``DHT.run_coroutine``, see `p2pnode.discovery.dht_process.dht_refusals`) and logged (the first few, then every 1000th).
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
from typing import Any

from hivemind.utils.serializer import MSGPackSerializer

__all__ = ["MAX_BYTES", "MAX_DEPTH", "HostileMsgpack", "check", "install", "installed", "refusals"]

logger = logging.getLogger(__name__)

#: Deepest nesting accepted (arrays, maps and decoded ext payloads each count one level).
MAX_DEPTH = 32
#: Largest buffer accepted, in bytes.
MAX_BYTES = 8 * 1024 * 1024
#: Refusals of this process, by reason (``too_deep``, ``oversized``, ``malformed``).
refusals: collections.Counter[str] = collections.Counter()
# A forked DHT process counts its own refusals, not those its parent made before the fork.
os.register_at_fork(after_in_child=refusals.clear)
#: Refusals logged at warning level before only every 1000th is.
_LOUD_REFUSALS = 10

_U8, _U16, _U32 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I")
# Header byte -> bytes that follow it without nesting (fixed-size scalars).
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# Header byte -> width of the length field of bin / str.
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
# fixext header byte -> payload length.
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_LENGTH = {1: _U8, 2: _U16, 4: _U32}

_state = threading.local()


class HostileMsgpack(ValueError):
    """msgpack bytes refused before decoding; `reason` is ``too_deep``, ``oversized`` or ``malformed``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _decoded_ext_codes() -> frozenset[int]:
    """Ext type codes whose payload hivemind decodes as msgpack again (so they nest)."""
    return frozenset({MSGPackSerializer._TUPLE_EXT_TYPE_CODE, *MSGPackSerializer._ext_type_codes})


def check(buf: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> None:
    """Raise `HostileMsgpack` unless `buf` nests at most `max_depth` levels and has at most `max_bytes`.

    Scans one top-level object iteratively: the work is linear in ``len(buf)`` and the Python stack does
    not grow. Truncated input and the never-used byte 0xC1 are ``malformed``; bytes after the first
    object are left to the decoder (which refuses them).
    """
    n = len(buf)
    if n > max_bytes:
        raise HostileMsgpack("oversized", f"msgpack value of {n} bytes exceeds the limit of {max_bytes}")
    nested_ext = _decoded_ext_codes()
    # Frames: [objects still to read, end offset of an ext payload or -1]. The bottom frame is the top level.
    frames: list[list[int]] = [[1, -1]]
    pos = 0
    try:
        while frames:
            top = frames[-1]
            if top[0] == 0:
                frames.pop()
                if top[1] >= 0 and pos != top[1]:
                    raise HostileMsgpack("malformed", "an ext payload holds more or less than one object")
                continue
            top[0] -= 1
            b = buf[pos]
            pos += 1
            if b <= 0x7F or b >= 0xE0:  # positive / negative fixint
                continue
            if b <= 0x8F:  # fixmap
                count = 2 * (b & 0x0F)
            elif b <= 0x9F:  # fixarray
                count = b & 0x0F
            elif b <= 0xBF:  # fixstr
                pos += b & 0x1F
                continue
            elif b in _FIXED:
                pos += _FIXED[b]
                continue
            elif b in _SIZED:
                width = _SIZED[b]
                pos += width + _LENGTH[width].unpack_from(buf, pos)[0]
                continue
            elif b in (0xDC, 0xDD):  # array 16 / 32
                width = 2 if b == 0xDC else 4
                count = _LENGTH[width].unpack_from(buf, pos)[0]
                pos += width
            elif b in (0xDE, 0xDF):  # map 16 / 32
                width = 2 if b == 0xDE else 4
                count = 2 * _LENGTH[width].unpack_from(buf, pos)[0]
                pos += width
            elif b in _FIXEXT or b in (0xC7, 0xC8, 0xC9):
                if b in _FIXEXT:
                    size = _FIXEXT[b]
                else:
                    width = {0xC7: 1, 0xC8: 2, 0xC9: 4}[b]
                    size = _LENGTH[width].unpack_from(buf, pos)[0]
                    pos += width
                code = _U8.unpack_from(buf, pos)[0]
                pos += 1
                if code not in nested_ext:  # left as bytes by hivemind
                    pos += size
                    continue
                if len(frames) > max_depth:
                    raise HostileMsgpack("too_deep", f"msgpack value nests deeper than {max_depth} levels")
                frames.append([1, pos + size])  # the payload is one msgpack object, one level deeper
                continue
            else:  # 0xC1, never used
                raise HostileMsgpack("malformed", f"byte 0x{b:02x} at offset {pos - 1} is not msgpack")
            if len(frames) > max_depth:
                raise HostileMsgpack("too_deep", f"msgpack value nests deeper than {max_depth} levels")
            frames.append([count, -1])
    except (IndexError, struct.error):
        raise HostileMsgpack("malformed", f"msgpack value of {n} bytes is truncated") from None
    if pos > n:
        raise HostileMsgpack("malformed", f"msgpack value of {n} bytes is truncated")


def _refuse(e: HostileMsgpack) -> None:
    refusals[e.reason] += 1
    total = sum(refusals.values())
    if total <= _LOUD_REFUSALS or total % 1000 == 0:
        logger.warning("refused to decode a msgpack value from a peer (%s; %d refused so far): %s",
                       e.reason, total, e)


_original_loads: Any = None


def _guarded_loads(cls: type[MSGPackSerializer], buf: bytes) -> object:
    depth = getattr(_state, "depth", 0)
    if depth == 0:  # nested calls (ext payloads) were covered by the outer scan
        try:
            check(buf)
        except HostileMsgpack as e:
            _refuse(e)
            raise
    _state.depth = depth + 1
    try:
        return _original_loads(cls, buf)
    finally:
        _state.depth = depth


_guarded_loads.__p2pnode_guard__ = True  # type: ignore[attr-defined]


def installed() -> bool:
    """Whether `install` has patched ``MSGPackSerializer.loads`` in this process."""
    return getattr(MSGPackSerializer.__dict__["loads"].__func__, "__p2pnode_guard__", False)


def install() -> None:
    """Put `check` in front of ``MSGPackSerializer.loads`` (idempotent; see the module doc)."""
    global _original_loads
    if installed():
        return
    _original_loads = MSGPackSerializer.__dict__["loads"].__func__
    MSGPackSerializer.loads = classmethod(_guarded_loads)  # type: ignore[assignment,method-assign]
