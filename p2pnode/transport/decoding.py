"""Receiving compressed tensors: header checks before anything is allocated, then decoding with the checks
of the values (the formats: `p2pnode.transport.compression`).

`check_spec` refuses a header whose fields do not add up (``bad_compression``, ``bad_blocks``,
``bad_index``, an int8 ``scale_exponent`` out of range ``bad_scale``); `decode` refuses NaN, infinite or
negative int8 scales (``bad_scale``), top-k indices out of range or order (``bad_index``), and values that
decode to NaN or Inf (``non_finite``). The transport counts each under its reason (`TrafficStats.rejected`).
"""

from __future__ import annotations

import math

import torch

from p2pnode.errors import BadMessage
from p2pnode.proto import peer_pb2
from p2pnode.transport.compression import (
    _KIND_OF,
    FLOAT_DTYPES,
    MAX_BLOCK_SIZE,
    MAX_TOPK_NUMEL,
    SCALE_DTYPES,
    SCALE_EXPONENT_MAX,
    SCALE_EXPONENT_MIN,
    _all_finite,
    _blocks,
    _int8_values,
    _scale_values,
)

__all__ = ["check_spec", "decode"]


def _numel(spec: peer_pb2.TensorSpec) -> int:
    return math.prod(spec.shape)


def check_spec(spec: peer_pb2.TensorSpec, itemsize: int) -> tuple[int, int]:
    """Check one tensor header; return (bytes on the wire, bytes once decoded). Allocates nothing.

    Args:
        spec: the header (its dtype name is known and its shape valid: `codec.parse_envelope` checks them).
        itemsize: bytes per element of the decoded dtype.

    Raises `BadMessage` (``bad_compression``, ``bad_blocks``, ``bad_index``) when the fields disagree (an
    unknown int8 ``scale_dtype`` is ``bad_compression``, a ``scale_exponent`` out of range ``bad_scale``).
    """
    n = _numel(spec)
    raw = n * itemsize
    kind = _KIND_OF.get(spec.compression)
    name = repr(spec.name[:100])
    if kind is None:
        raise BadMessage(f"tensor {name} has unknown compression {int(spec.compression)}", code="bad_compression")
    if kind == "none":
        if (spec.wire_bytes or spec.block_size or spec.blocks or spec.k or spec.value_dtype or spec.scale_dtype
                or spec.scale_exponent):
            raise BadMessage(f"uncompressed tensor {name} carries compression fields", code="bad_compression")
        return raw, raw
    if spec.dtype not in FLOAT_DTYPES:
        raise BadMessage(f"tensor {name} of dtype {spec.dtype[:20]!r} is compressed; only floating tensors "
                         f"may be", code="bad_compression")
    if kind != "int8" and (spec.block_size or spec.blocks or spec.scale_dtype or spec.scale_exponent):
        raise BadMessage(f"{kind} tensor {name} carries int8 block fields", code="bad_compression")
    if kind != "topk" and (spec.k or spec.value_dtype):
        raise BadMessage(f"{kind} tensor {name} carries top-k fields", code="bad_compression")
    if kind in ("fp16", "bf16"):
        expected = 2 * n
    elif kind == "int8":
        if spec.block_size > MAX_BLOCK_SIZE:
            raise BadMessage(f"int8 tensor {name} has block size {spec.block_size} > {MAX_BLOCK_SIZE}",
                             code="bad_blocks")
        blocks = _blocks(n, spec.block_size)
        if spec.blocks != blocks:
            raise BadMessage(f"int8 tensor {name} of {n} elements in blocks of {spec.block_size} needs {blocks} "
                             f"scales, its header says {spec.blocks}", code="bad_blocks")
        if spec.scale_dtype not in SCALE_DTYPES:
            raise BadMessage(f"int8 tensor {name} has unknown scale dtype {spec.scale_dtype[:20]!r}",
                             code="bad_compression")
        if spec.scale_exponent and SCALE_DTYPES[spec.scale_dtype] != torch.float16:
            raise BadMessage(f"int8 tensor {name} has a scale exponent with float32 scales", code="bad_compression")
        if not SCALE_EXPONENT_MIN <= spec.scale_exponent <= SCALE_EXPONENT_MAX:
            raise BadMessage(f"int8 tensor {name} has scale exponent {spec.scale_exponent} outside "
                             f"[{SCALE_EXPONENT_MIN}, {SCALE_EXPONENT_MAX}]", code="bad_scale")
        expected = SCALE_DTYPES[spec.scale_dtype].itemsize * blocks + n
    else:
        if spec.value_dtype and spec.value_dtype not in FLOAT_DTYPES:
            raise BadMessage(f"top-k tensor {name} has unknown value dtype {spec.value_dtype[:20]!r}",
                             code="bad_compression")
        if n > MAX_TOPK_NUMEL:
            raise BadMessage(f"top-k tensor {name} of {n} elements: indices are int32", code="bad_compression")
        if spec.k > n:
            raise BadMessage(f"top-k tensor {name} keeps {spec.k} of {n} elements", code="bad_index")
        value_size = FLOAT_DTYPES[spec.value_dtype or spec.dtype].itemsize
        expected = spec.k * (4 + value_size)
    if spec.wire_bytes != expected:
        raise BadMessage(f"{kind} tensor {name} of shape {list(spec.shape)[:16]} takes {expected} bytes, its header "
                         f"says {spec.wire_bytes}", code="bad_compression")
    return expected, raw


def _finite(t: torch.Tensor, what: str) -> None:
    if not _all_finite(t):
        raise BadMessage(f"{what} decodes to NaN or Inf", code="non_finite")


def decode(spec: peer_pb2.TensorSpec, chunk: memoryview) -> torch.Tensor:
    """Decode one compressed tensor from its wire bytes (`check_spec` passed; ``len(chunk) == wire_bytes``).

    Raises `BadMessage` (``bad_scale``, ``bad_index``, ``non_finite``); returns a fresh tensor of the
    spec's dtype and shape.
    """
    kind = _KIND_OF[spec.compression]
    dtype = FLOAT_DTYPES[spec.dtype]
    shape = tuple(spec.shape)
    n = _numel(spec)
    name = repr(spec.name[:100])
    data = chunk.cast("B") if chunk.format != "B" else chunk

    def view(start: int, count: int, dt: torch.dtype) -> torch.Tensor:
        # One copy per part, straight from the message: a writable, aligned buffer whatever the part's
        # offset in the message, and no tensor refers to the (reused) receive buffer. Slicing the
        # memoryview copies nothing; before, bytes(chunk) then a bytes slice then bytearray() copied
        # every byte three times (a 50 MB float32 slice sent as fp16: 67 -> 50 ms CPU to decode).
        if count == 0:
            return torch.zeros(0, dtype=dt)
        return torch.frombuffer(bytearray(data[start:start + count * dt.itemsize]), dtype=dt)

    if kind in ("fp16", "bf16"):
        out = view(0, n, torch.float16 if kind == "fp16" else torch.bfloat16).to(dtype)
        _finite(out, f"tensor {name}")
        return out.reshape(shape)
    if kind == "int8":
        sdtype = SCALE_DTYPES[spec.scale_dtype]
        scale = view(0, spec.blocks, sdtype)
        # float16: shifted by the header's power of two (NaN/Inf bits stay NaN/Inf; a product may overflow).
        scale = _scale_values(scale, spec.scale_exponent) if sdtype == torch.float16 else scale
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise BadMessage(f"int8 tensor {name} has a NaN, infinite or negative scale", code="bad_scale")
        codes = view(sdtype.itemsize * spec.blocks, n, torch.int8)
        out = _int8_values(scale, codes, spec.block_size, n)
        _finite(out, f"int8 tensor {name}")  # finite scales can still overflow float32 times 127
        return out.to(dtype).reshape(shape)
    vdtype = FLOAT_DTYPES[spec.value_dtype or spec.dtype]
    k = spec.k
    idx = view(0, k, torch.int32).to(torch.int64)
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all())):
        raise BadMessage(f"top-k tensor {name} has indices out of [0, {n}), repeated or out of order",
                         code="bad_index")
    values = view(4 * k, k, vdtype)
    _finite(values, f"top-k tensor {name}")
    out = torch.zeros(n, dtype=dtype)
    out[idx] = values.to(dtype)
    _finite(out, f"top-k tensor {name}")
    return out.reshape(shape)
