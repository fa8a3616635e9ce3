"""Weighted mean (FedAvg, gossip averaging): the baseline every other rule is compared with.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.
Tolerates no Byzantine input: one attacker can move the output arbitrarily far.
"""

from __future__ import annotations

import torch

from p2pnode.aggregation.inputs import Batch, check_finite_output, combine, first_non_finite, raise_non_finite


def mean(batch: Batch, weights: torch.Tensor | None, f: int) -> list[torch.Tensor]:
    """``sum_i w_i u_i`` with weights normalized to sum 1 (uniform when `weights` is None).

    Accumulates in place chunk by chunk (float32 accumulator for 16-bit inputs): memory is the output
    plus one chunk, and each input is read once.
    """
    p = batch.p
    w = weights if weights is not None else torch.full((p,), 1.0 / p, dtype=torch.float64)
    out = combine(batch.vectors, w, batch.sizes, batch.dtypes, batch.device)
    check_finite_output(out, batch.vectors)
    # inputs with weight 0 are skipped by `combine`, so the output check cannot see them
    zero = [i for i, x in enumerate(w.tolist()) if x == 0.0]
    if zero:
        bad = first_non_finite([batch.vectors[i] for i in zero])
        if bad is not None:
            raise_non_finite(zero[bad])
    return out
