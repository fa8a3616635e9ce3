"""VCA: variance-corrected model averaging, layer by layer.

Source: Tian, Al-Ars, Kitsak, Hofstee, "Variance-corrected averaging for gossip learning" (arXiv
2404.04616, 2024); the authors' simulators DFL2 (C++, the paper's experiments) and DFL_torch (PyTorch
port). Spec: ``algorithms.md`` section 2.

Averaging N uncorrelated models divides each layer's variance by about N ("vanishing variance"), which
delays learning in gossip training. VCA averages, then rescales each layer tensor around its own mean so
that its variance equals the mean variance of the models that were averaged:

    A = sum_r w_r M_r                               (received models, weights normalized)
    O = c * M_self + (1 - c) * A                    (only with a "self" model; c = self_weight = 0.5)
    t = sum_r w_r Var(M_r[l])                       (target: received models only, "FollowOthers")
    O[l] <- (O[l] - mean(O[l])) * sqrt(t / Var(O[l])) + mean(O[l])

Variant implemented. The authors have two: the paper-era C++ simulator (population variance, no
epsilon, weight matrices only) and the later torch port (unbiased variance, ``eps = 1e-4`` inside the
ratio, every float entry including biases and norm parameters). The default here is the paper-era one,
because it produced the paper's results and it keeps the invariant exact (``Var(O[l]) == t``), whereas
an absolute ``eps = 1e-4`` is of the order of the Xavier variance of large layers (2 / (fan_in +
fan_out) ~ 1e-4 to 1e-3) and silently weakens the correction there. The torch port is one call away:
``correct="all", unbiased=True, eps=1e-4``.

Which entries (state dicts, `aggregate_states`):

- ``correct="matrices"`` (default): only tensors with ``ndim >= 2`` (conv and linear weights) are
  rescaled. Biases and norm-layer scales/shifts (1-D) are averaged but not rescaled: their ideal spread
  is not the Glorot one, and a norm layer's weight starts at 1 with zero variance.
- ``correct="all"``: every floating-point entry with more than one element.
- Entries with one element, or whose averaged variance is 0 (a constant tensor), are averaged and left
  as they are (there is no spread to rescale).
- BatchNorm statistics (names ending in ``running_mean``, ``running_var``, ``num_batches_tracked``; see
  `local_suffixes`) are never rescaled. With a self model they are not averaged either: the node keeps
  its own (as the torch port does). Without one they are averaged.
- Non-floating entries (integer counters) are handled by `aggregate_states`: the self model's value
  with ``self_index``, else the element-wise lower median.

A flat vector (`aggregate`) is one layer and is always corrected.

For gossip: ``aggregate_states("vca", [own, r1, r2, ...], self_index=0)`` gives the authors' merge
(0.5 own + 0.5 mean of received, target from the received ones). Without ``self_index`` all inputs are
"received" and the result is their (weighted) mean, variance-corrected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from p2pnode.aggregation.checks import check_choice, check_float, check_int
from p2pnode.aggregation.inputs import (
    Batch,
    check_finite_output,
    combine,
    first_non_finite,
    raise_non_finite,
    work_dtype,
)
from p2pnode.errors import AggregationError

#: State-dict name suffixes of BatchNorm statistics: kept from the self model, never rescaled.
LOCAL_SUFFIXES: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")


def _var(t: torch.Tensor, unbiased: bool) -> float:
    return float(torch.var(t.to(work_dtype(t.dtype)), correction=1 if unbiased else 0))


def vca(
    batch: Batch,
    weights: torch.Tensor | None,
    f: int,
    *,
    self_index: int | None = None,
    self_weight: float = 0.5,
    target: str = "received",
    correct: str = "matrices",
    unbiased: bool = False,
    eps: float = 0.0,
    strength: float = 1.0,
    local_suffixes: Sequence[str] = LOCAL_SUFFIXES,
) -> list[torch.Tensor]:
    """Variance-corrected averaging (see the module docstring).

    Args:
        self_index: index of the node's own model among the inputs, or None (all inputs are received).
        self_weight: ``c`` in ``O = c * self + (1 - c) * mean(received)``; default 0.5 (the authors').
            Used only with `self_index`.
        target: ``"received"`` (default; the paper's FollowOthers), ``"self"`` (own variance before the
            merge) or ``"mixed"`` (``c * Var(self) + (1 - c) * target_received``). The last two need
            `self_index`.
        correct: ``"matrices"`` (default: ndim >= 2 only) or ``"all"`` (every float entry).
        unbiased: use the unbiased variance (divide by n - 1) as the torch port does; default False.
        eps: added to both variances in the ratio (torch port: 1e-4); default 0.
        strength: partial correction ``s' = (s - 1) * strength + 1``; default 1 (full correction).
        local_suffixes: name suffixes of entries kept from the self model and never rescaled.

    `weights` weight the received models (the self model's own weight is ignored; it gets `self_weight`).
    """
    p = batch.p
    c = check_float("vca", "self_weight", self_weight, 0.0, 1.0)
    mode = check_choice("vca", "target", target, ("received", "self", "mixed"))
    which = check_choice("vca", "correct", correct, ("matrices", "all"))
    eps_ = check_float("vca", "eps", eps, 0.0)
    rho = check_float("vca", "strength", strength, 0.0)
    if not isinstance(unbiased, bool):
        raise AggregationError(f"vca: unbiased must be True or False, got {unbiased!r}")
    suffixes = tuple(local_suffixes)
    if self_index is None:
        if mode != "received":
            raise AggregationError(f"vca: target={mode!r} needs self_index (which input is the own model)")
        received = list(range(p))
    else:
        own = check_int("vca", "self_index", self_index, 0, p - 1)
        received = [i for i in range(p) if i != own]
        if not received:
            raise AggregationError("vca: self_index is set but there is no received model; pass at least two")
    if weights is None:
        w_r = torch.full((len(received),), 1.0 / len(received), dtype=torch.float64)
    else:
        w_r = weights[received]
        if float(w_r.sum()) <= 0.0:
            raise AggregationError("vca: the received models' weights sum to 0")
        w_r = w_r / w_r.sum()
    rec_vectors = [batch.vectors[i] for i in received]
    avg = combine(rec_vectors, w_r, batch.sizes, batch.dtypes, batch.device)
    check_finite_output(avg, rec_vectors)
    own_vec = None
    if self_index is not None:
        own_vec = batch.vectors[self_index]
        if first_non_finite([own_vec]) is not None:
            raise_non_finite(self_index)
    w_list = w_r.tolist()
    out: list[torch.Tensor] = []
    for k, (name, shape) in enumerate(zip(batch.names, batch.shapes, strict=True)):
        is_local = not batch.flat and name.endswith(suffixes)
        if own_vec is not None and is_local:
            out.append(own_vec[k].clone())
            continue
        dt = batch.dtypes[k]
        o = avg[k].to(work_dtype(dt))
        if own_vec is not None:
            o.mul_(1.0 - c).add_(own_vec[k], alpha=c)
        corrected = not is_local and o.numel() > 1 and (batch.flat or which == "all" or len(shape) >= 2)
        if corrected:
            tgt = sum(w * _var(v[k], unbiased) for w, v in zip(w_list, rec_vectors, strict=True))
            if own_vec is not None and mode != "received":
                own_var = _var(own_vec[k], unbiased)
                tgt = own_var if mode == "self" else c * own_var + (1.0 - c) * tgt
            cur = _var(o, unbiased)
            if cur > 0.0:
                s = math.sqrt((tgt + eps_) / (cur + eps_))
                s = (s - 1.0) * rho + 1.0
                mu = float(o.mean())
                o.sub_(mu).mul_(s).add_(mu)
        out.append(o if o.dtype == dt else o.to(dt))
    # The rescale can push a finite mean past the dtype's range (float16 tops out at 65504): refuse with
    # the same error as `mean` rather than return +-Inf.
    check_finite_output(out, [])
    return out
