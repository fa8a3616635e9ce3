"""How secure aggregation composes with the aggregation rules ``mean`` and ``vca``.

- **mean:** `SecAggResult.mean` is the weighted mean ``sum(w x) / sum(w)`` of the survivors (the
  weight travels as the last coordinate). With unit weights it is MoDeST's plain mean over U3.
- **vca** (algorithms.md 2.2 and 5.6): each user appends the variance of each corrected layer of its
  model as extra coordinates (`layer_variances`); the aggregator's `SecAggResult.extras_mean` is then
  exactly the VCA target ``sum_r w_r Var(M_r[l])`` (normalized weights), and `variance_correct`
  rescales each layer of the mean around its own mean to that target. This is the "FollowOthers"
  target with population variances and no epsilon, the default of `p2pnode.aggregation.vca` without
  a self model. The variances must fit `SecAggSettings.extra_range` (default [0, 1]).
- **outer optimizer:** trainers send their pseudo-gradient ``delta_i``; the secure mean is the
  outer optimizer's gradient, unchanged. (VCA applies to weights, not to deltas.)

Rules that need individual updates (``flag``, ``median``, ``krum``, ...) are refused inside a sample by
`p2pnode.secagg.settings.check_rule_compatible`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_variances(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Population variance of each tensor (float64); what a user sends as extras for VCA.

    Tensors with fewer than 2 elements have variance 0 (they are not rescaled).
    """
    return torch.tensor([float(torch.var(t.detach().to(torch.float64), correction=0)) if t.numel() > 1 else 0.0
                         for t in layers], dtype=torch.float64)


def split_layers(flat: torch.Tensor, shapes: Sequence[torch.Size | tuple[int, ...]]) -> list[torch.Tensor]:
    """Cut a flat vector into tensors of `shapes` (in order); the sizes must add up to its length."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != flat.numel():
        raise ValueError(f"the shapes hold {sum(sizes)} elements, the vector {flat.numel()}")
    return [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes, strict=True)]


def variance_correct(mean_layers: Sequence[torch.Tensor], targets: torch.Tensor,
                     corrected: Sequence[bool] | None = None) -> list[torch.Tensor]:
    """Rescale each layer of the mean around its own mean so that its population variance is the target.

    :param mean_layers: the layers of the (securely aggregated) mean model.
    :param targets: one target variance per layer (`SecAggResult.extras_mean`).
    :param corrected: which layers to rescale (default: all with more than one element). Layers with
        zero variance are left as they are.
    """
    if targets.numel() != len(mean_layers):
        raise ValueError(f"{targets.numel()} targets for {len(mean_layers)} layers")
    out = []
    for i, layer in enumerate(mean_layers):
        o = layer.detach().to(torch.float64).clone()
        if (corrected is None or corrected[i]) and o.numel() > 1:
            cur = float(torch.var(o, correction=0))
            tgt = max(0.0, float(targets[i]))
            if cur > 0.0:
                mu = float(o.mean())
                o.sub_(mu).mul_((tgt / cur) ** 0.5).add_(mu)
        out.append(o.to(layer.dtype))
    return out
