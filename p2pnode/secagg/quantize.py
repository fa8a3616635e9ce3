"""Fixed-point encoding of float vectors into Z_R, R = 2^32 or 2^64, and back (algorithms.md 5.4).

One user's vector of ``d + e + 1`` words is laid out as:

- ``d`` model coordinates: ``x * w / max_weight``, clipped to ``[-clip, clip]``, mapped to ``[0, levels]``;
- ``e`` extra coordinates (for example per-layer variances for VCA): ``v * w / max_weight``, clipped
  to ``extra_range``, mapped to ``[0, levels]``;
- 1 weight coordinate: ``round(w / max_weight * levels)``, exactly.

The first two use unbiased stochastic rounding: ``z`` becomes ``floor(z) + 1`` with probability
``z - floor(z)``, else ``floor(z)``, so ``E[q] = z`` and ``|q - z| < 1``. It is computed as
``floor(clip(z + u, 0, levels))`` in float64, with ``u`` uniform on the 2^24 float32 values in
[0, 1) (so ``E[q]`` is within 2^-24 of a step of ``z``: far below the step itself); the ``u`` do not
depend on the input, so a user draws them ahead (`FixedPoint.draw_noise`, 4 bytes per coordinate),
while it trains, and the encoding after training is a few passes over cached chunks, added straight
into the precomputed masks (``encode(noise=..., add_to=...)``).

**Overflow.** Every word lies in ``[0, levels]``, so the sum of ``n`` users is at most ``n * levels``;
the modular sum equals the integer sum exactly when ``n * levels < R``. `choose_word_bits` picks 32
bits when that holds (n < 1024 users at the default 2^22 levels) and otherwise 64; a configuration
that does not fit in 64 bits, or in an explicitly requested 32, is refused with `ConfigError`.

**Decoding** the sum of ``n`` users: ``sum(x * w / max_weight) = sum_q * 2 clip / levels - n clip``
(and likewise with ``extra_range``); the weighted mean is that divided by ``sum(w / max_weight)``.
The error of a sum of ``n`` unclipped values is below ``n * 2 clip / levels`` (n steps) per coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from p2pnode.errors import ConfigError
from p2pnode.secagg.prg import word_dtype

#: Coordinates per step of encoding and decoding: the working buffers stay in the CPU's cache.
CHUNK = 1 << 16


def choose_word_bits(levels: int, summands: int, requested: int | None = None) -> int:
    """The modulus exponent (32 or 64) for `summands` words of at most `levels` each.

    :param levels: largest value of one word (the quantization levels Q).
    :param summands: most words that are added together (the number of users).
    :param requested: 32 or 64 to force a modulus, or None (default) for the smallest that fits.

    Raises `ConfigError` when the sum could overflow the chosen modulus.
    """
    bound = levels * summands
    if requested is not None and requested not in (32, 64):
        raise ConfigError(f"secagg modulus_bits must be 32, 64 or unset, got {requested!r}")
    for bits in ((requested,) if requested is not None else (32, 64)):
        if bound < 2**bits:
            return bits
    hint = f"; with {summands} users levels must stay below 2^{math.floor(math.log2((2**64 - 1) // summands))}"
    raise ConfigError(
        f"secagg: {summands} users x {levels} quantization levels = {bound} may overflow the modulus "
        f"2^{requested if requested is not None else 64}; lower `levels` or the sample size"
        + (", or set modulus_bits=64" if requested == 32 else hint))


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy view (or copy) of a float tensor; bfloat16, which numpy lacks, goes through float32."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


@dataclass(frozen=True)
class FixedPoint:
    """Encoding of one user's (vector, extras, weight) into words of Z_(2^word_bits).

    :param dim: number of model coordinates ``d``.
    :param extras: number of extra coordinates ``e`` (default 0).
    :param clip: model coordinates are clipped to ``[-clip, clip]`` (default 8.0).
    :param levels: quantization levels ``Q``: a range maps onto ``[0, Q]`` (default 2^22).
    :param extra_range: ``(lo, hi)`` clip range of the extra coordinates (default (0.0, 1.0)).
    :param max_weight: largest user weight; weights are divided by it (default 1.0).
    :param word_bits: 32 or 64: the modulus is 2^word_bits (default 32).
    """

    dim: int
    extras: int = 0
    clip: float = 8.0
    levels: int = 2**22
    extra_range: tuple[float, float] = (0.0, 1.0)
    max_weight: float = 1.0
    word_bits: int = 32

    def __post_init__(self) -> None:
        if self.dim < 1 or self.extras < 0:
            raise ConfigError(f"secagg: dim must be >= 1 and extras >= 0, got {self.dim} and {self.extras}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secagg clip must be a finite number > 0, got {self.clip!r}")
        if not 2 <= self.levels < 2**53:  # float64 must hold every level exactly
            raise ConfigError(f"secagg levels must be in [2, 2^53), got {self.levels!r}")
        lo, hi = self.extra_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"secagg extra_range must be finite with lo < hi, got {self.extra_range!r}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"secagg max_weight must be a finite number > 0, got {self.max_weight!r}")
        word_dtype(self.word_bits)
        if self.word_bits == 32 and self.levels >= 2**31:  # two summands would already overflow 2^32
            raise ConfigError(f"secagg levels={self.levels} needs the modulus 2^64 (modulus_bits=64)")

    @property
    def length(self) -> int:
        """Words per user: ``dim + extras + 1``."""
        return self.dim + self.extras + 1

    @property
    def step(self) -> float:
        """Quantization step of a model coordinate: ``2 clip / levels``."""
        return 2.0 * self.clip / self.levels

    def check_summands(self, summands: int) -> None:
        """Raise `ConfigError` when the sum of `summands` users may overflow the modulus."""
        choose_word_bits(self.levels, summands, self.word_bits)

    # -- encoding -----------------------------------------------------------------------------
    def _offsets(self) -> tuple[tuple[int, int, float, float], ...]:
        """``(start, stop, k, b)`` per part of the layout: a value ``v`` maps to ``v * k + b`` levels."""
        lo, hi = self.extra_range
        parts = [(0, self.dim, self.levels / (2.0 * self.clip), self.levels / 2.0)]
        if self.extras:
            k = self.levels / (hi - lo)
            parts.append((self.dim, self.dim + self.extras, k, -lo * k))
        return tuple(parts)

    def draw_noise(self, rng: np.random.Generator, chunk: int = CHUNK) -> np.ndarray:
        """The stochastic rounding's randomness for one `encode`, drawn ahead of the input.

        Returns ``dim + extras`` float32 values ``u``, uniform in [0, 1) on a grid of 2^-24 (numpy's
        ``Generator.random`` in float32): 4 bytes per coordinate, half of what float64 would hold for a
        bias below 2^-24 of a step either way. It does not depend on the input, so a user draws it while
        its trainer trains. ``encode(rng=g)`` and ``encode(noise=draw_noise(g))`` give the same words
        from equal generators.
        """
        out = np.empty(self.dim + self.extras, dtype=np.float32)
        for s in range(0, out.shape[0], chunk):
            rng.random(out=out[s:s + chunk], dtype=np.float32)
        return out

    def _quantize_into(self, out: np.ndarray, x: np.ndarray, a: float, b: float, noise: np.ndarray | None,
                       rng: np.random.Generator | None, add: bool, chunk: int = CHUNK) -> None:
        """Write (or with `add`, add modulo 2^bits) the stochastically rounded levels of ``x * a + b``,
        clipped to ``[0, Q]``, into `out` (uint words).

        Rounding: ``q = floor(clip(x a + b + u, 0, Q))`` with ``u`` uniform in [0, 1): ``q`` is
        ``floor(z) + 1`` with probability ``z - floor(z)``, else ``floor(z)`` (unbiased), and a ``z``
        beyond the range maps to its end. ``noise`` holds ``u`` (`draw_noise`); without it, ``u`` is
        drawn here from `rng` chunk by chunk, alike. Works chunk by chunk in float64 (every level up to 2^53 is
        exact) with buffers that stay in cache, so the cost is a few passes over cached data. Raises
        `ValueError` on NaN or Inf, with the chunks before it already written.
        """
        n = x.shape[0]
        size = min(n, chunk)
        z_buf, w_buf = np.empty(size), np.empty(size, dtype=np.float32)
        q_buf = np.empty(size, dtype=out.dtype)
        top = float(self.levels)
        with np.errstate(over="ignore"):  # a huge finite input overflows to inf, then clips to Q: fine
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                m = stop - start
                z, xs = z_buf[:m], x[start:stop]
                # One sum per chunk, and an element-wise check only when the sum is not finite (NaN, Inf,
                # or huge finite values whose sum overflows).
                if not math.isfinite(float(np.add.reduce(xs))) and not np.isfinite(xs).all():
                    raise ValueError("the contribution holds NaN or Inf")
                np.multiply(xs, a, out=z, dtype=np.float64)
                z += b
                if noise is not None:
                    w = noise[start:stop]
                else:
                    assert rng is not None
                    w = w_buf[:m]
                    rng.random(out=w, dtype=np.float32)
                z += w
                np.clip(z, 0.0, top, out=z)  # after adding u: a z in (Q - 1, Q) still rounds up with its fraction
                if add:
                    q = q_buf[:m]
                    np.copyto(q, z, casting="unsafe")  # truncation: floor, for z >= 0; exact below 2^53
                    np.add(out[start:stop], q, out=out[start:stop])  # wraps modulo 2^bits
                else:
                    np.copyto(out[start:stop], z, casting="unsafe")

    def encode(self, vector: torch.Tensor, weight: float = 1.0, extras: torch.Tensor | None = None, *,
               rng: np.random.Generator | None = None, noise: np.ndarray | None = None,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """Encode one user's contribution as ``length`` words (1-D uint32/uint64 array).

        :param vector: the ``dim`` model coordinates (any float dtype, any shape with ``dim`` elements).
        :param weight: the user's weight, in ``(0, max_weight]`` (default 1.0).
        :param extras: the ``extras`` extra coordinates, or None when ``extras == 0``.
        :param rng: randomness of the stochastic rounding (default: a fresh generator seeded by the OS).
            It need not be cryptographic: the rounding noise hides nothing, the masks do.
        :param noise: the rounding randomness drawn ahead (`draw_noise`); `rng` is then unused.
        :param add_to: add the words to this array (``length`` words of the modulus' dtype) in place,
            modulo 2^word_bits, and return it, instead of a new array: a user adds its input to its
            precomputed masks in the same pass. After a `ValueError` for NaN or Inf its contents are
            undefined.

        Raises `ValueError` for a wrong size, NaN/Inf, or a weight out of range.
        """
        x = vector.detach().reshape(-1)
        if x.numel() != self.dim or not x.is_floating_point():
            raise ValueError(f"expected a float vector of {self.dim} elements, got {x.dtype} with {x.numel()}")
        ex = torch.zeros(0, dtype=torch.float64) if extras is None else extras.detach().reshape(-1)
        if ex.numel() != self.extras:
            raise ValueError(f"expected {self.extras} extra coordinates, got {ex.numel()}")
        if not (math.isfinite(weight) and 0 < weight <= self.max_weight):
            raise ValueError(f"weight must be in (0, max_weight={self.max_weight}], got {weight!r}")
        dtype = word_dtype(self.word_bits)
        if noise is not None and (noise.shape != (self.dim + self.extras,) or noise.dtype != np.float32):
            raise ValueError(f"expected {self.dim + self.extras} float32 noise values, got {noise.dtype} "
                             f"{noise.shape}")
        if add_to is not None and (add_to.shape != (self.length,) or add_to.dtype != dtype):
            raise ValueError(f"expected {self.length} {dtype} words to add to, got {add_to.dtype} {add_to.shape}")
        gen = rng if rng is not None or noise is not None else np.random.default_rng()
        scale = weight / self.max_weight
        out = add_to if add_to is not None else np.empty(self.length, dtype=dtype)
        for (start, stop, k, b), values in zip(self._offsets(), (_as_numpy(x), _as_numpy(ex)), strict=False):
            self._quantize_into(out[start:stop], values, scale * k, b,
                                None if noise is None else noise[start:stop], gen, add_to is not None)
        w = round(scale * self.levels)
        if add_to is not None:
            np.add(out[-1:], dtype.type(w), out=out[-1:])  # wraps modulo 2^bits
        else:
            out[-1] = w
        return out

    # -- decoding -----------------------------------------------------------------------------
    def decode_sum(self, words: np.ndarray, summands: int, *,
                   ready: Iterable[tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Decode the modular sum of `summands` users' words.

        Returns ``(weighted_sum, extras_sum, weight_sum)``: ``sum(w x)`` (float64, ``dim``),
        ``sum(w v)`` (float64, ``extras``) and ``sum(w)``, in the users' own units (``max_weight``
        multiplied back in).

        :param ready: ``(start, stop)`` ranges of `words` in order, covering them all, each decoded once
            it is yielded (the aggregator's unmasking yields each chunk once its masks are removed, so
            the chunk is decoded while it is in cache); default: chunks of `CHUNK` words.
        """
        if words.shape != (self.length,):
            raise ValueError(f"expected {self.length} words, got shape {words.shape}")
        self.check_summands(summands)
        unit = self.max_weight / self.levels
        lo, hi = self.extra_range
        # (stop of the part, factor, offset): the model coordinates, then the extras
        parts = ((self.dim, 2.0 * self.clip * unit, summands * self.clip * self.max_weight),
                 (self.dim + self.extras, (hi - lo) * unit, -summands * lo * self.max_weight))
        f = np.empty(self.length - 1)
        if ready is None:
            ready = ((s, min(self.length, s + CHUNK)) for s in range(0, self.length, CHUNK))
        first = 0
        for start, stop in ready:
            if start != first:
                raise ValueError(f"decode ranges must cover the words in order: got {start} after {first}")
            for pstart, (pstop, factor, offset) in zip((0, self.dim), parts, strict=True):
                s, e = max(start, pstart), min(stop, pstop)
                if s < e:
                    # exact conversion (the sum of the levels is below 2^53, checked), then as before:
                    # one product and one difference per coordinate
                    np.multiply(words[s:e], factor, out=f[s:e], dtype=np.float64)
                    f[s:e] -= offset
            first = stop
        if first != self.length:
            raise ValueError(f"decode ranges stopped at {first} of {self.length} words")
        weight = float(words[-1]) * unit
        return torch.from_numpy(f[:self.dim]), torch.from_numpy(f[self.dim:]), weight
