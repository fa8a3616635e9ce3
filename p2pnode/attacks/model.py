"""Model-poisoning attacks: what colluding Byzantine peers send, given what the honest peers send.

All attacks are *omniscient* where they need to be (they see every honest update of the round, the
strongest standard threat model) and return ``n_byzantine`` new tensors of the honest updates' shape,
dtype and device. Statistics over the honest updates are accumulated in place (float32 or float64),
never by stacking a ``(n, d)`` copy.

- ``sign_flip``: ``-scale * mean(honest)``, scale 1. "Bit flipping" in Karimireddy, He, Jaggi, ICLR 2022;
  the FA code's "reverse" sends ``-10 g``.
- ``gaussian``: i.i.d. ``N(mean, std^2)`` entries, (0, 200). Xie, Koyejo, Gupta 2018 (Generalized
  Byzantine-tolerant SGD).
- ``scaled``: ``factor * mean(honest)``, x100. Boosting (Bhagoji et al. 2019), model replacement
  (Bagdasaryan et al. 2020).
- ``alie``: ``mean - z * std`` per coordinate. Baruch, Baruch, Goldberg 2019 ("A Little Is Enough").
- ``ipm``: ``-epsilon * mean(honest)``, epsilon 0.1. Xie, Koyejo, Gupta 2019 ("Fall of Empires").
- ``random``: i.i.d. ``U[low, high)`` entries, (0, 1). The FA code's ``random`` attack (Almasi et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

from p2pnode.errors import AggregationError


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def honest_mean(honest: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the honest updates, accumulated in place (float32, or float64 for float64 inputs)."""
    acc = honest[0].to(_work(honest[0]), copy=True)
    for h in honest[1:]:
        acc.add_(h)
    return acc.div_(len(honest))


def honest_std(honest: Sequence[torch.Tensor], mu: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise sample standard deviation (divides by n - 1; zeros for a single update)."""
    n = len(honest)
    acc = torch.zeros_like(mu)
    if n < 2:
        return acc
    for h in honest:
        diff = h.to(mu.dtype) - mu
        acc.addcmul_(diff, diff)
    return acc.div_(n - 1).sqrt_()


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def _repeat(vec: torch.Tensor, like: torch.Tensor, n: int) -> list[torch.Tensor]:
    out = vec.to(dtype=like.dtype, device=like.device)
    return [out.clone() for _ in range(n)]


def sign_flip(honest: Sequence[torch.Tensor], n: int, seed: int, *, scale: float = 1.0) -> list[torch.Tensor]:
    """Send the honest mean reversed: ``-scale * mean(honest)``."""
    return _repeat(honest_mean(honest).mul_(-scale), honest[0], n)


def scaled(honest: Sequence[torch.Tensor], n: int, seed: int, *, factor: float = 100.0) -> list[torch.Tensor]:
    """Send a boosted honest update: ``factor * mean(honest)`` (model replacement / boosting)."""
    return _repeat(honest_mean(honest).mul_(factor), honest[0], n)


def ipm(honest: Sequence[torch.Tensor], n: int, seed: int, *, epsilon: float = 0.1) -> list[torch.Tensor]:
    """Inner product manipulation: ``-epsilon * mean(honest)``, so the aggregate's inner product with the
    true gradient turns negative once enough such inputs pass the rule."""
    return _repeat(honest_mean(honest).mul_(-epsilon), honest[0], n)


def alie_z(n_total: int, n_byzantine: int) -> float:
    """The ALIE paper's z: ``Phi^-1((n - s) / n)`` with ``s = floor(n/2 + 1) - f`` (clamped to s >= 1).

    For n = 15, f = 3 it is about 0.43. The FA reference code instead fixes z = 0.21.
    """
    s = max(1, math.floor(n_total / 2 + 1) - n_byzantine)
    q = (n_total - s) / n_total
    return NormalDist().inv_cdf(q) if q > 0.0 else 0.0


def alie(honest: Sequence[torch.Tensor], n: int, seed: int, *, z: float | None = None) -> list[torch.Tensor]:
    """A Little Is Enough: ``mean - z * std`` per coordinate, small enough to pass robust rules unseen.

    `z` defaults to `alie_z` for ``n_total = len(honest) + n`` peers.
    """
    zz = alie_z(len(honest) + n, n) if z is None else z
    mu = honest_mean(honest)
    sd = honest_std(honest, mu)
    return _repeat(mu.sub_(sd.mul_(zz)), honest[0], n)


def gaussian(
    honest: Sequence[torch.Tensor], n: int, seed: int, *, mean: float = 0.0, std: float = 200.0
) -> list[torch.Tensor]:
    """Independent Gaussian noise vectors, ``N(mean, std^2)`` per entry (same unit as the updates)."""
    gen = _generator(seed)
    d = honest[0].numel()
    like = honest[0]
    return [
        (torch.randn(d, generator=gen, dtype=torch.float32) * std + mean).to(like.dtype).to(like.device)
        for _ in range(n)
    ]


def random_uniform(
    honest: Sequence[torch.Tensor], n: int, seed: int, *, low: float = 0.0, high: float = 1.0
) -> list[torch.Tensor]:
    """Independent uniform vectors, ``U[low, high)`` per entry (the FA paper's main attack)."""
    if not high > low:
        raise AggregationError(f"random: needs high > low, got low={low}, high={high}")
    gen = _generator(seed)
    d = honest[0].numel()
    like = honest[0]
    return [
        (torch.rand(d, generator=gen, dtype=torch.float32) * (high - low) + low).to(like.dtype).to(like.device)
        for _ in range(n)
    ]
