"""Wire format of one request or response: a length-prefixed `Envelope` followed by raw tensor bytes.

Layout (all integers little-endian)::

    u32 envelope_length | Envelope (protobuf) | tensor 0 bytes | tensor 1 bytes | ...

Tensors travel as raw little-endian bytes with a dtype name and a shape from `TensorSpec`; the receiver
checks the dtype against an allowlist and the sizes against the envelope before it builds any tensor.
Nothing is ever unpickled.

A floating tensor may instead travel compressed (`p2pnode.transport.compression`: fp16, bf16, int8,
top-k): its `TensorSpec` says how, the receiver decodes by the header alone, and the decoded size that
the headers announce is checked against ``max_message_bytes`` before anything is allocated. A message
without compression is byte for byte what it was before compression existed.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from p2pnode.errors import BadMessage
from p2pnode.proto import peer_pb2
from p2pnode.transport import compression as _compression
from p2pnode.transport import decoding as _decoding
from p2pnode.transport.clock import wall_time
from p2pnode.transport.compression import CompressedTensor, Compression

HEADER = struct.Struct("<I")
#: Largest envelope (the protobuf part, without tensor bytes) a receiver accepts, in bytes.
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
#: Default largest whole message (envelope and tensor bytes), in bytes: 1 GiB.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
#: Most tensors one message may carry.
MAX_TENSORS = 4096
#: Length of the random nonce every encoded message carries, in bytes.
NONCE_BYTES = 16
#: Longest method name a receiver accepts, in bytes (ours are under 40). A longer name is refused as
#: ``unknown_method`` from its length alone, before the rest of its envelope is read (`method_prefix`).
MAX_METHOD_BYTES = 256
#: The envelope's first byte when it starts with its method: field 1, length-delimited. Serializers write
#: fields in field-number order, so every envelope of ours with a method starts so.
_METHOD_TAG = 0x0A

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

B = TypeVar("B", bound=ProtoMessage)


@dataclass
class Message(Generic[B]):
    """A request or response: a protobuf `body` and named tensors that travel as raw bytes.

    Sending side only (a received message has every tensor decoded in `tensors`):

    - `compression`: encode the floating tensors of `tensors` in this format (None: raw bytes);
    - `compressed`: tensors compressed already (for example by `compression.ErrorFeedback`), sent after
      `tensors`; their names must differ from those in `tensors`.
    """

    body: B
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    compression: Compression | None = None
    compressed: dict[str, CompressedTensor] = field(default_factory=dict)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # Viewing as uint8 is zero-copy; bfloat16 has no numpy dtype, so go through bytes of uint8.
    # reshape first: a 0-dim tensor of a multi-byte dtype cannot be viewed as uint8 directly.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode(
    method: str,
    body: ProtoMessage,
    tensors: Mapping[str, torch.Tensor] | None = None,
    *,
    error: int = 0,
    error_message: str = "",
    nonce: bytes | None = None,
    sent_at: float | None = None,
    admission: bytes = b"",
    compression: Compression | None = None,
    compressed: Mapping[str, CompressedTensor] | None = None,
) -> list[memoryview]:
    """Encode one message as a list of buffers to write in order (no copy of tensor data).

    Args:
        nonce: the envelope's nonce (default: `NONCE_BYTES` fresh random bytes).
        sent_at: the envelope's send time, in seconds (default: `clock.wall_time`, the virtual clock
            inside the simulator). Receivers refuse replayed or stale requests by these two fields.
        admission: the sender's admission proof (`p2pnode.transport.admission`; empty in open runs).
        compression: wire format of the floating tensors of `tensors` (default None: raw bytes).
        compressed: tensors already compressed, sent after `tensors` (names distinct from theirs).
    """
    return encode_sized(method, body, tensors, error=error, error_message=error_message, nonce=nonce,
                        sent_at=sent_at, admission=admission, compression=compression,
                        compressed=compressed)[0]


def encode_sized(
    method: str,
    body: ProtoMessage,
    tensors: Mapping[str, torch.Tensor] | None = None,
    *,
    error: int = 0,
    error_message: str = "",
    nonce: bytes | None = None,
    sent_at: float | None = None,
    admission: bytes = b"",
    compression: Compression | None = None,
    compressed: Mapping[str, CompressedTensor] | None = None,
) -> tuple[list[memoryview], int]:
    """`encode`, and the size of the message's tensors once decoded, in bytes (their uncompressed size)."""
    env = peer_pb2.Envelope(method=method, body=body.SerializeToString(), error=error,  # type: ignore[arg-type]
                            error_message=error_message,
                            nonce=secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce,
                            sent_at=wall_time() if sent_at is None else sent_at,
                            admission=admission)
    parts: list[memoryview] = []
    total = 0
    raw = 0
    plain = tensors or {}
    lossy = compression is not None and compression.lossy
    items: list[tuple[str, torch.Tensor | CompressedTensor]] = [*plain.items(), *(compressed or {}).items()]
    if compressed and not set(plain).isdisjoint(compressed):
        raise ValueError(f"tensor names sent both raw and compressed: {sorted(set(plain) & set(compressed))[:3]}")
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which cannot be sent; "
                             f"allowed: {sorted(DTYPES)}")
        if isinstance(t, torch.Tensor) and lossy:
            assert compression is not None
            t = _compression.compress(t, compression)
        spec = env.tensors.add(name=name, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape))
        if isinstance(t, torch.Tensor):
            bufs = [_tensor_bytes(t)]
            raw += bufs[0].nbytes
        else:
            t.fill_spec(spec)
            bufs = [_tensor_bytes(p) for p in t.parts]
            raw += t.raw_bytes
        for buf in bufs:
            total += buf.nbytes
            parts.append(buf)
    env.payload_bytes = total
    head = env.SerializeToString()
    return [memoryview(HEADER.pack(len(head)) + head), *parts], raw


def encoded_size(parts: Sequence[memoryview]) -> int:
    """Total number of bytes of an encoded message."""
    return sum(p.nbytes for p in parts)


def join(parts: Sequence[memoryview]) -> bytes:
    """Concatenate an encoded message into one `bytes` object."""
    return b"".join(parts)


def parse_header(prefix: bytes | memoryview, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> int:
    """Read the envelope length from the first 4 bytes and check it against the limits."""
    if len(prefix) < HEADER.size:
        raise BadMessage("message shorter than its 4-byte header", code="malformed")
    (n,) = HEADER.unpack_from(prefix)
    if n > MAX_ENVELOPE_BYTES or n > max_message_bytes:
        raise BadMessage(f"envelope of {n} bytes exceeds the limit of {min(MAX_ENVELOPE_BYTES, max_message_bytes)}",
                         code="oversized")
    return int(n)


def method_prefix(prefix: bytes) -> tuple[int, int] | None:
    """Where the method name of an envelope that starts with `prefix` (its first 3 bytes or fewer) lies.

    Returns ``(start, length)`` of the name's bytes inside the envelope, or None when the envelope does not
    start with its method field (then only parsing the whole envelope tells its method).

    :raises BadMessage: ``unknown_method`` when the name is longer than `MAX_METHOD_BYTES` (known from its
        length's varint alone: no byte of the name needs to be read).
    """
    if len(prefix) < 2 or prefix[0] != _METHOD_TAG:
        return None
    length = prefix[1] & 0x7F
    if not prefix[1] & 0x80:
        return 2, length
    # A name of at most MAX_METHOD_BYTES (< 2**14) has a varint length of at most two bytes.
    if len(prefix) < 3 or prefix[2] & 0x80:
        raise BadMessage(f"method name of {1 << 14} bytes or more; the longest accepted is {MAX_METHOD_BYTES}",
                         code="unknown_method")
    length |= prefix[2] << 7
    if length > MAX_METHOD_BYTES:
        raise BadMessage(f"method name of {length} bytes; the longest accepted is {MAX_METHOD_BYTES}",
                         code="unknown_method")
    return 3, length


def parse_envelope(data: bytes | memoryview, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                   ) -> peer_pb2.Envelope:
    """Parse and check an envelope (without its tensor bytes)."""
    env = peer_pb2.Envelope()
    try:
        env.ParseFromString(bytes(data))
    except (DecodeError, ValueError) as e:
        raise BadMessage(f"cannot parse envelope: {e}", code="malformed") from e
    if len(env.tensors) > MAX_TENSORS:
        raise BadMessage(f"{len(env.tensors)} tensors in one message; the limit is {MAX_TENSORS}", code="malformed")
    if env.payload_bytes + len(data) + HEADER.size > max_message_bytes:
        raise BadMessage(f"message of {env.payload_bytes + len(data)} bytes exceeds the limit of "
                         f"{max_message_bytes} bytes", code="oversized")
    expected = 0
    decoded = 0
    for spec in env.tensors:
        if spec.dtype not in DTYPES:
            raise BadMessage(f"tensor {spec.name!r} has unknown dtype {spec.dtype!r}", code="bad_shape")
        if any(d < 0 for d in spec.shape) or len(spec.shape) > 16:
            raise BadMessage(f"tensor {spec.name!r} has an invalid shape {list(spec.shape)}", code="malformed")
        wire, raw = _decoding.check_spec(spec, DTYPES[spec.dtype].itemsize)
        expected += wire
        decoded += raw
    if expected != env.payload_bytes:
        raise BadMessage(f"tensor specs need {expected} bytes but the envelope announces {env.payload_bytes}",
                         code="malformed")
    # Compressed tensors grow when decoded: the limit holds for what this node would allocate.
    if decoded + len(data) + HEADER.size > max_message_bytes:
        raise BadMessage(f"message decodes to {decoded + len(data)} bytes, beyond the limit of "
                         f"{max_message_bytes} bytes", code="oversized")
    return env


def decoded_bytes(env: peer_pb2.Envelope) -> int:
    """Size of an (already checked) envelope's tensors once decoded, in bytes."""
    return sum(_decoding.check_spec(s, DTYPES[s.dtype].itemsize)[1] for s in env.tensors)


def decode_tensors(env: peer_pb2.Envelope, payload: bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Build tensors over `payload` (no copy when `payload` is a writable buffer)."""
    if len(payload) != env.payload_bytes:
        raise BadMessage(f"received {len(payload)} tensor bytes, envelope announces {env.payload_bytes}",
                         code="malformed")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    view = memoryview(payload)
    for spec in env.tensors:
        dtype = DTYPES[spec.dtype]
        if spec.name in out:
            raise BadMessage(f"tensor {spec.name!r} appears twice", code="malformed")
        if spec.compression != peer_pb2.COMPRESSION_NONE:
            nbytes = spec.wire_bytes
            out[spec.name] = _decoding.decode(spec, view[offset:offset + nbytes])
            offset += nbytes
            continue
        numel = 1
        for d in spec.shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if nbytes == 0:
            out[spec.name] = torch.empty(tuple(spec.shape), dtype=dtype)
        else:
            chunk = view[offset:offset + nbytes]
            if chunk.readonly:
                chunk = memoryview(bytearray(chunk))
            out[spec.name] = torch.frombuffer(chunk, dtype=torch.uint8).view(dtype).reshape(tuple(spec.shape))
        offset += nbytes
    return out


def decode(data: bytes | bytearray | memoryview, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
           ) -> tuple[peer_pb2.Envelope, dict[str, torch.Tensor]]:
    """Decode a whole message held in memory."""
    view = memoryview(data)
    if view.nbytes > max_message_bytes:
        raise BadMessage(f"message of {view.nbytes} bytes exceeds the limit of {max_message_bytes} bytes",
                         code="oversized")
    n = parse_header(view, max_message_bytes)
    if view.nbytes < HEADER.size + n:
        raise BadMessage("message ends inside its envelope", code="malformed")
    env = parse_envelope(view[HEADER.size:HEADER.size + n], max_message_bytes)
    payload = view[HEADER.size + n:]
    return env, decode_tensors(env, payload)


def parse_body(env: peer_pb2.Envelope, body_type: type[B]) -> B:
    """Parse the method-specific body of an envelope."""
    body = body_type()
    try:
        body.ParseFromString(env.body)
    except (DecodeError, ValueError) as e:
        raise BadMessage(f"cannot parse {body_type.__name__} body: {e}", code="malformed") from e
    return body


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> None:
    """Check that `tensors` has exactly the expected names, shapes and dtypes, and only finite values.

    Raises `BadMessage` with code ``bad_shape`` or ``non_finite``.
    """
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        raise BadMessage(f"tensor names differ from this run's model (missing {missing}, unexpected {extra})",
                         code="bad_shape")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise BadMessage(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}", code="bad_shape")
        if t.dtype != dtype:
            raise BadMessage(f"tensor {name!r} has dtype {t.dtype}, expected {dtype}", code="bad_shape")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadMessage(f"tensor {name!r} holds NaN or Inf", code="non_finite")
