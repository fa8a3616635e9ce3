"""Flag Aggregator (FA): a Byzantine-robust subspace aggregate, solved in the p x p Gram space.

Source: Almasi, Mishra, Vamanan, Ravi, "Flag Aggregator: Scalable Distributed Training under Failures
and Augmented Losses using Convex Optimization", ICLR 2024 (reference code: hamidralmasi/FlagAggregator,
``aggregators/flag.py`` and ``center_algorithms_torch.py``). Spec: ``algorithms.md`` section 4.

The model. Inputs ``u_1..u_p`` (model *updates*, never whole models) are normalized to unit directions
``g_i = u_i / |u_i|``. FA looks for an orthonormal ``Y`` (d x m) minimizing

    A(Y) = sum_i sqrt(1 - |Y'g_i|^2) + lam / (p (p-1)) * sum_{i != j} sqrt(|1 - |Y'(g_i - g_j)|^2|),

the sum of the sines of the angles between each input and the subspace (the flag median) plus a pairwise
term, by iteratively reweighted least squares (IRLS): each step takes the top-m eigenvectors of
``sum_i (sin^2_i + eps)^(-1/2) g_i g_i'`` (plus the pairwise terms, whose column factor lam/(p(p-1)) enters
squared, as in the reference code), and keeps the new subspace only if the unregularized objective went
down. The authors' aggregate is ``g_FA = (1/m) sum_i Y Y' g_i``.

Why the Gram space. Every ``g_i`` and ``g_i - g_j`` lies in the span of the inputs, so with the cosine
matrix ``K = V diag(l) V'`` (from one pass over the data), ``R = diag(sqrt(l)) V'`` (r x p) are the
inputs' coordinates in an orthonormal basis of that span. Each IRLS step is then an r x r symmetric
eigenproblem (r <= p), and the result is one more pass: a linear combination of the inputs. Cost:
``O(d p^2)`` for the Gram matrix plus ``O(d p)`` for the output, instead of an ``O(d p^2)`` SVD of a
d x p (or d x p^2 with lam > 0) matrix per iteration.

Deterministic start. The reference code starts from a random orthonormal matrix (seed 1); in high
dimension its first step is then the *flag mean* (top-m left singular vectors of ``[g_1..g_p]``). We
start from exactly that flag mean, so results never depend on a seed, and in low dimension a random
start cannot lock onto an outlier (algorithms.md 4.8).

Scale restoration (our choice, ``scale="median_norm"``, the default). ``g_FA`` has length about p/m
whatever the inputs' norms. We return ``(m/p) * median_i |u_i| * g_FA``: the mean of the inputs' unit
directions projected onto the subspace, times the median input norm. Identical inputs come back
unchanged (it equals the mean), and attackers cannot inflate the norm while they are a minority
(the median norm is at most the largest honest norm). ``scale="none"`` returns the authors' ``g_FA``.

Zero inputs have no direction: their ``g_i`` is taken as 0 (they count in p and in the median norm,
so they pull the result towards no movement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pnode.aggregation.checks import check_choice, check_float, check_int
from p2pnode.aggregation.gram import gram
from p2pnode.aggregation.inputs import Batch, combine, median_of

#: Stop when an IRLS step lowers the objective by less than this, or the objective is below it
#: (the reference code's thresholds).
OBJECTIVE_TOL = 1e-10
#: Eigenvalues of the cosine matrix below this fraction of the largest are treated as 0 (rank cut).
RANK_TOL = 1e-10


def default_m(p: int) -> int:
    """The authors' subspace size as a rule: ``round(8 p / 15)``.

    It gives the m they used for each p: 4, 8, 16, 32 for p = 7, 15, 30, 60.
    """
    return max(1, int(8 * p / 15 + 0.5))


@dataclass(frozen=True)
class FlagSolution:
    """Result of the IRLS solve on a Gram matrix.

    Attributes:
        basis: ``(p, k)`` float64, ``k = min(m, rank)``: the subspace is ``Y = [g_1..g_p] @ basis`` with
            orthonormal columns (the other ``m - k`` columns, if any, are orthogonal to every input and
            contribute nothing).
        coeffs: ``(p,)`` float64: the authors' aggregate is ``g_FA = sum_i coeffs[i] * u_i`` (raw inputs).
        objective: the unregularized sum of sines of each accepted iterate, the start first
            (non-increasing by construction).
        steps: the number of IRLS steps accepted.
        norms: ``(p,)`` input norms ``|u_i|``.
    """

    basis: torch.Tensor
    coeffs: torch.Tensor
    objective: list[float]
    steps: int
    norms: torch.Tensor


def solve_flag(g: torch.Tensor, m: int, lam: float = 0.0, iterations: int = 1, eps: float = 1e-7) -> FlagSolution:
    """Run FlagIRLS on the Gram matrix ``g[i, j] = <u_i, u_j>`` (float64, p x p). Pure p x p algebra.

    Args:
        g: Gram matrix of the raw inputs.
        m: subspace dimension (>= 1).
        lam: weight of the pairwise term (0 disables it, the authors' main setting).
        iterations: maximum IRLS steps after the flag-mean start (the flag mean is what the authors'
            ``flag.py`` returns, so 0 reproduces it).
        eps: added to each squared sine before the inverse square root (reference: 1e-7).
    """
    g = g.to(torch.float64)
    p = g.shape[0]
    norms = g.diagonal().clamp_min(0.0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    cos = g * inv[:, None] * inv[None, :]
    evals, evecs = torch.linalg.eigh(0.5 * (cos + cos.T))
    evals, evecs = evals.flip(0), evecs.flip(1)
    top = float(evals[0]) if p else 0.0
    keep = evals > max(top * RANK_TOL, 0.0)
    r = int(keep.sum())
    if r == 0:
        z = torch.zeros(p, dtype=torch.float64)
        return FlagSolution(torch.zeros((p, 0), dtype=torch.float64), z, [float(p)], 0, norms)
    lam_r = evals[:r]
    vecs = evecs[:, :r]
    coords = lam_r.sqrt()[:, None] * vecs.T  # (r, p): coordinates of g_i in an orthonormal basis
    k = min(m, r)
    # flag mean: top-k eigenvectors of coords @ coords' = diag(lam_r), i.e. the first k basis vectors
    e = torch.eye(r, dtype=torch.float64)[:, :k]

    def sin2(sub: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - (sub.T @ x).square().sum(dim=0)

    def objective(sub: torch.Tensor) -> float:
        return float(sin2(sub, coords).clamp_min(0.0).sqrt().sum())

    err = objective(e)
    history = [err]
    steps = 0
    if lam > 0.0 and p > 1:
        diffs = (coords[:, :, None] - coords[:, None, :]).reshape(r, p * p)
        off_diag = ~torch.eye(p, dtype=torch.bool).reshape(-1)
        pair_factor = (lam / (p * (p - 1))) ** 2
    for _ in range(iterations):
        if err <= OBJECTIVE_TOL:
            break
        weights = (sin2(e, coords).abs() + eps).rsqrt()
        s = (coords * weights) @ coords.T
        if lam > 0.0 and p > 1:
            pw = (sin2(e, diffs).abs() + eps).rsqrt() * pair_factor * off_diag
            s = s + (diffs * pw) @ diffs.T
        _, sv = torch.linalg.eigh(0.5 * (s + s.T))
        e_new = sv.flip(1)[:, :k]
        new_err = objective(e_new)
        if not new_err < err:
            break
        decrease = err - new_err
        e, err = e_new, new_err
        history.append(err)
        steps += 1
        if decrease <= OBJECTIVE_TOL:
            break
    # g_FA = (1/m) Y Y' sum_i g_i; in basis coordinates z = (1/m) E E' R 1, then back to the inputs
    z = e @ (e.T @ coords.sum(dim=1)) / m
    on_dirs = vecs @ (z / lam_r.sqrt())
    basis = vecs @ (e / lam_r.sqrt()[:, None])
    return FlagSolution(basis, on_dirs * inv, history, steps, norms)


def flag(
    batch: Batch,
    weights: torch.Tensor | None,
    f: int,
    *,
    m: int | None = None,
    lam: float = 0.0,
    iterations: int = 1,
    eps: float = 1e-7,
    scale: str = "median_norm",
) -> list[torch.Tensor]:
    """Flag Aggregator over the batch (see the module docstring).

    Args:
        m: subspace dimension; default `default_m` (8 for p = 15).
        lam: pairwise regularization weight; default 0 (the authors' main runs; they swept 0..64).
        iterations: IRLS steps after the flag-mean start; default 1, one step past the authors' ``flag.py``
            output (``iterations=0, scale="none"`` reproduces theirs).
        eps: IRLS smoothing of the squared sines; default 1e-7.
        scale: ``"median_norm"`` (default: the output equals the mean for identical inputs) or ``"none"``
            (the authors' raw ``g_FA``, length about p/m).

    Guarantee: ``f < p/2`` (the reference trainer asserts ``2f < p``). Because inputs are normalized and the
    output norm is at most the median input norm, ``|z - h| <= |h| + max_honest |u_i|`` for any attack;
    this bounds the damage but is not a multiple of the honest spread (FA returns a direction, not the mean).
    """
    p = batch.p
    mm = default_m(p) if m is None else check_int("flag", "m", m, 1)
    lam_ = check_float("flag", "lam", lam, 0.0)
    iters = check_int("flag", "iterations", iterations, 0)
    eps_ = check_float("flag", "eps", eps, 0.0, strict_lo=True)
    mode = check_choice("flag", "scale", scale, ("median_norm", "none"))
    g = gram(batch.vectors, batch.sizes, batch.device)
    sol = solve_flag(g, mm, lam_, iters, eps_)
    coeffs = sol.coeffs
    if mode == "median_norm":
        coeffs = coeffs * (mm / p) * median_of(sol.norms.tolist())
    return combine(batch.vectors, coeffs, batch.sizes, batch.dtypes, batch.device)
