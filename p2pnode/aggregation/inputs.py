"""Validation and memory layout of aggregation inputs.

Every rule sees its inputs as a `Batch`: ``p`` vectors, each stored as a list of 1-D *pieces* (one piece
for a flat update, one per floating-point entry for a state dict). Rules never concatenate the pieces
and never stack a ``(p, d)`` copy: they walk the pieces in cache-sized chunks (`iter_chunks`), copying
at most ``p x chunk`` elements into a scratch buffer at a time. Extra memory is therefore
``O(p * chunk)`` plus the output, whatever ``d`` is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from p2pnode.errors import AggregationError

#: Floating-point dtypes accepted as inputs.
FLOAT_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

#: Elements per chunk for elementwise passes (mean, combinations) on CPU: a 64 KiB float32 block stays in
#: L2 while p inputs stream through it (2-3x faster than whole-vector `add_` passes), and it is below
#: torch's parallel grain (32768), so no call opens a thread pool that a busy machine would stall.
CPU_ACCUMULATE_CHUNK = 1 << 14
#: Bytes of the ``(p, chunk)`` float64 scratch buffer of the Gram pass on CPU (4 MiB: fastest measured).
CPU_SCRATCH_BYTES = 1 << 22
#: Elements per chunk on accelerators, where kernel launches, not caches, are the cost.
DEVICE_CHUNK = 1 << 22


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic: float32 for 16-bit inputs (their sums lose digits), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class Batch:
    """``p`` validated input vectors, each a list of 1-D pieces with matching sizes and dtypes.

    Attributes:
        vectors: ``vectors[i][k]`` is piece ``k`` of input ``i`` (a 1-D view of the caller's tensor, never
            modified).
        names: one name per piece (state-dict key, or ``""`` for a flat update).
        shapes: the original shape of each piece.
        flat: True when the batch came from `aggregate` (one flat vector per input, no layer structure).
    """

    vectors: list[list[torch.Tensor]]
    names: list[str]
    shapes: list[torch.Size]
    flat: bool

    @property
    def p(self) -> int:
        """Number of inputs."""
        return len(self.vectors)

    @property
    def sizes(self) -> list[int]:
        """Number of elements of each piece."""
        return [t.numel() for t in self.vectors[0]]

    @property
    def device(self) -> torch.device:
        """Device of the inputs (all pieces share it)."""
        return self.vectors[0][0].device

    @property
    def dtypes(self) -> list[torch.dtype]:
        """Dtype of each piece."""
        return [t.dtype for t in self.vectors[0]]


def updates_batch(updates: Sequence[torch.Tensor]) -> Batch:
    """Validate flat updates (non-empty list of equal-length 1-D float tensors, one dtype and device)."""
    if isinstance(updates, torch.Tensor) or not isinstance(updates, Sequence):
        raise AggregationError(
            f"updates must be a sequence (list or tuple) of 1-D tensors, got {type(updates).__name__}"
        )
    if len(updates) == 0:
        raise AggregationError("no updates to aggregate: pass at least one 1-D tensor")
    first = updates[0]
    for i, u in enumerate(updates):
        if not isinstance(u, torch.Tensor):
            raise AggregationError(f"update {i} is a {type(u).__name__}, not a torch.Tensor")
        if u.dim() != 1:
            raise AggregationError(
                f"update {i} has shape {tuple(u.shape)}; updates must be 1-D (flatten models first, "
                "or use aggregate_states for state dicts)"
            )
        if u.dtype not in FLOAT_DTYPES:
            raise AggregationError(f"update {i} has dtype {u.dtype}; allowed: float16, bfloat16, float32, float64")
        if u.numel() != first.numel():
            raise AggregationError(
                f"update {i} has length {u.numel()} but update 0 has length {first.numel()}; "
                "all updates must have the same length"
            )
        if u.dtype != first.dtype:
            raise AggregationError(
                f"update {i} has dtype {u.dtype} but update 0 has {first.dtype}; all must share one dtype"
            )
        if u.device != first.device:
            raise AggregationError(
                f"update {i} is on {u.device} but update 0 is on {first.device}; all must share one device"
            )
    if first.numel() == 0:
        raise AggregationError("updates have length 0: nothing to aggregate")
    return Batch(vectors=[[u] for u in updates], names=[""], shapes=[first.shape], flat=True)


@dataclass(frozen=True)
class StatesLayout:
    """How a list of state dicts maps onto a `Batch` and back."""

    keys: list[str]
    float_keys: list[str]
    other_keys: list[str]


def states_batch(states: Sequence[Mapping[str, torch.Tensor]]) -> tuple[Batch, StatesLayout]:
    """Validate state dicts (same keys, shapes, dtypes; one device) and view their float entries as pieces."""
    if not isinstance(states, Sequence) or isinstance(states, Mapping):
        raise AggregationError(
            f"states must be a sequence of state dicts (name -> tensor), got {type(states).__name__}"
        )
    if len(states) == 0:
        raise AggregationError("no states to aggregate: pass at least one state dict")
    for i, s in enumerate(states):
        if not isinstance(s, Mapping):
            raise AggregationError(f"state {i} is a {type(s).__name__}, not a mapping of name -> tensor")
    keys = list(states[0].keys())
    if not keys:
        raise AggregationError("state 0 is empty: nothing to aggregate")
    key_set = set(keys)
    device: torch.device | None = None
    for i, s in enumerate(states):
        if set(s.keys()) != key_set:
            missing = sorted(key_set - set(s.keys()))[:5]
            extra = sorted(set(s.keys()) - key_set)[:5]
            raise AggregationError(
                f"state {i} does not have the keys of state 0 (missing {missing}, unexpected {extra}); "
                "all states must come from the same model"
            )
        for k in keys:
            t = s[k]
            ref = states[0][k]
            if not isinstance(t, torch.Tensor):
                raise AggregationError(f"state {i} entry {k!r} is a {type(t).__name__}, not a torch.Tensor")
            if t.shape != ref.shape:
                raise AggregationError(
                    f"state {i} entry {k!r} has shape {tuple(t.shape)} but state 0 has {tuple(ref.shape)}"
                )
            if t.dtype != ref.dtype:
                raise AggregationError(f"state {i} entry {k!r} has dtype {t.dtype} but state 0 has {ref.dtype}")
            if device is None:
                device = t.device
            elif t.device != device:
                raise AggregationError(
                    f"state {i} entry {k!r} is on {t.device} but other entries are on {device}; "
                    "move all states to one device"
                )
    float_keys = [k for k in keys if states[0][k].dtype in FLOAT_DTYPES]
    other_keys = [k for k in keys if k not in set(float_keys)]
    for k in other_keys:
        dt = states[0][k].dtype
        if dt.is_complex:
            raise AggregationError(f"entry {k!r} has complex dtype {dt}; only real tensors can be aggregated")
    batch = Batch(
        vectors=[[s[k].reshape(-1) for k in float_keys] for s in states],
        names=float_keys,
        shapes=[states[0][k].shape for k in float_keys],
        flat=False,
    )
    return batch, StatesLayout(keys=keys, float_keys=float_keys, other_keys=other_keys)


def normalized_weights(weights: Sequence[float] | torch.Tensor | None, p: int) -> torch.Tensor | None:
    """Check weights (p finite numbers >= 0, positive sum); return them summing to 1 (float64, CPU).

    Returns None when `weights` is None, which rules read as uniform weights.
    """
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        w = weights.detach().to("cpu", torch.float64).reshape(-1)
    else:
        try:
            w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise AggregationError(f"weights must be a sequence of numbers: {exc}") from None
    if w.numel() != p:
        raise AggregationError(f"got {w.numel()} weights for {p} inputs; pass one weight per input")
    if not bool(torch.isfinite(w).all()):
        raise AggregationError(f"weights must be finite, got {w.tolist()}")
    if bool((w < 0).any()):
        raise AggregationError(f"weights must be >= 0, got {w.tolist()}")
    total = float(w.sum())
    if total <= 0.0:
        raise AggregationError("weights sum to 0; at least one input needs a positive weight")
    return w / total


def is_uniform(weights: torch.Tensor | None) -> bool:
    """True when weights are absent or all equal (so an unweighted rule may ignore them)."""
    return weights is None or bool(torch.all(weights == weights[0]))


def chunk_elems(device: torch.device, rows: int) -> int:
    """Chunk length (elements per input) for passes copying ``rows`` inputs into a float64 scratch buffer."""
    if device.type != "cpu":
        return DEVICE_CHUNK
    c = CPU_SCRATCH_BYTES // (8 * max(rows, 1))
    return max(1024, 1 << (c.bit_length() - 1))


def accumulate_chunk(device: torch.device) -> int:
    """Chunk length for elementwise accumulation passes."""
    return CPU_ACCUMULATE_CHUNK if device.type == "cpu" else DEVICE_CHUNK


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, stop)`` of piece `piece`, at ``[offset, offset + stop - start)`` of a chunk."""

    piece: int
    start: int
    stop: int
    offset: int


def iter_chunks(sizes: Sequence[int], chunk: int) -> Iterator[tuple[int, list[Segment]]]:
    """Split pieces of the given sizes into chunks of at most `chunk` elements.

    Small pieces are packed together, so a state dict with many biases costs as few passes as one flat
    vector. Yields ``(length, segments)`` per chunk.
    """
    segs: list[Segment] = []
    used = 0
    for k, n in enumerate(sizes):
        start = 0
        while start < n:
            take = min(n - start, chunk - used)
            segs.append(Segment(k, start, start + take, used))
            used += take
            start += take
            if used == chunk:
                yield used, segs
                segs, used = [], 0
    if used:
        yield used, segs


def fill_rows(buf: torch.Tensor, vectors: Sequence[Sequence[torch.Tensor]], segs: Sequence[Segment]) -> None:
    """Copy the chunk described by `segs` of every vector into the rows of `buf` (casting to its dtype)."""
    for i, vec in enumerate(vectors):
        row = buf[i]
        for s in segs:
            row[s.offset : s.offset + s.stop - s.start].copy_(vec[s.piece][s.start : s.stop])


def first_non_finite(vectors: Sequence[Sequence[torch.Tensor]]) -> int | None:
    """Index of the first vector holding a NaN or Inf, or None (an exact, full pass)."""
    for i, vec in enumerate(vectors):
        for t in vec:
            if t.numel() and not bool(torch.isfinite(t).all()):
                return i
    return None


class NonFiniteInput(AggregationError):
    """Input `index` holds NaN or Inf; `what` names the inputs (``"update"`` or ``"state"``)."""

    def __init__(self, index: int, what: str = "update") -> None:
        super().__init__(f"{what} {index} contains NaN or Inf; inputs must be finite")
        self.index = index


def raise_non_finite(index: int | None, what: str = "update") -> None:
    """Raise the error for a non-finite input, or for an overflow when no input is at fault."""
    if index is None:
        raise AggregationError(
            "the aggregate overflowed the input dtype although every input is finite; "
            "use a wider dtype (float32 or float64)"
        )
    raise NonFiniteInput(index, what)


def check_finite_output(out: Sequence[torch.Tensor], vectors: Sequence[Sequence[torch.Tensor]]) -> None:
    """Check a linear combination's output; on NaN/Inf, find the input at fault.

    A weighted mean of finite values is finite, so one pass over the output (d elements) replaces p
    passes over the inputs; the inputs are scanned only to name the culprit.
    """
    for t in out:
        if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
            raise_non_finite(first_non_finite(vectors))


def combine(
    vectors: Sequence[Sequence[torch.Tensor]],
    coeffs: torch.Tensor,
    sizes: Sequence[int],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
) -> list[torch.Tensor]:
    """Return ``sum_i coeffs[i] * vectors[i]`` piece by piece, accumulating in place chunk by chunk.

    Zero coefficients skip their input entirely. Memory: the output plus, for 16-bit inputs, one
    float32 chunk.
    """
    c = [float(x) for x in coeffs.tolist()]
    active = [i for i, x in enumerate(c) if x != 0.0]
    step = accumulate_chunk(device)
    out: list[torch.Tensor] = []
    for k, (n, dt) in enumerate(zip(sizes, dtypes, strict=True)):
        wdt = work_dtype(dt)
        res = torch.zeros(n, dtype=dt, device=device)
        if not active or n == 0:
            out.append(res)
            continue
        acc_full = res if wdt == dt else None
        for start in range(0, n, step):
            stop = min(n, start + step)
            acc = acc_full[start:stop] if acc_full is not None else torch.empty(stop - start, dtype=wdt, device=device)
            i0 = active[0]
            # copy then scale, so 16-bit inputs are multiplied in float32 (no overflow, no lost digits)
            acc.copy_(vectors[i0][k][start:stop]).mul_(c[i0])
            for i in active[1:]:
                acc.add_(vectors[i][k][start:stop], alpha=c[i])
            if acc_full is None:
                res[start:stop].copy_(acc)
        out.append(res)
    return out


def lower_median_int(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise lower median of non-float tensors (integers, booleans): robust to a minority, exact."""
    if len(tensors) == 1:
        return tensors[0].clone()
    ref = tensors[0]
    if ref.dtype == torch.bool:
        votes = torch.stack([t.to(torch.int64) for t in tensors]).sum(0)
        return votes * 2 > len(tensors)
    stacked = torch.stack(list(tensors))
    return stacked.sort(dim=0).values[(len(tensors) - 1) // 2].clone()


def median_of(values: Sequence[float]) -> float:
    """Median of a list of numbers (mean of the two middle ones for an even count)."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        return math.nan
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])
