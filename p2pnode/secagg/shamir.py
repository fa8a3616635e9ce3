"""Shamir secret sharing over the prime field GF(P), P = 2^256 + 297.

A secret ``s`` (an integer below P; our secrets are 32-byte strings, so every one fits) is the
constant term of a random polynomial ``f`` of degree ``t - 1``; the share of the user with index ``x``
(1-based, nonzero, distinct) is ``f(x)``. Any ``t`` shares give ``f(0) = s`` by Lagrange interpolation;
any ``t - 1`` shares are consistent with every possible secret, each with the same number of
polynomials, so they reveal nothing about it.

Side channels: the polynomial is evaluated by Horner's rule with a fixed number of steps and no
branch on a secret value; Lagrange coefficients depend only on the public x-coordinates. Python's big
integers are not guaranteed constant-time, so a local attacker timing one process at the
instruction level is outside what this module defends against (as for any pure-Python code); the
peers only ever see shares, never timings of share arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from p2pnode.secagg.randomness import Randomness, random_below

#: The field's prime: the smallest prime above 2^256, so every 32-byte secret is a field element.
PRIME = 2**256 + 297
#: Bytes of one encoded share (big-endian, fixed length).
SHARE_BYTES = 33


def split(secret: int, xs: Sequence[int], t: int, rnd: Randomness, prime: int = PRIME) -> dict[int, int]:
    """Share `secret` t-of-len(xs): return ``{x: f(x)}`` for each x-coordinate in `xs`.

    :param secret: an integer in ``[0, prime)``.
    :param xs: distinct x-coordinates in ``[1, prime)`` (the holders' 1-based indices).
    :param t: shares needed to reconstruct, ``1 <= t <= len(xs)``.
    :param rnd: source of the polynomial's random coefficients.
    :param prime: the field's modulus (default `PRIME`; tests use small primes).
    """
    if not 0 <= secret < prime:
        raise ValueError("the secret must lie in [0, prime)")
    _check_xs(xs, prime)
    if not 1 <= t <= len(xs):
        raise ValueError(f"threshold t={t} must be in [1, {len(xs)}] (the number of shares)")
    coeffs = [secret] + [random_below(rnd, prime) for _ in range(t - 1)]
    return {x: _horner(coeffs, x, prime) for x in xs}


def _horner(coeffs: Sequence[int], x: int, prime: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # a fixed number of steps, whatever the values
        acc = (acc * x + c) % prime
    return acc


def _check_xs(xs: Sequence[int], prime: int) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError(f"x-coordinates must be distinct, got {sorted(xs)}")
    for x in xs:
        if not 0 < x < prime:
            raise ValueError(f"x-coordinate {x} must be in [1, prime)")


def lagrange_at_zero(xs: Sequence[int], prime: int = PRIME) -> list[int]:
    """The coefficients ``l_i`` with ``f(0) = sum_i l_i f(x_i)`` for any polynomial of degree < len(xs)."""
    _check_xs(xs, prime)
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        out.append(num * pow(den, -1, prime) % prime)
    return out


def combine(shares: Mapping[int, int], t: int, prime: int = PRIME) -> int:
    """Reconstruct the secret from at least `t` shares ``{x: f(x)}`` (the first `t` by x are used).

    Raises `ValueError` with fewer than `t` shares. With more, the extra shares are not checked here;
    see `consistent`.
    """
    if len(shares) < t:
        raise ValueError(f"{len(shares)} share(s) cannot reconstruct a secret shared with threshold {t}")
    xs = sorted(shares)[:t]
    coeffs = lagrange_at_zero(xs, prime)
    return sum(c * shares[x] for c, x in zip(coeffs, xs, strict=True)) % prime


def interpolate(shares: Mapping[int, int], x: int, prime: int = PRIME) -> int:
    """The value at `x` of the polynomial of degree < len(shares) through the points `shares` (x may be 0)."""
    xs = sorted(shares)
    if any(not 0 <= xi < prime for xi in xs):
        raise ValueError("points must lie in [0, prime)")
    acc = 0
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (x - xj) % prime
                den = den * (xi - xj) % prime
        acc = (acc + shares[xi] * num * pow(den, -1, prime)) % prime
    return acc


def consistent(shares: Mapping[int, int], t: int, prime: int = PRIME) -> bool:
    """Whether all `shares` lie on one polynomial of degree < `t` (needs more than `t` shares to say no)."""
    xs = sorted(shares)
    if len(xs) <= t:
        return True
    base = {x: shares[x] for x in xs[:t]}
    return all(interpolate(base, x, prime) == shares[x] for x in xs[t:])


def encode(share: int) -> bytes:
    """Fixed-length big-endian bytes of one share (`SHARE_BYTES`)."""
    return share.to_bytes(SHARE_BYTES, "big")


def decode(data: bytes, prime: int = PRIME) -> int:
    """Parse one share; raises `ValueError` when it has the wrong length or is not a field element."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share has {SHARE_BYTES} bytes, got {len(data)}")
    v = int.from_bytes(data, "big")
    if v >= prime:
        raise ValueError("a share must be a field element (below the prime)")
    return v
