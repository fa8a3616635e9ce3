"""Fixed-point encoding of float vectors into Z_R, R = 2^32 or 2^64, and back (algorithms.md 5.4).

One user's vector of ``d + e + 1`` words is laid out as:

- ``d`` model coordinates: ``x * w / max_weight``, clipped to ``[-clip, clip]``, mapped to ``[0, levels]``;
- ``e`` extra coordinates (for example per-layer variances for VCA): ``v * w / max_weight``, clipped
  to ``extra_range``, mapped to ``[0, levels]``;
- 1 weight coordinate: ``round(w / max_weight * levels)``, exactly.

The first two use unbiased stochastic rounding: ``z`` becomes ``floor(z) + 1`` with probability
``z - floor(z)``, else ``floor(z)``, so ``E[q] = z`` and ``|q - z| < 1``.

**Overflow.** Every word lies in ``[0, levels]``, so the sum of ``n`` users is at most ``n * levels``;
the modular sum equals the integer sum exactly when ``n * levels < R``. `choose_word_bits` picks 32
bits when that holds (n < 1024 users at the default 2^22 levels) and otherwise 64; a configuration
that does not fit in 64 bits, or in an explicitly requested 32, is refused with `ConfigError`.

**Decoding** the sum of ``n`` users: ``sum(x * w / max_weight) = sum_q * 2 clip / levels - n clip``
(and likewise with ``extra_range``); the weighted mean is that divided by ``sum(w / max_weight)``.
The error of a sum of ``n`` unclipped values is below ``n * 2 clip / levels`` per coordinate
(`FixedPoint.sum_error_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from p2pnode.errors import ConfigError
from p2pnode.secagg.prg import word_dtype


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


def _all_finite(a: np.ndarray) -> bool:
    """Whether `a` holds no NaN or Inf: one float64 sum (finite float32 values cannot overflow it), and
    an element-wise check only when the sum is not finite."""
    if a.size == 0 or math.isfinite(float(np.sum(a, dtype=np.float64))):
        return True
    return bool(np.isfinite(a).all())


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

    def sum_error_bound(self, summands: int) -> float:
        """Largest error of a decoded sum of `summands` unclipped model coordinates (< n steps)."""
        return summands * self.step

    def check_summands(self, summands: int) -> None:
        """Raise `ConfigError` when the sum of `summands` users may overflow the modulus."""
        choose_word_bits(self.levels, summands, self.word_bits)

    # -- encoding -----------------------------------------------------------------------------
    def _quantize_into(self, out: np.ndarray, x: np.ndarray, scale: float, lo: float, hi: float,
                       rng: np.random.Generator, chunk: int = 1 << 15) -> None:
        """Write the stochastically rounded levels of ``clip(x * scale, lo, hi)`` into `out` (uint words).

        Works chunk by chunk in float64 (every level up to 2^53 is exact) with buffers that stay in
        cache (32 Ki elements, 3 x 256 KiB), so the cost is a few passes over cached data instead of over
        the whole vector. numpy, single-threaded: no thread pool to fight for a busy machine's cores.
        """
        n = x.shape[0]
        size = min(n, chunk)
        z_buf, q_buf, r_buf = np.empty(size), np.empty(size), np.empty(size)
        up_buf = np.empty(size, dtype=bool)
        k = self.levels / (hi - lo)
        a, b = scale * k, -lo * k  # z = (x * scale - lo) * k, in two operations
        top = float(self.levels)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            m = stop - start
            z, q, r, up = z_buf[:m], q_buf[:m], r_buf[:m], up_buf[:m]
            np.multiply(x[start:stop], a, out=z)
            z += b
            np.maximum(z, 0.0, out=z)  # the clip to [lo, hi], now [0, Q] (ufuncs: less overhead than np.clip)
            np.minimum(z, top, out=z)
            np.floor(z, out=q)
            z -= q  # the fractional part; 0 at z = Q, so q never exceeds Q
            rng.random(out=r)
            np.less(r, z, out=up)
            np.add(q, up, out=q)  # round up with probability equal to the fractional part: unbiased
            out[start:stop] = q  # exact integers below 2^53

    def encode(self, vector: torch.Tensor, weight: float = 1.0, extras: torch.Tensor | None = None, *,
               rng: np.random.Generator | None = None) -> np.ndarray:
        """Encode one user's contribution as ``length`` words (1-D uint32/uint64 array).

        :param vector: the ``dim`` model coordinates (any float dtype, any shape with ``dim`` elements).
        :param weight: the user's weight, in ``(0, max_weight]`` (default 1.0).
        :param extras: the ``extras`` extra coordinates, or None when ``extras == 0``.
        :param rng: randomness of the stochastic rounding (default: a fresh generator seeded by the OS).
            It need not be cryptographic: the rounding noise hides nothing, the masks do.

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
        xn, en = _as_numpy(x), _as_numpy(ex)
        if not (_all_finite(xn) and _all_finite(en)):
            raise ValueError("the contribution holds NaN or Inf")
        gen = rng if rng is not None else np.random.default_rng()
        scale = weight / self.max_weight
        out = np.empty(self.length, dtype=word_dtype(self.word_bits))
        self._quantize_into(out[:self.dim], xn, scale, -self.clip, self.clip, gen)
        if self.extras:
            lo, hi = self.extra_range
            self._quantize_into(out[self.dim:self.dim + self.extras], en, scale, lo, hi, gen)
        out[-1] = round(scale * self.levels)
        return out

    # -- decoding -----------------------------------------------------------------------------
    def decode_sum(self, words: np.ndarray, summands: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Decode the modular sum of `summands` users' words.

        Returns ``(weighted_sum, extras_sum, weight_sum)``: ``sum(w x)`` (float64, ``dim``),
        ``sum(w v)`` (float64, ``extras``) and ``sum(w)``, in the users' own units (``max_weight``
        multiplied back in).
        """
        if words.shape != (self.length,):
            raise ValueError(f"expected {self.length} words, got shape {words.shape}")
        self.check_summands(summands)
        f = words.astype(np.float64)  # exact: the sum of the levels is below 2^53 (checked)
        unit = self.max_weight / self.levels
        total = f[:self.dim]
        total *= 2.0 * self.clip * unit
        total -= summands * self.clip * self.max_weight
        lo, hi = self.extra_range
        ex = f[self.dim:self.dim + self.extras]
        ex *= (hi - lo) * unit
        ex += summands * lo * self.max_weight
        weight = float(words[-1]) * unit
        return torch.from_numpy(total), torch.from_numpy(ex), weight
