"""Flag Aggregator: known answers (algorithms.md 4.8) and agreement with a straightforward solver."""

from __future__ import annotations

import math

import pytest
import torch

from p2pnode.aggregation import aggregate, solve_flag
from p2pnode.aggregation.flag import default_m
from p2pnode.errors import AggregationError


def reference_flag(
    updates: list[torch.Tensor], m: int, lam: float = 0.0, iterations: int = 1, eps: float = 1e-7
) -> torch.Tensor:
    """FlagIRLS as specified, the direct way: a d x p (or d x p^2) matrix and its SVD at every step.

    Starts from the flag mean (top-m left singular vectors of the normalized inputs); returns the
    authors' aggregate ``(1/m) sum_i Y Y' g_i`` in float64.
    """
    x = torch.stack([u.double() / u.double().norm() for u in updates], dim=1)  # d x p
    p = x.shape[1]

    def top(mat: torch.Tensor) -> torch.Tensor:
        u, _, _ = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :m]

    def sin2(y: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return 1.0 - (y.T @ cols).square().sum(dim=0)

    def objective(y: torch.Tensor) -> float:
        return float(sin2(y, x).clamp_min(0.0).sqrt().sum())

    y = top(x)
    err = objective(y)
    for _ in range(iterations):
        if err <= 1e-10:
            break
        cols = [x * (sin2(y, x).abs() + eps) ** -0.25]
        if lam > 0:
            for i in range(p):
                for j in range(p):
                    if i != j:
                        diff = (x[:, i] - x[:, j])[:, None]
                        scale = (sin2(y, diff).abs() + eps) ** -0.25 * lam / (p * (p - 1))
                        cols.append(diff * scale)
        y_new = top(torch.cat(cols, dim=1))
        new_err = objective(y_new)
        if not new_err < err:
            break
        decrease = err - new_err
        y, err = y_new, new_err
        if decrease <= 1e-10:
            break
    return y @ (y.T @ x.sum(dim=1)) / m


def _random_updates(p: int, d: int, seed: int, outliers: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=gen, dtype=torch.float64)
    ups = [common + torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(p - outliers)]
    ups += [10 * torch.rand(d, generator=gen, dtype=torch.float64) for _ in range(outliers)]
    return ups


@pytest.mark.parametrize(
    ("p", "d", "m", "lam", "iterations"),
    [
        (5, 40, 2, 0.0, 1),
        (7, 300, 4, 0.0, 4),
        (7, 300, 4, 2.0, 3),
        (15, 2000, 8, 0.0, 1),
        (9, 300, 4, 16.0, 2),
        (5, 60, 2, 8.0, 3),  # the pairwise term changes every accepted step (output moves by 0.13)
        (6, 80, 3, 32.0, 3),  # so large that the first step raises the objective and is refused
        (10, 1000, 5, 0.0, 10),
        (6, 4, 3, 0.0, 5),  # d < p: the inputs span only 4 dimensions
        (8, 100, 12, 0.0, 2),  # m > p
    ],
)
def test_gram_space_equals_straightforward_solver(p: int, d: int, m: int, lam: float, iterations: int) -> None:
    ups = _random_updates(p, d, seed=p * 1000 + d, outliers=min(2, p // 4))
    expect = reference_flag(ups, m, lam, iterations)
    got = aggregate("flag", ups, m=m, lam=lam, iterations=iterations, scale="none")
    assert torch.allclose(got, expect, atol=1e-5, rtol=0), float((got - expect).abs().max())
    # float32 inputs: same algorithm, float32 rounding of inputs and output only
    got32 = aggregate("flag", [u.float() for u in ups], m=m, lam=lam, iterations=iterations, scale="none")
    expect32 = reference_flag([u.float() for u in ups], m, lam, iterations)
    assert torch.allclose(got32.double(), expect32, atol=1e-5, rtol=0)


def test_identical_inputs() -> None:
    g = torch.tensor([3.0, 4.0])
    raw = aggregate("flag", [g, g, g], m=1, scale="none")
    assert torch.allclose(raw, torch.tensor([1.8, 2.4]))  # the mean direction times p/m
    assert math.isclose(float(raw.norm()), 3.0, rel_tol=1e-6)
    # our default scale restoration returns the input itself (the mean)
    assert torch.allclose(aggregate("flag", [g, g, g], m=1), g)


def test_orthogonal_outlier_gets_zero_weight() -> None:
    g1, g2, g3 = torch.tensor([1.0, 0, 0]), torch.tensor([0.9, 0.1, 0]), torch.tensor([0.0, 0, 5])
    out = aggregate("flag", [g1, g2, g3], m=1, lam=0.0, iterations=50, scale="none", f=1)
    assert float(out[2]) == 0.0
    # from the flag-mean start the two unit directions get equal IRLS weights, so the subspace stays on
    # their bisector: Y = (u1 + u2)/|u1 + u2| and g_FA = Y * (Y'u1 + Y'u2)
    u1, u2 = g1.double(), g2.double() / g2.double().norm()
    y = (u1 + u2) / (u1 + u2).norm()
    expect = y * (y @ u1 + y @ u2)
    assert torch.allclose(out.double(), expect, atol=1e-6)
    assert torch.allclose(out, torch.tensor([1.99388, 0.11043, 0.0]), atol=1e-4)
    assert torch.allclose(out.double(), reference_flag([g1, g2, g3], 1, iterations=50).double(), atol=1e-6)


def test_deterministic_and_seed_free() -> None:
    ups = _random_updates(9, 500, seed=11, outliers=2)
    torch.manual_seed(1)
    a = aggregate("flag", ups)
    torch.manual_seed(12345)
    b = aggregate("flag", ups)
    assert torch.equal(a, b)


def test_subspace_is_orthonormal_and_objective_never_increases() -> None:
    ups = _random_updates(12, 400, seed=5, outliers=3)
    x = torch.stack([u / u.norm() for u in ups], dim=1)
    g = torch.stack(ups) @ torch.stack(ups).T
    for lam in (0.0, 8.0):
        sol = solve_flag(g, m=5, lam=lam, iterations=20)
        y = x @ sol.basis
        assert torch.allclose(y.T @ y, torch.eye(y.shape[1], dtype=torch.float64), atol=1e-9)
        assert all(b <= a for a, b in zip(sol.objective, sol.objective[1:], strict=False))
        assert sol.steps == len(sol.objective) - 1


def test_vectors_outside_the_span_never_enter() -> None:
    # m larger than the rank: the extra directions contribute nothing, the output stays in the span
    ups = [
        torch.tensor([1.0, 2.0, 0.0, 0.0]),
        torch.tensor([2.0, 1.0, 0.0, 0.0]),
        torch.tensor([1.0, 1.0, 0, 0]),
    ]
    out = aggregate("flag", ups, m=3, scale="none")
    assert torch.equal(out[2:], torch.zeros(2))
    # with m >= rank the subspace is the whole span: g_FA = sum of unit directions / m
    expect = sum(u / u.norm() for u in ups) / 3
    assert isinstance(expect, torch.Tensor)
    assert torch.allclose(out, expect, atol=1e-6)


def test_zero_inputs() -> None:
    z = torch.zeros(5)
    assert torch.equal(aggregate("flag", [z, z, z]), z)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = aggregate("flag", [g, g, z], m=1)  # zero update: no direction, counts in p and median norm
    assert torch.allclose(out, g * (2 / 3), atol=1e-6)


def test_median_norm_restoration_resists_a_scaled_attacker() -> None:
    ups = _random_updates(8, 200, seed=2)
    honest_max = max(float(u.norm()) for u in ups)
    attack = [1e6 * ups[0] for _ in range(3)]
    out = aggregate("flag", ups + attack, f=3)
    assert float(out.norm()) <= honest_max


def test_parameters_and_defaults() -> None:
    assert [default_m(p) for p in (1, 2, 7, 10, 15, 30, 60)] == [1, 1, 4, 5, 8, 16, 32]
    ups = _random_updates(4, 10, seed=0)
    with pytest.raises(AggregationError, match="m must be"):
        aggregate("flag", ups, m=0)
    with pytest.raises(AggregationError, match="lam must be"):
        aggregate("flag", ups, lam=-1.0)
    with pytest.raises(AggregationError, match="scale must be one of"):
        aggregate("flag", ups, scale="mean")
    with pytest.raises(AggregationError, match="iterations"):
        aggregate("flag", ups, iterations=-1)
    # iterations=0 is the plain flag mean
    flag_mean = aggregate("flag", ups, iterations=0, m=2, scale="none")
    assert torch.allclose(flag_mean, reference_flag(ups, 2, iterations=0), atol=1e-9)
