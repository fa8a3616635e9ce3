"""Compressed tensors on the wire: fp16, bf16, blockwise int8 and top-k, with error feedback.

A `Compression` names a format (``none``, ``fp16``, ``bf16``, ``int8[:<block>]``, ``topk:<fraction>``);
`compress` turns one floating-point tensor into a `CompressedTensor` (the byte parts that go on the
wire and the header fields of its `TensorSpec`), `decompress` turns it back, exactly as a receiver does.
The receiver needs no setting of its own: every tensor's `TensorSpec` says how it was encoded, and
`p2pnode.transport.decoding` (`check_spec`, header only, before anything is allocated, and `decode`,
payload) refuses whatever does not add up, with a reason code that the transport counts
(`TrafficStats.rejected`):

- ``bad_compression``: an unknown format, a compressed non-floating dtype, fields of another format, or
  header sizes that disagree (``wire_bytes`` against the format's layout);
- ``bad_blocks``: an int8 tensor whose scale count is not ``ceil(numel / block_size)`` (or 1);
- ``bad_scale``: an int8 scale that is NaN, infinite or negative;
- ``bad_index``: top-k indices out of range, repeated or out of order, or ``k > numel``;
- ``non_finite``: values that decode to NaN or Inf.

Wire layout of one tensor (little-endian, ``n = numel``):

- fp16 / bf16: ``n`` 2-byte values;
- int8: ``blocks`` scales (``scale_dtype``: float16 times ``2^scale_exponent``, the exponent chosen per
  tensor so that its largest scale is near 2^14, where every nonzero scale then lands in float16's normal
  range; else float32), then ``n`` int8 codes; element ``i`` is ``code[i] * scale[i // block]`` (one
  scale when ``block_size`` is 0); codes are ``round(x / scale)`` with ``scale = absmax / 127`` (in float16
  rounded up, so that no code exceeds 127), so the error of each element is at most half its block's scale;
- top-k: ``k`` int32 indices, strictly increasing, then ``k`` values (of ``value_dtype``, default the
  tensor's dtype); every other element is 0.

`p2pnode.transport.feedback.ErrorFeedback` keeps, per stream (a destination peer, or one stream for
everyone), what lossy compression left out, and adds it to the next message of that stream, so that the
sum of what a receiver decodes over rounds tracks the sum of what was meant (docs/compression.md).

Pure tensor code: it imports only the generated protos and the error types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from p2pnode.errors import ConfigError
from p2pnode.proto import peer_pb2

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "NONE",
    "CompressedTensor",
    "Compression",
    "check_combination",
    "compress",
    "compress_exact",
    "compress_state",
    "compress_state_exact",
    "decompress",
    "model_format",
    "parse_compression",
]

#: Default int8 block: elements per scale. 1024 costs 0.2 % in float16 scales (0.4 % in float32; 3.99x
#: smaller than float32) while keeping each block's error tied to its own largest value.
DEFAULT_BLOCK_SIZE = 1024
#: Largest int8 block size accepted (header field), in elements.
MAX_BLOCK_SIZE = 1 << 24
#: Most elements a top-k tensor may have: its indices are int32.
MAX_TOPK_NUMEL = (1 << 31) - 1
#: Most streams an `ErrorFeedback` keeps a residual for (the least recently used is forgotten).
DEFAULT_MAX_STREAMS = 16

KINDS = ("none", "fp16", "bf16", "int8", "topk")
_ENUM = {
    "none": peer_pb2.COMPRESSION_NONE, "fp16": peer_pb2.COMPRESSION_FP16, "bf16": peer_pb2.COMPRESSION_BF16,
    "int8": peer_pb2.COMPRESSION_INT8, "topk": peer_pb2.COMPRESSION_TOPK,
}
_KIND_OF = {v: k for k, v in _ENUM.items()}
#: Decoded dtypes a compressed tensor may have (only floating tensors are compressed).
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
_FLOAT_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
_FP16_MAX = float(torch.finfo(torch.float16).max)
#: Smallest normal float16 (2^-14): int8 scales travel as float16 only where every nonzero one, shifted by the
#: tensor's exponent, is at least this, so that rounding one up (by at most 2^-10 of it) keeps its block's
#: absmax at code 127 and a decoded tensor re-encodes to the same scales and codes (`compress_exact`).
_FP16_MIN_NORMAL = float(torch.finfo(torch.float16).tiny)
#: Range of ``TensorSpec.scale_exponent``: 2^e is a normal float32 (header outside it: ``bad_scale``).
SCALE_EXPONENT_MIN, SCALE_EXPONENT_MAX = -126, 127
#: The float16 value the largest scale of a tensor is shifted to (by a power of two): 2^14 leaves 28
#: binades below it in float16's normal range and a factor 4 above.
_SCALE_TOP = 14
#: dtypes int8 scales may travel in (``TensorSpec.scale_dtype``; empty means float32).
SCALE_DTYPES: dict[str, torch.dtype] = {"": torch.float32, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class Compression:
    """A wire format for floating-point tensors.

    Args:
        kind: ``none``, ``fp16``, ``bf16``, ``int8`` or ``topk``.
        block_size: int8 only: elements per scale (default `DEFAULT_BLOCK_SIZE`; 0: one scale per tensor).
        fraction: topk only: share of each tensor's elements kept, in (0, 1].
    """

    kind: str = "none"
    block_size: int = DEFAULT_BLOCK_SIZE
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown compression {self.kind!r}; expected one of none, fp16, bf16, "
                             f"int8[:<block>], topk:<fraction>")
        if not 0 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"int8 block size must be in [0, {MAX_BLOCK_SIZE}] (0: per tensor), got {self.block_size}")
        if not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ValueError(f"topk fraction must be in (0, 1], got {self.fraction!r}")

    @property
    def lossy(self) -> bool:
        """Whether decoding loses information (every format but ``none``)."""
        return self.kind != "none"

    @property
    def sparse(self) -> bool:
        """Whether the format drops elements (topk): fit for updates, not for whole models."""
        return self.kind == "topk"

    def __str__(self) -> str:
        if self.kind == "int8":
            return "int8" if self.block_size == DEFAULT_BLOCK_SIZE else f"int8:{self.block_size}"
        if self.kind == "topk":
            return f"topk:{self.fraction:g}"
        return self.kind


#: No compression: tensors travel as their raw bytes.
NONE = Compression()


def parse_compression(spec: str | Compression | None) -> Compression:
    """A `Compression` from its text (``none``, ``fp16``, ``bf16``, ``int8``, ``int8:<block>``,
    ``topk:<fraction>``); None is ``none``. Raises `ValueError` with the accepted forms."""
    if spec is None:
        return NONE
    if isinstance(spec, Compression):
        return spec
    text = spec.strip().lower()
    kind, _, arg = text.partition(":")
    try:
        if kind == "int8":
            return Compression("int8", block_size=int(arg) if arg else DEFAULT_BLOCK_SIZE)
        if kind == "topk":
            if not arg:
                raise ValueError("topk needs a fraction, for example topk:0.01")
            return Compression("topk", fraction=float(arg))
        if arg:
            raise ValueError(f"{kind} takes no parameter")
        return Compression(kind)
    except ValueError as e:
        raise ValueError(f"invalid compression {spec!r}: {e}") from e


#: `model_format`'s default choice: the run's format, int8 under a sparse one.
AUTO = "auto"


def model_format(run: Compression | str | None, choice: str | None = AUTO) -> Compression:
    """The wire format of whole models where a run's exchanges also carry them (modest and fl versions,
    top-ups, base pulls), given the run's format `run` and the choice of ``model_compression``.

    ``auto`` (default; None too): the run's format when it is dense (none, fp16, bf16, int8); under a sparse
    one (topk), which fits updates only, int8 with the default block: a run that sparsifies its uploads to
    save bytes would otherwise send every version as a raw float32 model, half of its traffic or more.
    Anything else: that dense format, whatever the run's (``none`` keeps versions raw).

    Raises `ValueError` (its message naming ``model_compression``): an unparsable choice, or a sparse one
    (a version is a whole model).
    """
    run_c = parse_compression(run)
    if choice is None or choice.strip().lower() == AUTO:
        return Compression("int8") if run_c.sparse else run_c
    try:
        c = parse_compression(choice)
    except ValueError as e:
        raise ValueError(f"model_compression: {e}") from None
    if c.sparse:
        raise ValueError(f"model_compression={c} keeps only a fraction of each tensor, and a version is a whole "
                         f"model; use none, fp16, bf16, int8[:BLOCK] or auto")
    return c


def check_combination(compression: Compression | str | None, *, secagg: bool = False,
                      payload: str = "updates") -> Compression:
    """Refuse a compression that cannot work with the rest of a run's setup; return it parsed.

    Args:
        compression: the wire format.
        secagg: whether the exchanged values go through secure aggregation.
        payload: what the protocol sends: ``updates`` (pseudo-gradients, deltas) or ``models``.

    Raises `ConfigError`: a lossy format with secure aggregation (secagg masks its own fixed-point
    encoding of each update, ``p2pnode.secagg.quantize``: masked values are uniform in the field, so no
    further compression applies, and compressing before masking would change what the masks cancel);
    a sparse format (topk) for whole models.
    """
    c = parse_compression(compression)
    if secagg and c.lossy:
        raise ConfigError(f"compression={c} cannot be combined with secure aggregation: secagg sends its own "
                          f"fixed-point encoding of each masked update (its quantization bits set the precision); "
                          f"use compression=none with secagg")
    if payload not in ("updates", "models"):
        raise ValueError(f"payload must be 'updates' or 'models', got {payload!r}")
    if payload == "models" and c.sparse:
        raise ConfigError(f"compression={c} keeps only a fraction of each tensor: it fits updates (DiLoCo "
                          f"pseudo-gradients), not whole models; use fp16, bf16 or int8")
    return c


@dataclass(frozen=True)
class CompressedTensor:
    """One tensor as it goes on the wire: its header fields and byte parts, in order.

    `parts` are contiguous CPU tensors whose raw bytes follow one another on the wire; `raw_bytes` is
    the size of the decoded tensor. A tensor with `kind` ``none`` is the tensor itself, uncompressed.
    """

    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: tuple[torch.Tensor, ...]
    block_size: int = 0
    blocks: int = 0
    k: int = 0
    #: int8 with float16 scales: the scales are ``parts[0] * 2^scale_exponent``.
    scale_exponent: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def wire_bytes(self) -> int:
        """Bytes of this tensor on the wire."""
        return sum(p.numel() * p.element_size() for p in self.parts)

    @property
    def raw_bytes(self) -> int:
        """Bytes of the decoded tensor."""
        return self.numel * self.dtype.itemsize

    def fill_spec(self, spec: peer_pb2.TensorSpec) -> None:
        """Write the compression fields of `spec` (nothing for ``none``: the header stays as it was)."""
        if self.kind == "none":
            return
        spec.compression = _ENUM[self.kind]  # type: ignore[assignment]
        spec.wire_bytes = self.wire_bytes
        if self.kind == "int8":
            spec.block_size, spec.blocks = self.block_size, self.blocks
            if self.parts[0].dtype == torch.float16:
                spec.scale_dtype = "float16"
                spec.scale_exponent = self.scale_exponent
        elif self.kind == "topk":
            spec.k = self.k


def _raw(t: torch.Tensor) -> CompressedTensor:
    return CompressedTensor("none", t.dtype, tuple(t.shape), (t,))


def compress(t: torch.Tensor, compression: Compression) -> CompressedTensor:
    """Encode `t` in `compression`.

    Travels raw instead (kind ``none``): a tensor that is not floating-point, any tensor under ``none``,
    one holding NaN or Inf (no format can carry it; the receiver's own checks refuse it as they refuse
    it uncompressed), and under fp16 one with values beyond fp16's range (about 65504), which would
    arrive as Inf. Raises `ValueError` for top-k tensors above `MAX_TOPK_NUMEL` elements.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if compression.kind == "none" or t.dtype not in _FLOAT_NAMES:
        return _raw(t)
    shape = tuple(t.shape)
    flat = t.reshape(-1)
    lo, hi = _extremes(flat)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return _raw(t)
    kind = compression.kind
    if kind == "fp16":
        if max(-lo, hi) > _FP16_MAX:
            return _raw(t)
        return CompressedTensor(kind, t.dtype, shape, (flat.to(torch.float16),))
    if kind == "bf16":
        return CompressedTensor(kind, t.dtype, shape, (flat.to(torch.bfloat16),))
    if kind == "int8":
        return _int8(flat, t.dtype, shape, compression.block_size)
    return _topk(flat, t.dtype, shape, compression.fraction)


def _extremes(flat: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a 1-d floating tensor in one pass ((0, 0) when empty). NaN anywhere makes both NaN and
    an infinity is an extreme, so both are finite exactly when every element is: ``torch.isfinite(t).all()``
    says the same about 10x slower on CPU (it builds a bool tensor in several passes; 0.09 s against
    0.006 s for 12.5M float32 on one thread), which was most of the time to compress or decode a model."""
    if flat.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.aminmax(flat)
    return float(lo), float(hi)


def _all_finite(t: torch.Tensor) -> bool:
    lo, hi = _extremes(t.reshape(-1))
    return math.isfinite(lo) and math.isfinite(hi)


def _blocks(numel: int, block_size: int) -> int:
    """Scale count of an int8 tensor: one per block, or one for the tensor when `block_size` is 0."""
    if block_size == 0:
        return 1
    return max(1, -(-numel // block_size))


def _int8(flat: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], block_size: int) -> CompressedTensor:
    n = flat.numel()
    blocks = _blocks(n, block_size)
    x = flat.to(torch.float32)
    scale = torch.zeros(blocks, dtype=torch.float32)
    codes = torch.empty(n, dtype=torch.int8)
    # One block (per-tensor scale, or a tensor no larger than a block) spans exactly the tensor. The full
    # blocks are one 2-d view and the short last block (if any) is done apart: no padded copy, and
    # max(amax, -amin) instead of abs().amax(), which would first build |x| (together about 2x faster).
    size = n if blocks == 1 else block_size
    full = n // size if n else 0
    k = full * size
    pieces = [(x[:k].view(full, size), slice(0, full))] if full else []
    if k < n:
        pieces.append((x[k:].view(1, n - k), slice(blocks - 1, blocks)))
    for grid, rows in pieces:
        scale[rows] = torch.maximum(grid.amax(dim=1), grid.amin(dim=1).neg_()) / 127.0
    half = _fp16_scales(scale)
    if half is not None:
        scale = _scale_values(*half)  # the codes are computed with the scales the receiver gets
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    for grid, rows in pieces:
        _codes_into(codes[rows.start * size:rows.start * size + grid.numel()].view(grid.shape), grid, inv[rows])
    if half is None:
        return CompressedTensor("int8", dtype, shape, (scale, codes), block_size=block_size, blocks=blocks)
    return CompressedTensor("int8", dtype, shape, (half[0], codes), block_size=block_size, blocks=blocks,
                            scale_exponent=half[1])


#: Elements per pass of `_codes_into` (1M: a 4 MiB float32 scratch tensor, reused for every pass).
CODE_PASS_ELEMENTS = 1 << 20


def _codes_into(out: torch.Tensor, grid: torch.Tensor, inv: torch.Tensor) -> None:
    """``out = clamp(round(grid * inv[:, None]), -127, 127)`` as int8, a few rows at a time.

    Why in passes: the whole product is a float32 tensor as large as the input (50 MB for a 50 MB slice),
    freshly mapped on every call, and its page faults and cache misses took most of the time to compress.
    One reused scratch of about `CODE_PASS_ELEMENTS` stays in cache: 12.5M elements on one torch thread
    took 49 ms, now 17 ms, with bit-identical codes (every element goes through the same operations).
    """
    rows, size = grid.shape
    step = max(1, CODE_PASS_ELEMENTS // max(1, size))
    scratch = torch.empty(min(step, rows), size, dtype=torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        piece = scratch[:r1 - r0]
        torch.mul(grid[r0:r1], inv[r0:r1, None], out=piece)
        out[r0:r1] = piece.round_().clamp_(-127, 127)


def _scale_values(half: torch.Tensor, exponent: int) -> torch.Tensor:
    """The float32 scales of float16 wire scales `half` shifted by ``2^exponent`` (exact where normal)."""
    return half.to(torch.float32) * torch.tensor(2.0 ** exponent, dtype=torch.float32)


def _fp16_scales(scale: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """`scale` as float16 values and a power of two (``scale <= half * 2^e``), each rounded up to the next
    float16 value at or above it; None when a nonzero scale would leave float16's normal range (then the
    tensor's scales travel as float32).

    Rounded up, not to nearest: a scale below ``absmax / 127`` would put the block's largest element beyond
    code 127. One float16 step is at most 2^-10 of a normal value, so the error bound (half a scale) grows by
    at most that factor, and the largest element still codes to 127 (``127 / (1 + 2^-10) > 126.5``).
    """
    if scale.numel() == 0:
        return None
    top = float(scale.max())
    if top == 0.0:
        return torch.zeros(scale.numel(), dtype=torch.float16), 0
    exponent = math.frexp(top)[1] - 1 - _SCALE_TOP  # top * 2^-exponent lies in [2^14, 2^15)
    if not SCALE_EXPONENT_MIN <= exponent <= SCALE_EXPONENT_MAX:
        return None
    # Power-of-two shift in float64: exact, and no float32 underflow on the way.
    shifted = scale.to(torch.float64) * 2.0 ** -exponent
    nonzero = shifted[shifted > 0]
    if float(nonzero.min()) < _FP16_MIN_NORMAL:
        return None
    half = shifted.to(torch.float16)
    low = half.to(torch.float64) < shifted
    if bool(low.any()):
        # Positive float16 values are ordered as their bit patterns: the next one up is one more.
        bits = half.view(torch.int16)
        bits[low] += 1
    # The receiver's float32 scales must cover absmax / 127 too (float32 cannot lose what float16 holds
    # exactly, unless 2^exponent times it is subnormal: then float32 scales).
    values = _scale_values(half, exponent)
    if not bool((values >= scale).all()):
        return None
    return half, exponent


def _topk(flat: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], fraction: float) -> CompressedTensor:
    n = flat.numel()
    if n > MAX_TOPK_NUMEL:
        raise ValueError(f"top-k indices are int32: a tensor of {n} elements is too large")
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    if k:
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    else:
        idx = torch.zeros(0, dtype=torch.int64)
    return CompressedTensor("topk", dtype, shape, (idx.to(torch.int32), flat[idx].contiguous()), k=k)


def decompress(c: CompressedTensor) -> torch.Tensor:
    """The tensor a receiver decodes from `c` (a sender uses it for error feedback)."""
    if c.kind == "none":
        return c.parts[0]
    if c.kind in ("fp16", "bf16"):
        return c.parts[0].to(c.dtype).reshape(c.shape)
    if c.kind == "int8":
        scale, codes = c.parts
        values = _scale_values(scale, c.scale_exponent) if scale.dtype == torch.float16 else scale
        return _int8_values(values, codes, c.block_size, c.numel).to(c.dtype).reshape(c.shape)
    idx, values = c.parts
    out = torch.zeros(c.numel, dtype=c.dtype)
    out[idx.to(torch.int64)] = values.to(c.dtype)
    return out.reshape(c.shape)


def _int8_values(scale: torch.Tensor, codes: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    if scale.numel() == 1:  # per tensor, or one block: never expand a (peer-chosen) block size
        return codes.to(torch.float32) * scale[0]
    # Full blocks as one 2-d view times a column of scales, the short last block apart: no expanded
    # per-element scale tensor.
    out = codes.to(torch.float32)
    full = n // block_size
    k = full * block_size
    if full:
        out[:k].view(full, block_size).mul_(scale[:full, None])
    if k < n:
        out[k:].mul_(scale[-1])
    return out


# -- states ---------------------------------------------------------------------------------
def compress_state(state: Mapping[str, torch.Tensor], compression: Compression) -> dict[str, CompressedTensor]:
    """`compress` each tensor of `state` (non-floating ones travel raw)."""
    return {k: compress(v, compression) for k, v in state.items()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` hold the same bytes (``-0.0`` differs from ``0.0``; NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def compress_exact(t: torch.Tensor, compression: Compression) -> CompressedTensor:
    """Encode `t` in `compression` only if the receiver then decodes `t` bit for bit; else raw (kind ``none``).

    For a tensor that is itself the decoding of this format (a model version a node keeps as it decoded
    it) the format re-encodes to the same values: fp16 and bf16 values are exact in their format, and an
    int8 block decoded as ``code * scale`` has the absmax ``127 * scale`` and gives back the same scale
    and codes. Checked here by decoding, at the cost of one decompression, rather than assumed: whatever
    holds other values (an initial model, a rounding case) travels raw, so that what arrives is exactly
    what the sender holds and its digest still matches.
    """
    c = compress(t, compression)
    if c.kind == "none":
        return c
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return c if _same_bits(decompress(c), t) else _raw(t.contiguous())


def compress_state_exact(state: Mapping[str, torch.Tensor], compression: Compression
                         ) -> dict[str, CompressedTensor]:
    """`compress_exact` each tensor of `state`: what the receiver decodes is `state` bit for bit."""
    return {k: compress_exact(v, compression) for k, v in state.items()}
