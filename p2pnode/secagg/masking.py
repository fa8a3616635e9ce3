"""Double masking in Z_(2^bits), on explicit masks: the algebra the protocol runs on PRG outputs.

A user ``u`` sends ``y_u = x_u + b_u + sum_v sign(u, v) p_{u,v}`` with its self mask ``b_u`` and one
pairwise mask ``p_{u,v} = p_{v,u}`` per partner, ``sign(u, v) = +1 if u > v else -1``; the two signs of
a pair are opposite, so pairwise masks cancel in the sum of both. The aggregator removes the self
masks of the survivors and, for each survivor ``u`` paired with a dropped ``v``, adds
``sign(v, u) p_{v,u}``, the term ``v`` would have contributed. The protocol code (`SecAggUser`,
`SecAggAggregator`) applies these signs to masks streamed from `MaskGenerator`; these functions are
the reference for tests (algorithms.md 5.7), on any unsigned numpy dtype (uint8 gives Z_256).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def pair_sign(u: int, v: int) -> int:
    """Sign with which user `u` applies its pairwise mask with `v`: +1 if u > v, else -1."""
    if u == v:
        raise ValueError("a user has no pairwise mask with itself")
    return 1 if u > v else -1


def _signed(acc: np.ndarray, mask: np.ndarray, sign: int) -> None:
    (np.add if sign > 0 else np.subtract)(acc, mask, out=acc)


def mask_input(u: int, x: np.ndarray, self_mask: np.ndarray, pair_masks: Mapping[int, np.ndarray]) -> np.ndarray:
    """``y_u = x_u + b_u + sum_v sign(u, v) p_{u,v}`` modulo 2^bits of the arrays' unsigned dtype."""
    y = x.copy()
    np.add(y, self_mask, out=y)
    for v, p in pair_masks.items():
        _signed(y, p, pair_sign(u, v))
    return y


def unmask_sum(masked: Mapping[int, np.ndarray], self_masks: Mapping[int, np.ndarray],
               dropped_pairs: Mapping[tuple[int, int], np.ndarray]) -> np.ndarray:
    """``sum_u y_u - sum_u b_u + sum_{(v, u)} sign(v, u) p_{v,u}`` over survivors u and dropped partners v.

    :param masked: ``y_u`` of each survivor.
    :param self_masks: ``b_u`` of each survivor (reconstructed from shares).
    :param dropped_pairs: ``p_{v,u}`` for each dropped ``v`` and surviving partner ``u``, keyed (v, u).
    """
    if set(self_masks) != set(masked):
        raise ValueError("one self mask per survivor is needed")
    first = next(iter(masked.values()))
    total = np.zeros_like(first)
    for y in masked.values():
        np.add(total, y, out=total)
    for b in self_masks.values():
        np.subtract(total, b, out=total)
    for (v, u), p in dropped_pairs.items():
        if u not in masked or v in masked:
            raise ValueError(f"pair ({v}, {u}) must join a dropped user to a survivor")
        _signed(total, p, pair_sign(v, u))
    return total
