"""Who masks with whom and who holds whose shares: the complete graph (SecAgg) or a Harary graph (SecAgg+).

SecAgg+ (Bell et al., CCS'20) replaces the complete graph by a random ``k``-regular graph: users sit
on a ring in a random order and each is adjacent to the ``k/2`` nearest users on each side (the
Harary graph ``H(n, k)``, ``k`` even, with randomly permuted labels). Every step of the protocol is
restricted to neighbours: pairwise masks only with the ``k`` neighbours, Shamir shares t-of-(k+1)
among the neighbours and the user itself.

The permutation comes from shared randomness that every party derives alike, the instance digest;
nobody chooses it after seeing the keys. (The digest is fixed by the run, round, aggregator and
sample, which MoDeST's sample derivation fixes in turn, so an aggregator cannot grind it.)

Parameters (`choose_neighbours`, `default_threshold`): ``t`` is the smallest integer above 2/3 of the
``k + 1`` holders (the active-security setting of Bonawitz et al.; a majority is the minimum that a
server lying about dropouts cannot split), and ``k`` is the smallest even degree for which, by a
union bound over the ``n`` users with independent dropouts and corruptions,

- P(some user keeps fewer than ``t`` live holders) <= 2^-20 at dropout rate ``dropout``, and
- P(some user has ``t`` or more corrupt holders) <= 2^-40 at corruption rate ``corruption``.

This grows as ``O(log n)``: with 5 % dropouts and 5 % corrupt users, k = 40 for n = 100, 46 for
n = 1000 and 52 for n = 10^4. The paper's own tables use a finer analysis; these figures are ours.
"""

from __future__ import annotations

import hashlib
from math import comb

from p2pnode.secagg.randomness import SeededRandomness, random_below

#: Failure targets of `choose_neighbours`: correctness (too few live holders) and privacy.
CORRECTNESS_TARGET = 2.0**-20
PRIVACY_TARGET = 2.0**-40


def default_threshold(holders: int) -> int:
    """Shares needed to reconstruct: the smallest integer above 2/3 of `holders` (at least 2)."""
    return max(2, (2 * holders) // 3 + 1)


def min_threshold(holders: int) -> int:
    """The smallest threshold accepted: a strict majority of `holders`, and at least 2."""
    return max(2, holders // 2 + 1)


def binomial_tail(m: int, p: float, a: int) -> float:
    """P(Binomial(m, p) >= a)."""
    if a <= 0:
        return 1.0
    return float(sum(comb(m, i) * p**i * (1.0 - p) ** (m - i) for i in range(a, m + 1)))


def failure_bounds(n: int, k: int, t: int, dropout: float, corruption: float) -> tuple[float, float]:
    """Union bounds ``(P(correctness fails), P(privacy fails))`` for `n` users, degree `k`, threshold `t`."""
    m = min(k, n - 1) + 1
    correct = min(1.0, n * binomial_tail(m, dropout, m - t + 1))
    private = min(1.0, n * binomial_tail(m, corruption, t))
    return correct, private


def choose_neighbours(n: int, dropout: float = 0.05, corruption: float = 0.05) -> int:
    """The smallest even degree meeting the failure targets (see the module docstring); ``n - 1`` if none."""
    k = 2
    while k < n - 1:
        c, p = failure_bounds(n, k, default_threshold(k + 1), dropout, corruption)
        if c <= CORRECTNESS_TARGET and p <= PRIVACY_TARGET:
            return k
        k += 2
    return n - 1


def neighbours(n: int, k: int, seed: bytes) -> tuple[tuple[int, ...], ...]:
    """The neighbours (1-based indices, sorted, self excluded) of users 1..n.

    ``k >= n - 1`` gives the complete graph. Otherwise `k` must be even: the Harary graph ``H(n, k)``
    over a permutation of the users drawn from `seed`.
    """
    if n < 2:
        raise ValueError(f"a graph needs at least 2 users, got {n}")
    if k >= n - 1:
        return tuple(tuple(j for j in range(1, n + 1) if j != i) for i in range(1, n + 1))
    if k < 2 or k % 2:
        raise ValueError(f"the Harary graph needs an even degree >= 2, got {k}")
    rnd = SeededRandomness(hashlib.sha256(b"p2pnode/secagg/v1 graph" + seed).digest())
    ring = list(range(1, n + 1))
    for i in range(n - 1, 0, -1):  # Fisher-Yates with unbiased draws
        j = random_below(rnd, i + 1)
        ring[i], ring[j] = ring[j], ring[i]
    pos = {u: p for p, u in enumerate(ring)}
    half = k // 2
    out = []
    for u in range(1, n + 1):
        p = pos[u]
        adj = {ring[(p + d) % n] for d in range(-half, half + 1) if d}
        out.append(tuple(sorted(adj)))
    return tuple(out)
