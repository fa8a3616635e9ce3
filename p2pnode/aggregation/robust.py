"""Byzantine-robust baselines: coordinate-wise median, trimmed mean, (Multi-)Krum, geometric median,
centered clipping.

Each rule takes ``f``, the number of Byzantine inputs it must withstand; the registry checks ``f``
against the rule's guarantee before calling it (see `p2pnode.aggregation.registry`). The bounds quoted
below are what the tests check: with ``h`` the mean of the ``n_h = p - f`` honest inputs and
``R = max_i |h_i - h|`` their spread, the output ``z`` satisfies ``|z - h| <= C * R`` whatever the
Byzantine inputs are.

Memory: the coordinate-wise rules keep one ``(p, chunk)`` scratch block (1 MiB on CPU); the others run
on the ``p x p`` Gram matrix (`p2pnode.aggregation.gram`) and read the inputs twice.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from p2pnode.aggregation.checks import check_float, check_int
from p2pnode.aggregation.gram import gram, point_sq_distances, sq_distances
from p2pnode.aggregation.inputs import (
    DEVICE_CHUNK,
    Batch,
    combine,
    fill_rows,
    first_non_finite,
    iter_chunks,
    median_of,
    raise_non_finite,
)
from p2pnode.aggregation.mean import mean
from p2pnode.aggregation.sorting import apply_network, selection_network
from p2pnode.errors import AggregationError

#: Elements per input sorted per chunk on CPU: below torch's parallel grain (32768), so no step opens a
#: thread pool, and p rows of it stay in L2.
SORT_CHUNK = 1 << 14


def _order_statistic_pass(batch: Batch, ranks: tuple[int, ...]) -> list[torch.Tensor]:
    """Sort each coordinate's p values (only as far as `ranks` need) and return the mean of those ranks."""
    p = batch.p
    dev = batch.device
    buf_dtype = torch.float64 if torch.float64 in batch.dtypes else torch.float32
    chunk = SORT_CHUNK if dev.type == "cpu" else DEVICE_CHUNK
    chunk = max(1, min(chunk, sum(batch.sizes)))
    net = selection_network(p, ranks)
    buf = torch.empty((p, chunk), dtype=buf_dtype, device=dev)
    out = [torch.empty(n, dtype=dt, device=dev) for n, dt in zip(batch.sizes, batch.dtypes, strict=True)]
    lo, hi = ranks[0], ranks[-1] + 1
    for n, segs in iter_chunks(batch.sizes, chunk):
        fill_rows(buf, batch.vectors, segs)
        block = buf[:, :n]
        # on CPU the checks and the reduction go through numpy too (see `apply_network` for why)
        arr = block.numpy() if dev.type == "cpu" else None
        finite = bool(np.isfinite(arr).all()) if arr is not None else bool(torch.isfinite(block).all())
        if not finite:
            # the culprit may be hidden by the order statistic, so it is found before sorting
            raise_non_finite(first_non_finite(batch.vectors))
        apply_network(block, net)
        if hi - lo == 1:
            res = block[lo]
        elif arr is not None:
            res = torch.from_numpy(arr[lo:hi].mean(axis=0))
        else:
            res = block[lo:hi].mean(dim=0)
        for s in segs:
            out[s.piece][s.start : s.stop].copy_(res[s.offset : s.offset + s.stop - s.start])
    return out


def median(batch: Batch, weights: torch.Tensor | None, f: int) -> list[torch.Tensor]:
    """Coordinate-wise median (the mean of the two middle values when p is even).

    Source: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. Guarantee: ``f < p/2``; each coordinate lies within the honest
    values' range, so ``|z - h| <= sqrt(n_h) * R``.
    """
    p = batch.p
    ranks = (p // 2,) if p % 2 else (p // 2 - 1, p // 2)
    return _order_statistic_pass(batch, ranks)


def trimmed_mean(batch: Batch, weights: torch.Tensor | None, f: int, *, trim: int | None = None) -> list[torch.Tensor]:
    """Coordinate-wise trimmed mean: drop the `trim` largest and `trim` smallest values, average the rest.

    Source: Yin et al., ICML 2018 (as above). `trim` defaults to ``f``; needs ``f <= trim`` and
    ``2 * trim < p``. Every kept value lies in the honest range, so ``|z - h| <= sqrt(n_h) * R``.
    """
    p = batch.p
    t = f if trim is None else trim
    if t == 0:
        return mean(batch, None, f)
    return _order_statistic_pass(batch, tuple(range(t, p - t)))


def _krum_scores(g: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each input: the sum of its ``p - f - 2`` smallest squared distances to the others."""
    p = g.shape[0]
    d2 = sq_distances(g)
    d2.fill_diagonal_(float("inf"))
    k = p - f - 2
    return d2.sort(dim=1).values[:, :k].sum(dim=1)


def multikrum(batch: Batch, weights: torch.Tensor | None, f: int, *, m: int | None = None) -> list[torch.Tensor]:
    """Multi-Krum: the plain mean of the `m` inputs with the lowest Krum scores.

    Sources: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017 (Krum: squared distances, ``p - f - 2`` neighbours, as in
    the paper; the FA repository's copy uses unsquared distances and ``p - f - 1``); El Mhamdi,
    Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML 2018
    (Multi-Krum). `m` defaults to ``p - f`` and must be in ``[1, p - f]``. Guarantee: ``p >= 2f + 3``;
    every selected input is within ``(1 + 2 sqrt(p - f - 2)) * R`` of ``h``, hence so is their mean.
    Ties in the score go to the lower index.
    """
    p = batch.p
    mm = p - f if m is None else check_int("multikrum", "m", m, 1, p - f)
    g = gram(batch.vectors, batch.sizes, batch.device, origin=0)
    scores = _krum_scores(g, f).tolist()
    chosen = sorted(range(p), key=lambda i: (scores[i], i))[:mm]
    coeffs = torch.zeros(p, dtype=torch.float64)
    coeffs[chosen] = 1.0 / mm
    return combine(batch.vectors, coeffs, batch.sizes, batch.dtypes, batch.device)


def krum(batch: Batch, weights: torch.Tensor | None, f: int) -> list[torch.Tensor]:
    """Krum: the single input with the lowest Krum score (Multi-Krum with ``m = 1``)."""
    return multikrum(batch, weights, f, m=1)


def _medoid(d: torch.Tensor, w: torch.Tensor) -> int:
    """Index of the input with the least weighted sum of distances to the others (ties: lower index)."""
    cost = (d * w[None, :]).sum(dim=1).tolist()
    return min(range(len(cost)), key=lambda i: (cost[i], i))


def geomed(
    batch: Batch,
    weights: torch.Tensor | None,
    f: int,
    *,
    iterations: int = 500,
    tol: float = 1e-12,
    nu: float = 1e-6,
) -> list[torch.Tensor]:
    """Geometric median by the smoothed Weiszfeld algorithm, run on the p x p Gram matrix.

    Source: Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning" (RFA), IEEE TSP 2022.
    The iterate stays a convex combination of the inputs, so each step costs O(p^2) and the inputs are
    read only twice (iterations are cheap, hence the generous defaults).

    Start: the (weighted) mean of the ``floor(p/2) + 1`` inputs nearest the medoid. Unlike the plain mean
    it is already within a few honest spreads of the answer when attackers are far away, so few steps
    are needed. Stops after `iterations` steps or when the objective ``sum_i w_i |z - u_i|`` improves by
    less than `tol` (relative). Smoothing: distances are clamped below at ``nu`` times a robust scale
    (the smallest, over inputs, of the median distance to the others), which keeps Weiszfeld defined at
    an input without letting far attackers inflate the clamp.
    Guarantee: ``f < p/2``, ``|z - h| <= 2 n_h / (n_h - f) * R`` (uniform weights).
    """
    iters = check_int("geomed", "iterations", iterations, 0)
    tol_ = check_float("geomed", "tol", tol, 0.0)
    nu_ = check_float("geomed", "nu", nu, 0.0, strict_lo=True)
    p = batch.p
    w = weights if weights is not None else torch.full((p,), 1.0 / p, dtype=torch.float64)
    g = gram(batch.vectors, batch.sizes, batch.device, origin=0)
    pair = sq_distances(g).sqrt()
    centre = _medoid(pair, w)
    near = sorted(range(p), key=lambda j: (float(pair[centre, j]), j))[: p // 2 + 1]
    a = torch.zeros(p, dtype=torch.float64)
    a[near] = w[near]
    a = a / a.sum() if float(a.sum()) > 0 else w.clone()
    if p > 1:
        others = pair.masked_fill(torch.eye(p, dtype=torch.bool), float("nan"))
        scale = float(others.nanquantile(0.5, dim=1).min())
    else:
        scale = 0.0
    floor = max(nu_ * scale, 1e-300)
    dist = point_sq_distances(g, a).sqrt()
    obj = float((w * dist).sum())
    for _ in range(iters):
        if obj == 0.0:
            break
        beta = w / dist.clamp_min(floor)
        a_new = beta / beta.sum()
        dist_new = point_sq_distances(g, a_new).sqrt()
        new_obj = float((w * dist_new).sum())
        if new_obj > obj:  # only rounding (or the smoothing) can make a step go up: keep the better point
            break
        done = obj - new_obj <= tol_ * obj
        a, dist, obj = a_new, dist_new, new_obj
        if done:
            break
    return combine(batch.vectors, a, batch.sizes, batch.dtypes, batch.device)


def _center_pieces(batch: Batch, center: object) -> list[torch.Tensor]:
    """Validate a `centered_clip` start point: a tensor like the updates, or a state like the states."""
    if batch.flat:
        if not isinstance(center, torch.Tensor):
            raise AggregationError(f"centered_clip: center must be a 1-D tensor, got {type(center).__name__}")
        pieces = [center]
    else:
        if not isinstance(center, Mapping):
            raise AggregationError(
                f"centered_clip: center must be a state dict like the inputs, got {type(center).__name__}"
            )
        missing = [k for k in batch.names if k not in center]
        if missing:
            raise AggregationError(f"centered_clip: center lacks entries {missing[:5]}")
        pieces = []
        for k in batch.names:
            t = center[k]
            if not isinstance(t, torch.Tensor):
                raise AggregationError(f"centered_clip: center entry {k!r} is not a tensor")
            pieces.append(t.reshape(-1))
    for piece, ref in zip(pieces, batch.vectors[0], strict=True):
        if piece.shape != ref.shape or piece.device != ref.device:
            raise AggregationError(
                f"centered_clip: center has shape {tuple(piece.shape)} on {piece.device}, "
                f"expected {tuple(ref.shape)} on {ref.device}"
            )
    return pieces


def centered_clip(
    batch: Batch,
    weights: torch.Tensor | None,
    f: int,
    *,
    tau: float | None = None,
    iterations: int = 3,
    center: object = None,
) -> list[torch.Tensor]:
    """Centered clipping: ``v <- v + sum_i w_i (u_i - v) min(1, tau / |u_i - v|)``, `iterations` times.

    Source: Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021.
    The paper starts from the previous aggregate (momentum); pass it as `center` (a tensor like the
    updates, or a state like the states). Without `center` we start from the medoid, the input with the
    least weighted sum of distances to the others, which is robust for ``f < p/2``. `tau` (same unit as
    the updates) defaults to the median distance from the start point to the inputs, so the rule is
    scale-free. Runs on the Gram matrix.

    Guarantee: ``f < p/2`` is enforced (the paper's analysis needs a smaller Byzantine fraction for its
    constants). From the medoid start, ``|z - h| <= (C0 + iterations * (C0 + 1)) * R`` with
    ``C0 = (3 n_h + f) / (n_h - f)``: the medoid is within ``C0 R`` and every step moves at most tau,
    which is at most ``(C0 + 1) R``.
    """
    iters = check_int("centered_clip", "iterations", iterations, 0)
    p = batch.p
    w = weights if weights is not None else torch.full((p,), 1.0 / p, dtype=torch.float64)
    vectors = list(batch.vectors)
    if center is not None:
        vectors.append(_center_pieces(batch, center))
    n_vec = len(vectors)
    g = gram(vectors, batch.sizes, batch.device, origin=n_vec - 1 if center is not None else 0)
    a = torch.zeros(n_vec, dtype=torch.float64)
    if center is not None:
        a[p] = 1.0
    else:
        a[_medoid(sq_distances(g)[:p, :p].sqrt(), w)] = 1.0
    dist = point_sq_distances(g, a)[:p].sqrt()
    if tau is None:
        tau_ = median_of(dist.tolist())
    else:
        tau_ = check_float("centered_clip", "tau", tau, 0.0, strict_lo=True)
    if tau_ > 0.0:
        eye = torch.eye(n_vec, dtype=torch.float64)[:p]
        for _ in range(iters):
            dist = point_sq_distances(g, a)[:p].sqrt()
            clip = torch.where(dist <= tau_, torch.ones_like(dist), tau_ / dist.clamp_min(1e-300))
            a = a + ((w * clip)[:, None] * (eye - a[None, :])).sum(dim=0)
    return combine(vectors, a, batch.sizes, batch.dtypes, batch.device)
