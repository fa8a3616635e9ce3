"""Sorting networks for coordinate-wise order statistics over a handful of inputs.

`torch.sort` along a dimension of size p ~ 15 costs about 0.7 microseconds per coordinate on the
benchmark CPU; a fixed network of compare-exchange steps on whole rows (``torch.minimum`` /
``torch.maximum`` over a cache-sized chunk) is about 20x faster, because every step is one vectorised
pass. The network is Batcher's odd-even merge sort for the next power of two, with the comparators that
touch the (conceptual) +inf padding removed, which leaves a valid network for any p. When only some
ranks are needed (the median, the middle of a trimmed mean), comparators that cannot influence them
are pruned.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch

Comparator = tuple[int, int]


@lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[Comparator, ...]:
    """Comparators ``(i, j)``, ``i < j``, that sort ``n`` values ascending when applied in order."""
    if n < 1:
        raise ValueError(f"a sorting network needs n >= 1, got {n}")
    size_pow2 = 1
    while size_pow2 < n:
        size_pow2 *= 2
    out: list[Comparator] = []
    block = 1
    while block < size_pow2:
        k = block
        while k >= 1:
            for j in range(k % block, size_pow2 - k, 2 * k):
                for i in range(min(k, size_pow2 - j - k)):
                    lo, hi = i + j, i + j + k
                    # same merge block, and not touching padding (a padded +inf never moves)
                    if lo // (2 * block) == hi // (2 * block) and hi < n:
                        out.append((lo, hi))
            k //= 2
        block *= 2
    return tuple(out)


@lru_cache(maxsize=256)
def selection_network(n: int, ranks: tuple[int, ...]) -> tuple[Comparator, ...]:
    """The comparators of `sorting_network` that can affect the values ending at `ranks`."""
    needed = set(ranks)
    kept: list[Comparator] = []
    for i, j in reversed(sorting_network(n)):
        if i in needed or j in needed:
            kept.append((i, j))
            needed.update((i, j))
    kept.reverse()
    return tuple(kept)


def apply_network(rows: torch.Tensor, network: Iterable[Comparator]) -> None:
    """Sort the rows of a ``(n, c)`` tensor in place, column by column (NaN-free input expected).

    On CPU (float32/float64) the steps run through numpy on the same memory: numpy's element-wise calls
    cost about a microsecond and never open a thread pool, whereas each torch call on a large row opens
    an OpenMP region, which stalls badly when the cores are busy (e.g. training next to us).
    """
    if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64):
        arr = rows.numpy()
        tmp = np.empty(arr.shape[1], dtype=arr.dtype)
        for i, j in network:
            a, b = arr[i], arr[j]
            np.minimum(a, b, out=tmp)
            np.maximum(a, b, out=b)
            a[...] = tmp
        return
    for i, j in network:
        a, b = rows[i], rows[j]
        lo = torch.minimum(a, b)
        torch.maximum(a, b, out=b)
        a.copy_(lo)
