"""The mask generator: a stream cipher's keystream read as words of Z_(2^32) or Z_(2^64).

``PRG(seed)`` is the keystream of a real stream cipher keyed with the whole 32-byte seed, zero IV,
read as little-endian unsigned words. Because the modulus is a power of two, each word is exactly
uniform in Z_R when the keystream is: no reduction, no bias. Each seed keys exactly one stream (every
seed is derived for one pair of users, or one user, in one instance), so the fixed IV never repeats a
(key, IV) pair.

Ciphers: ``aes-256-ctr`` (default; about twice as fast as ChaCha20 on CPUs with AES instructions,
which every x86-64 and ARMv8 server CPU has) and ``chacha20`` (for CPUs without them). Both come
from OpenSSL through ``cryptography``. Never a non-cryptographic RNG, never a seed shorter than the
key: a 32-bit seed, as some references fold their keys into, lets anyone who sees one masked vector
brute-force its mask.

Masks are added chunk by chunk (`MaskGenerator.apply`, `apply_all`, `chunks`): the keystream of one
chunk (256 KiB by default) stays in cache while it is added, and all the masks of a vector are added to
one chunk before the next, so any number of masks costs one pass over the accumulator instead of one
each, and no second vector of the model's size is materialized.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

#: Mask generators by name.
ALGORITHMS: tuple[str, ...] = ("aes-256-ctr", "chacha20")
#: Length of a seed, in bytes (the key length of both ciphers).
SEED_BYTES = 32

Algorithm = Literal["aes-256-ctr", "chacha20"]


def word_dtype(word_bits: int) -> np.dtype[np.unsignedinteger]:
    """The numpy dtype of one word of Z_(2^word_bits) (uint32 or uint64, native byte order)."""
    if word_bits == 32:
        return np.dtype(np.uint32)
    if word_bits == 64:
        return np.dtype(np.uint64)
    raise ValueError(f"word_bits must be 32 or 64, got {word_bits}")


class MaskGenerator:
    """Expands 32-byte seeds into masks of Z_(2^word_bits)^n.

    :param algorithm: ``"aes-256-ctr"`` (default) or ``"chacha20"``.
    :param word_bits: 32 (default) or 64: the modulus is 2^word_bits.
    :param chunk_bytes: keystream generated per step, in bytes (default 256 KiB).
    """

    def __init__(self, algorithm: str = "aes-256-ctr", word_bits: int = 32, chunk_bytes: int = 1 << 18) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown mask generator {algorithm!r}; available: {', '.join(ALGORITHMS)}")
        self.algorithm = algorithm
        self.word_bits = word_bits
        self.dtype = word_dtype(word_bits)
        self._le = self.dtype.newbyteorder("<")
        step = self.dtype.itemsize
        if chunk_bytes < step:
            raise ValueError(f"chunk_bytes must be at least {step}")
        self.chunk_words = chunk_bytes // step
        self._zeros = bytes(self.chunk_words * step)
        # update_into needs room for a block beyond the data for block ciphers.
        self._out = bytearray(self.chunk_words * step + 16)

    def _encryptor(self, seed: bytes) -> CipherContext:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
        if self.algorithm == "aes-256-ctr":
            return Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        return Cipher(algorithms.ChaCha20(seed, bytes(16)), None).encryptor()

    def stream(self, seed: bytes, n: int) -> np.ndarray:
        """The first `n` words of ``PRG(seed)``, as a new array."""
        out = np.zeros(n, dtype=self.dtype)
        self.apply(out, seed, +1)
        return out

    def apply(self, acc: np.ndarray, seed: bytes, sign: int) -> None:
        """``acc += sign * PRG(seed)`` modulo 2^word_bits, in place (`sign` is +1 or -1)."""
        self.apply_all(acc, [(seed, sign)])

    def apply_all(self, acc: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> None:
        """``acc += sum(sign * PRG(seed))`` over the ``(seed, sign)`` pairs of `masks`, in place."""
        for _ in self.chunks(acc, masks):
            pass

    def chunks(self, acc: np.ndarray, masks: Sequence[tuple[bytes, int]]) -> Iterator[tuple[int, int]]:
        """Add ``sign * PRG(seed)`` for every ``(seed, sign)`` of `masks` to `acc`, one chunk at a time
        for all of them, and yield each chunk's ``(start, stop)`` once all masks are in it (while it is
        still in cache: the aggregator decodes it there). One pass over `acc` for any number of masks.
        """
        if acc.dtype != self.dtype or acc.ndim != 1:
            raise ValueError(f"the accumulator must be a 1-D {self.dtype} array, got {acc.dtype} {acc.shape}")
        if any(sign not in (1, -1) for _seed, sign in masks):
            raise ValueError(f"signs must be +1 or -1, got {[sign for _seed, sign in masks]}")
        streams = [(self._encryptor(seed), np.add if sign == 1 else np.subtract) for seed, sign in masks]
        step = self.dtype.itemsize
        zeros = memoryview(self._zeros)
        keystream = np.frombuffer(self._out, dtype=self._le, count=self.chunk_words)
        n = acc.shape[0]
        for start in range(0, n, self.chunk_words):
            stop = min(n, start + self.chunk_words)
            nbytes = (stop - start) * step
            part = acc[start:stop]
            ks = keystream[:stop - start]
            for enc, op in streams:
                written = enc.update_into(zeros[:nbytes], self._out)
                assert written == nbytes  # a stream mode emits exactly one byte per input byte
                # numpy's unsigned arithmetic wraps modulo 2^bits: exactly the group operation of Z_R.
                op(part, ks, out=part)
            yield start, stop
