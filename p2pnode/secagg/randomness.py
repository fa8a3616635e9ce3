"""Sources of secret randomness for the protocol's keys, seeds and Shamir coefficients.

Production code uses `SystemRandomness` (the operating system's CSPRNG). `SeededRandomness` makes a
run reproducible (tests, `run_local`, the simulator): it expands a seed with AES-256-CTR, so its output
is as unpredictable as the seed, which is public in those settings. Never use it for a real run.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class Randomness(Protocol):
    """A source of uniformly random bytes."""

    def token_bytes(self, n: int) -> bytes:
        """`n` uniformly random bytes."""
        ...


class SystemRandomness:
    """The operating system's CSPRNG (``os.urandom``)."""

    def token_bytes(self, n: int) -> bytes:
        return os.urandom(n)


class SeededRandomness:
    """A deterministic stream of bytes: AES-256-CTR keyed with SHA-256(`label` || `seed`).

    :param seed: any bytes; two instances with the same seed and label produce the same stream.
    :param label: domain separation between streams of one seed (for example a peer's name).
    """

    def __init__(self, seed: bytes, label: bytes = b"") -> None:
        key = hashlib.sha256(b"p2pnode/secagg/v1 seeded randomness" + len(label).to_bytes(4, "big") + label
                             + seed).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def token_bytes(self, n: int) -> bytes:
        return self._enc.update(bytes(n))


def random_below(rnd: Randomness, bound: int) -> int:
    """A uniform integer in ``[0, bound)`` by rejection sampling (no modulo bias).

    The rejections depend only on fresh random bits, never on a secret, so the loop leaks nothing.
    """
    if bound < 1:
        raise ValueError(f"bound must be >= 1, got {bound}")
    bits = (bound - 1).bit_length()
    nbytes = (bits + 7) // 8 or 1
    excess = nbytes * 8 - bits
    while True:
        v = int.from_bytes(rnd.token_bytes(nbytes), "big") >> excess
        if v < bound:
            return v
