"""Attack library: known answers, shapes, determinism and errors."""

from __future__ import annotations

import math

import pytest
import torch

from p2pnode.attacks import alie_z, attack_info, available_attacks, flip_labels, forge
from p2pnode.errors import AggregationError

MODEL_ATTACKS = [a for a in available_attacks() if attack_info(a).kind == "model"]


def _honest(n: int = 6, d: int = 1000, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=gen, dtype=torch.float64)
    return [(base + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(n)]


def test_registry() -> None:
    assert set(available_attacks()) == {"sign_flip", "gaussian", "scaled", "alie", "ipm", "random", "label_flip"}
    assert attack_info("label_flip").kind == "data"
    for a in available_attacks():
        assert attack_info(a).source


@pytest.mark.parametrize("attack", MODEL_ATTACKS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_shapes_dtypes_counts(attack: str, dtype: torch.dtype) -> None:
    honest = _honest(dtype=dtype)
    out = forge(attack, honest, 3, seed=1)
    assert len(out) == 3
    for t in out:
        assert t.shape == honest[0].shape and t.dtype == dtype and t.device == honest[0].device
        assert bool(torch.isfinite(t).all())
    assert forge(attack, honest, 0) == []
    # new tensors: the caller may modify them without touching the others
    out[0].zero_()
    assert not bool((out[1] == 0).all())


def test_known_answers() -> None:
    honest = _honest()
    mu = torch.stack(honest).mean(dim=0)
    sd = torch.stack(honest).std(dim=0)
    assert torch.allclose(forge("sign_flip", honest, 1)[0], -mu)
    assert torch.allclose(forge("sign_flip", honest, 1, scale=10.0)[0], -10 * mu)
    assert torch.allclose(forge("scaled", honest, 1)[0], 100 * mu)
    assert torch.allclose(forge("ipm", honest, 1)[0], -0.1 * mu)
    assert torch.allclose(forge("ipm", honest, 1, epsilon=2.0)[0], -2 * mu)
    z = alie_z(len(honest) + 2, 2)
    assert torch.allclose(forge("alie", honest, 2)[0], mu - z * sd)
    assert torch.allclose(forge("alie", honest, 2, z=0.21)[0], mu - 0.21 * sd)


def test_alie_z_matches_the_paper() -> None:
    # n = 15, f = 3: s = floor(15/2 + 1) - 3 = 5, z = Phi^-1(10/15)
    assert math.isclose(alie_z(15, 3), 0.4307, abs_tol=1e-4)
    assert alie_z(15, 8) > 0  # s clamps at 1


def test_random_attacks_are_seeded_and_have_the_right_law() -> None:
    honest = _honest(d=20000)
    a = forge("gaussian", honest, 2, seed=5)
    b = forge("gaussian", honest, 2, seed=5)
    c = forge("gaussian", honest, 2, seed=6)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert abs(float(a[0].mean())) < 5.0 and abs(float(a[0].std()) / 200 - 1) < 0.03
    r = forge("random", honest, 1, seed=5)[0]
    assert float(r.min()) >= 0 and float(r.max()) < 1 and abs(float(r.mean()) - 0.5) < 0.01
    r2 = forge("random", honest, 1, seed=5, low=-2.0, high=-1.0)[0]
    assert float(r2.min()) >= -2 and float(r2.max()) < -1


def test_label_flip() -> None:
    labels = torch.tensor([0, 1, 2, 9, 5])
    assert torch.equal(flip_labels(labels, 10), torch.tensor([9, 8, 7, 0, 4]))
    assert torch.equal(flip_labels(flip_labels(labels, 10), 10), labels)
    with pytest.raises(AggregationError, match=r"data attack.*flip_labels"):
        forge("label_flip", _honest(), 1)
    with pytest.raises(AggregationError, match=r"in \[0, 3\)"):
        flip_labels(labels, 3)
    with pytest.raises(AggregationError, match="integer"):
        flip_labels(labels.float(), 10)
    with pytest.raises(AggregationError, match="num_classes"):
        flip_labels(labels, 0)


def test_errors() -> None:
    honest = _honest()
    with pytest.raises(AggregationError, match="unknown attack 'lie'; available: alie"):
        forge("lie", honest, 1)
    with pytest.raises(AggregationError, match=r"unknown parameter.*allowed: factor"):
        forge("scaled", honest, 1, scale=3.0)
    with pytest.raises(AggregationError, match="n_byzantine"):
        forge("scaled", honest, -1)
    with pytest.raises(AggregationError, match="non-empty"):
        forge("scaled", [], 1)
    with pytest.raises(AggregationError, match="must match"):
        forge("scaled", [honest[0], honest[1][:-1]], 1)
    bad = honest[0].clone()
    bad[3] = float("inf")
    with pytest.raises(AggregationError, match="NaN or Inf"):
        forge("scaled", [bad, honest[1]], 1)
    with pytest.raises(AggregationError, match="finite number"):
        forge("gaussian", honest, 1, std=float("nan"))
    with pytest.raises(AggregationError, match="high > low"):
        forge("random", honest, 1, low=1.0, high=1.0)
