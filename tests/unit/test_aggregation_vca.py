"""VCA: the worked example and invariants of algorithms.md 2.4, and the documented per-entry rules."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from p2pnode.aggregation import aggregate, aggregate_states
from p2pnode.errors import AggregationError

A = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
B = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
R2 = math.sqrt(2.0)


def test_worked_example_paper_variant() -> None:
    out = aggregate("vca", [A, B])
    assert torch.allclose(out, torch.tensor([R2, 0.0, 0.0, -R2], dtype=torch.float64), atol=1e-12)
    assert math.isclose(float(out.var(correction=0)), 1.0, rel_tol=1e-12)
    assert abs(float(out.mean())) < 1e-12


def test_worked_example_torch_port_variant() -> None:
    out = aggregate("vca", [A, B], unbiased=True, eps=1e-4)
    s = float(out[0])
    assert math.isclose(s, 1.41416, abs_tol=5e-6)
    assert math.isclose(s, math.sqrt((4 / 3 + 1e-4) / (2 / 3 + 1e-4)), rel_tol=1e-12)


def test_worked_example_conservative_with_self() -> None:
    # self = A, received = {B}, c = 0.5: O = 0.5 A + 0.5 B, target Var(B) = 1
    out = aggregate("vca", [A, B], self_index=0)
    assert torch.allclose(out, torch.tensor([R2, 0.0, 0.0, -R2], dtype=torch.float64), atol=1e-12)
    # the target comes from the received model only: scale self up, the result does not change
    assert torch.allclose(aggregate("vca", [3 * A, B], self_index=0).var(correction=0), torch.tensor(1.0).double())


def _xavier_state(seed: int) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def xavier(fan_out: int, fan_in: int, *rest: int) -> torch.Tensor:
        rf = math.prod(rest) if rest else 1
        bound = math.sqrt(6.0 / ((fan_in + fan_out) * rf))
        return (torch.rand(fan_out, fan_in, *rest, generator=gen, dtype=torch.float64) * 2 - 1) * bound

    return OrderedDict(
        [
            ("conv.weight", xavier(16, 3, 5, 5)),
            ("conv.bias", 0.1 * torch.randn(16, generator=gen, dtype=torch.float64)),
            ("bn.weight", 1 + 0.1 * torch.randn(16, generator=gen, dtype=torch.float64)),
            ("bn.bias", 0.1 * torch.randn(16, generator=gen, dtype=torch.float64)),
            ("bn.running_mean", torch.randn(16, generator=gen, dtype=torch.float64)),
            ("bn.running_var", torch.rand(16, generator=gen, dtype=torch.float64) + 0.5),
            ("bn.num_batches_tracked", torch.tensor(100 + seed, dtype=torch.int64)),
            ("fc1.weight", xavier(120, 400)),
            ("fc1.bias", torch.zeros(120, dtype=torch.float64)),
            ("fc2.weight", xavier(10, 120)),
            ("scalar", torch.tensor([0.5 + seed], dtype=torch.float64)),
        ]
    )


MATRICES = ("conv.weight", "fc1.weight", "fc2.weight")


def test_each_corrected_layer_has_the_target_variance_and_its_mean() -> None:
    states = [_xavier_state(s) for s in range(8)]
    out = aggregate_states("vca", states)
    for k in MATRICES:
        target = sum(float(s[k].var(correction=0)) for s in states) / len(states)
        plain = torch.stack([s[k] for s in states]).mean(dim=0)
        assert math.isclose(float(out[k].var(correction=0)), target, rel_tol=1e-10), k
        assert math.isclose(float(out[k].mean()), float(plain.mean()), rel_tol=1e-9, abs_tol=1e-12), k


def test_averaging_iid_xavier_shrinks_variance_and_vc_restores_it() -> None:
    n = 8
    states = [_xavier_state(s) for s in range(n)]
    plain = aggregate_states("mean", states)
    fixed = aggregate_states("vca", states)
    for k in MATRICES:
        fan_out, fan_in = states[0][k].shape[:2]
        rf = math.prod(states[0][k].shape[2:])
        glorot = 2.0 / ((fan_in + fan_out) * rf)
        assert abs(float(plain[k].var()) * n / glorot - 1) < 0.1  # the vanishing variance: about 1/N
        assert abs(float(fixed[k].var()) / glorot - 1) < 0.1


def test_identical_inputs_are_left_unchanged() -> None:
    s = _xavier_state(0)
    out = aggregate_states("vca", [s, s, s], correct="all")
    for k, v in s.items():
        assert torch.allclose(out[k].double(), v.double(), atol=1e-12), k


def test_biases_and_norm_layers_per_documented_rule() -> None:
    states = [_xavier_state(s) for s in range(4)]
    plain = aggregate_states("mean", states)
    out = aggregate_states("vca", states)  # correct="matrices"
    for k in ("conv.bias", "bn.weight", "bn.bias", "scalar", "bn.running_mean", "bn.running_var"):
        assert torch.allclose(out[k], plain[k], atol=1e-12), k
    out_all = aggregate_states("vca", states, correct="all")
    for k in ("conv.bias", "bn.weight", "bn.bias"):
        target = sum(float(s[k].var(correction=0)) for s in states) / len(states)
        assert math.isclose(float(out_all[k].var(correction=0)), target, rel_tol=1e-9), k
    # never rescaled: running statistics, one-element entries, zero-variance tensors (fc1.bias is all 0)
    for k in ("bn.running_mean", "bn.running_var", "scalar", "fc1.bias"):
        assert torch.allclose(out_all[k], plain[k], atol=1e-12), k
    assert int(out["bn.num_batches_tracked"]) == 101  # lower median of 100..103


def test_gossip_merge_with_self() -> None:
    states = [_xavier_state(s) for s in range(5)]
    own, received = states[0], states[1:]
    out = aggregate_states("vca", states, self_index=0)
    for k in MATRICES:
        mix = 0.5 * own[k] + 0.5 * torch.stack([r[k] for r in received]).mean(dim=0)
        target = sum(float(r[k].var(correction=0)) for r in received) / len(received)
        assert math.isclose(float(out[k].var(correction=0)), target, rel_tol=1e-10)
        assert math.isclose(float(out[k].mean()), float(mix.mean()), rel_tol=1e-9, abs_tol=1e-12)
        # the correction is a rescaling around the mean: out - mean is parallel to mix - mean
        a, b = out[k] - out[k].mean(), mix - mix.mean()
        assert torch.allclose(a / (a.norm()), b / b.norm(), atol=1e-9)
    # batch-norm statistics and counters stay the node's own
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(out[k], own[k]), k
    # plain standard averaging of received only: self_weight = 0
    out0 = aggregate_states("vca", states, self_index=0, self_weight=0.0)
    no_self = aggregate_states("vca", received)
    for k in MATRICES:
        assert torch.allclose(out0[k], no_self[k], atol=1e-12)


def test_target_modes_and_partial_strength() -> None:
    own, other = 2 * A, B
    # FollowSelf: the target is Var(self) = 4
    out = aggregate("vca", [own, other], self_index=0, target="self")
    assert math.isclose(float(out.var(correction=0)), 4.0, rel_tol=1e-12)
    # FollowConservative: 0.5 * 4 + 0.5 * 1
    out = aggregate("vca", [own, other], self_index=0, target="mixed")
    assert math.isclose(float(out.var(correction=0)), 2.5, rel_tol=1e-12)
    # strength 0 is the plain average, 0.5 goes half way in scale
    plain = aggregate("vca", [A, B], strength=0.0)
    assert torch.allclose(plain, (A + B) / 2)
    half = aggregate("vca", [A, B], strength=0.5)
    assert math.isclose(float(half[0]), 1 + 0.5 * (R2 - 1), rel_tol=1e-12)
    with pytest.raises(AggregationError, match="needs self_index"):
        aggregate("vca", [A, B], target="self")


def test_weights_apply_to_received_models() -> None:
    out = aggregate("vca", [A, B, B], weights=[1.0, 1.0, 2.0], self_index=0)
    mix = 0.5 * A + 0.5 * B  # received are B and B
    assert math.isclose(float(out.mean()), float(mix.mean()), abs_tol=1e-12)
    with pytest.raises(AggregationError, match="sum to 0"):
        aggregate("vca", [A, B], weights=[1.0, 0.0], self_index=0)


def test_errors() -> None:
    with pytest.raises(AggregationError, match="no received model"):
        aggregate("vca", [A], self_index=0)
    with pytest.raises(AggregationError, match="self_index"):
        aggregate("vca", [A, B], self_index=2)
    with pytest.raises(AggregationError, match="correct must be one of"):
        aggregate("vca", [A, B], correct="weights")
    with pytest.raises(AggregationError, match="self_weight"):
        aggregate("vca", [A, B], self_index=0, self_weight=1.5)
    with pytest.raises(AggregationError, match="tolerates at most 0"):
        aggregate("vca", [A, B], f=1)
    bad = A.clone()
    bad[1] = float("nan")
    with pytest.raises(AggregationError, match="update 0 contains NaN"):
        aggregate("vca", [bad, B], self_index=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_states(dtype: torch.dtype) -> None:
    states = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _xavier_state(s).items()} for s in range(4)]
    out = aggregate_states("vca", states, self_index=1)
    for k, v in out.items():
        assert v.dtype == states[0][k].dtype and v.shape == states[0][k].shape
    target = sum(float(s["fc1.weight"].float().var(correction=0)) for i, s in enumerate(states) if i != 1) / 3
    assert math.isclose(float(out["fc1.weight"].float().var(correction=0)), target, rel_tol=2e-2)


def test_float16_rescale_overflow_raises_like_mean() -> None:
    # Finite inputs whose corrected output passes float16's range (65504): sqrt(2) * 6e4 ~ 8.5e4.
    a, b = (A * 6e4).to(torch.float16), (B * 6e4).to(torch.float16)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    with pytest.raises(AggregationError, match="overflowed the input dtype"):
        aggregate("vca", [a, b])
    assert torch.isfinite(aggregate("vca", [a.double(), b.double()])).all()
