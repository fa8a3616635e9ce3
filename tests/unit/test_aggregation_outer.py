"""DiLoCo-style outer optimizer (algorithms.md section 6)."""

from __future__ import annotations

import math

import pytest
import torch

from p2pnode.aggregation import WARMUP_OUTER, OuterOptimizer, aggregate, aggregate_states, warmup_outer_step
from p2pnode.config.choices import SYNC_WARMUP_OUTER
from p2pnode.errors import AggregationError


def test_nesterov_known_answer() -> None:
    theta = torch.tensor([1.0])
    workers = [torch.tensor([0.8]), torch.tensor([0.6])]
    delta = theta - aggregate("mean", workers)  # 0.3
    assert math.isclose(float(OuterOptimizer().step(theta, delta)), 0.601, rel_tol=1e-6)
    assert math.isclose(float(OuterOptimizer().step_towards(theta, aggregate("mean", workers))), 0.601, rel_tol=1e-6)


def test_lr_one_no_momentum_is_plain_replacement() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(100, generator=gen)
    workers = [theta + torch.randn(100, generator=gen) for _ in range(4)]
    fedavg = aggregate("mean", workers)
    outer = OuterOptimizer(lr=1.0, momentum=0.0)
    for _ in range(3):
        assert torch.equal(outer.step_towards(theta, fedavg), fedavg)
    # one worker, lr 1: identical to plain local training
    assert torch.equal(OuterOptimizer(lr=1.0, momentum=0.0).step_towards(theta, workers[0]), workers[0])
    assert torch.allclose(outer.step(theta, theta - fedavg), fedavg, atol=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_sgd_over_several_steps(nesterov: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(50, generator=gen, dtype=torch.float64)
    param = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=nesterov)
    outer = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=nesterov)
    for _ in range(5):
        new_model = theta + 0.1 * torch.randn(50, generator=gen, dtype=torch.float64)
        param.grad = (theta - new_model).clone()
        sgd.step()
        theta = outer.step_towards(theta, new_model)
        assert torch.allclose(theta, param.detach(), atol=1e-12)


def test_momentum_state_travels_as_tensors() -> None:
    gen = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen), "n": torch.tensor(7)}
    a = OuterOptimizer()
    targets = [
        {
            k: (v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 1)
            for k, v in state.items()
        }
        for _ in range(3)
    ]
    s1 = a.step_towards(state, targets[0])
    s2 = a.step_towards(s1, targets[1])
    exported = a.state_dict()
    assert set(exported) == {"steps", "momentum/w", "momentum/b"}
    assert all(isinstance(v, torch.Tensor) for v in exported.values())
    b = OuterOptimizer()
    b.load_state_dict(exported)
    assert b.steps == 2
    out_a = a.step_towards(s2, targets[2])
    out_b = b.step_towards(s2, targets[2])
    for k in out_a:
        assert torch.equal(out_a[k], out_b[k])
    assert int(out_a["n"]) == int(targets[2]["n"])  # non-float entries come from the aggregate


def test_feeds_on_any_rule_output() -> None:
    gen = torch.Generator().manual_seed(3)
    start = {"w": torch.randn(10, generator=gen)}
    received = [{"w": start["w"] + 0.1 * torch.randn(10, generator=gen)} for _ in range(5)]
    outer = OuterOptimizer()
    for rule in ("median", "krum", "flag"):
        updates = [{"w": r["w"] - start["w"]} for r in received]
        agg_update = aggregate_states(rule, updates)
        new = outer.step(start, {"w": -agg_update["w"]})
        assert new["w"].shape == (10,) and bool(torch.isfinite(new["w"]).all())


def test_errors() -> None:
    with pytest.raises(AggregationError, match="lr"):
        OuterOptimizer(lr=0.0)
    with pytest.raises(AggregationError, match="momentum"):
        OuterOptimizer(momentum=1.0)
    outer = OuterOptimizer()
    outer.step(torch.zeros(3), torch.ones(3))
    with pytest.raises(AggregationError, match="do not match the momentum buffers"):
        outer.step({"a": torch.zeros(3)}, {"a": torch.ones(3)})
    with pytest.raises(AggregationError, match="NaN or Inf"):
        OuterOptimizer().step(torch.zeros(2), torch.tensor([1.0, float("nan")]))
    with pytest.raises(AggregationError, match="shape"):
        OuterOptimizer().step(torch.zeros(2), torch.zeros(3))
    with pytest.raises(AggregationError, match="unexpected state entry"):
        OuterOptimizer().load_state_dict({"velocity": torch.zeros(2)})
    outer.reset()
    assert outer.state_dict() == {"steps": torch.tensor(0)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_params_keep_their_dtype(dtype: torch.dtype) -> None:
    outer = OuterOptimizer()
    theta = torch.ones(4, dtype=dtype)
    out = outer.step_towards(theta, torch.full((4,), 0.7, dtype=dtype))
    assert out.dtype == dtype
    assert torch.allclose(out.float(), torch.full((4,), 0.601), atol=1e-2)
    assert outer.state_dict()["momentum/_flat"].dtype == torch.float32


# -- the outer step in a synchronisation warm-up (sync_warmup_outer) -------------------------------------------

def _warm(policy: str, rounds: list[tuple[bool, bool]]) -> tuple[list[float], OuterOptimizer]:
    """Models after `rounds` (warm-up round?, first after it?) of `warmup_outer_step`: start 1.0 each round,
    merged 0.8 (pseudo-gradient 0.2), outer lr 1, Nesterov 0.5."""
    opt = OuterOptimizer(lr=1.0, momentum=0.5)
    out = []
    for warmup_round, first_after in rounds:
        new = warmup_outer_step(opt, {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.8])}, policy=policy,
                                warmup_round=warmup_round, first_after=first_after)
        out.append(round(float(new["w"]), 6))
    return out, opt


# Two warm-up rounds, the first round after the warm-up, one more.
ROUNDS = [(True, False), (True, False), (False, True), (False, False)]


def test_outer_steps_every_round_and_carries_the_momentum_over_the_switch() -> None:
    # Nesterov 0.5 on delta 0.2: buffers 0.2, 0.3, 0.35, 0.375; steps 0.3, 0.35, 0.375, 0.3875.
    got, opt = _warm("outer", ROUNDS)
    assert got == [0.7, 0.65, 0.625, 0.6125] and opt.steps == 4


def test_reset_forgets_the_warmup_momentum_at_the_first_round_after_it() -> None:
    got, opt = _warm("reset", ROUNDS)
    assert got == [0.7, 0.65, 0.7, 0.65] and opt.steps == 2


def test_sgd_and_plain_leave_the_momentum_to_the_rounds_after_the_warmup() -> None:
    # sgd: 1 - lr * 0.2 in the warm-up; plain: the merge itself (the same at lr 1); then a fresh momentum.
    for policy in ("sgd", "plain"):
        got, opt = _warm(policy, ROUNDS)
        assert got == [0.8, 0.8, 0.7, 0.65] and opt.steps == 2, policy
    opt = OuterOptimizer(lr=0.5, momentum=0.9)
    start, merged = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.8])}
    sgd = warmup_outer_step(opt, start, merged, policy="sgd", warmup_round=True, first_after=False)
    plain = warmup_outer_step(opt, start, merged, policy="plain", warmup_round=True, first_after=False)
    assert float(sgd["w"]) == pytest.approx(0.9) and float(plain["w"]) == pytest.approx(0.8)
    assert opt.steps == 0 and opt.state_dict().keys() == {"steps"}


def test_outside_a_warmup_every_policy_is_the_outer_step() -> None:
    for policy in WARMUP_OUTER:
        got, _ = _warm(policy, [(False, False)] * 3)
        assert got == [0.7, 0.65, 0.625], policy


def test_an_unknown_warmup_policy_is_refused_and_the_config_knows_the_same_ones() -> None:
    with pytest.raises(AggregationError, match="sync_warmup_outer must be one of outer, reset, sgd, plain"):
        _warm("nesterov", [(True, False)])
    assert WARMUP_OUTER == SYNC_WARMUP_OUTER
