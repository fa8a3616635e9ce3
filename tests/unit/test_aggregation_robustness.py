"""Robustness properties: every robust rule stays within its documented bound under every attack.

With ``h`` the mean of the ``n_h`` honest inputs and ``R = max_i |h_i - h|`` their spread, each rule's
output ``z`` must satisfy ``|z - h| <= C * R`` for the constant documented in docs/aggregation.md, for any
attack with ``f`` at most the rule's limit. The plain mean has no such bound. FA is bounded differently
(it returns a direction scaled by the median norm): ``|z - h| <= |h| + max_i |h_i|``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode.aggregation import aggregate, max_byzantine
from p2pnode.attacks import attack_info, available_attacks, forge

settings.register_profile(
    "p2pnode-aggregation",
    deadline=None,
    max_examples=30,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile("p2pnode-aggregation")

ROBUST = ["median", "trimmed_mean", "krum", "multikrum", "geomed", "centered_clip", "flag"]
MODEL_ATTACKS = [a for a in available_attacks() if attack_info(a).kind == "model"]
# each attack at its default strength and at a much larger one
ATTACK_PARAMS: dict[str, list[dict[str, float]]] = {
    "sign_flip": [{}, {"scale": 1e3}],
    "gaussian": [{}, {"std": 1e5}],
    "scaled": [{}, {"factor": 1e6}],
    "alie": [{}, {"z": 3.0}],
    "ipm": [{}, {"epsilon": 100.0}],
    "random": [{}, {"low": -1e4, "high": 1e4}],
}


def bound_constant(rule: str, n_h: int, f: int, iterations: int = 3) -> float:
    """The documented C in |z - h| <= C R (see the rules' docstrings and docs/aggregation.md)."""
    p = n_h + f
    if rule in ("median", "trimmed_mean"):
        return math.sqrt(n_h)
    if rule in ("krum", "multikrum"):
        return 1 + 2 * math.sqrt(p - f - 2)
    if rule == "geomed":
        return 2 * n_h / (n_h - f)
    if rule == "centered_clip":
        c0 = (3 * n_h + f) / (n_h - f)
        return c0 + iterations * (c0 + 1)
    raise ValueError(rule)


def largest_f(rule: str, n_h: int) -> int:
    return max(f for f in range(n_h + 1) if max_byzantine(rule, n_h + f) >= f)


@st.composite
def scenarios(draw: st.DrawFn, rule: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int]:
    n_h = draw(st.integers(min_value=3, max_value=10))
    f = draw(st.integers(min_value=0, max_value=largest_f(rule, n_h)))
    d = draw(st.integers(min_value=1, max_value=24))
    centre = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0]))
    spread = draw(st.sampled_from([1e-3, 0.1, 1.0, 5.0]))
    attack = draw(st.sampled_from(MODEL_ATTACKS))
    params = draw(st.sampled_from(ATTACK_PARAMS[attack]))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    gen = torch.Generator().manual_seed(seed)
    mu = centre * torch.randn(d, generator=gen, dtype=torch.float64)
    honest = [mu + spread * torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(n_h)]
    byz = forge(attack, honest, f, seed=seed, **params)
    inputs = honest + byz
    order = torch.randperm(len(inputs), generator=gen).tolist()
    return honest, byz, [inputs[i] for i in order], f


def _spread(honest: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    h = torch.stack(honest).mean(dim=0)
    return h, max(float((x - h).norm()) for x in honest)


@pytest.mark.parametrize("rule", ROBUST)
@settings(PROFILE)
@given(data=st.data())
def test_robust_rules_stay_within_their_bound(rule: str, data: st.DataObject) -> None:
    honest, _byz, inputs, f = data.draw(scenarios(rule))
    out = aggregate(rule, inputs, f=f)
    h, radius = _spread(honest)
    err = float((out - h).norm())
    scale = max(float(x.norm()) for x in inputs)
    if rule == "flag":
        limit = float(h.norm()) + max(float(x.norm()) for x in honest)
    else:
        slack = 1e-6 if rule == "geomed" else 1e-9  # Weiszfeld stops at a relative tolerance
        limit = bound_constant(rule, len(honest), f) * radius * (1 + slack) + 1e-10 * scale
    assert err <= limit, (rule, err, limit, f)


@settings(PROFILE)
@given(data=st.data())
def test_the_mean_is_not_bounded(data: st.DataObject) -> None:
    n_h = data.draw(st.integers(min_value=3, max_value=10))
    f = data.draw(st.integers(min_value=1, max_value=n_h - 1))
    d = data.draw(st.integers(min_value=1, max_value=24))
    seed = data.draw(st.integers(min_value=0, max_value=2**16))
    gen = torch.Generator().manual_seed(seed)
    mu = 1.0 + torch.rand(d, generator=gen, dtype=torch.float64)  # a non-zero honest mean
    honest = [mu + torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(n_h)]
    h, radius = _spread(honest)
    worst = max(bound_constant(r, n_h, f) for r in ROBUST if r != "flag" and max_byzantine(r, n_h + f) >= f)
    # the mean moves by f (factor - 1) / p * |h|: choose the factor that puts it 10 bounds away
    factor = 1 + 10 * worst * radius * (n_h + f) / (f * float(h.norm())) + 1
    out = aggregate("mean", honest + forge("scaled", honest, f, factor=factor))
    assert float((out - h).norm()) > 10 * worst * radius
    # the same attack leaves every robust rule with enough tolerance inside its bound
    for rule in ROBUST[:-1]:
        if max_byzantine(rule, n_h + f) >= f:
            z = aggregate(rule, honest + forge("scaled", honest, f, factor=factor), f=f)
            assert float((z - h).norm()) <= bound_constant(rule, n_h, f) * radius * (1 + 1e-6) + 1e-9
