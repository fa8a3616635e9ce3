"""Secure aggregation composed with the aggregation rules: weighted mean, VCA through appended per-layer
variances (checked against `p2pnode.aggregation`'s vca), the outer optimizer, and the refusal of rules
that need individual updates."""

from __future__ import annotations

import pytest
import torch

from p2pnode.aggregation import OuterOptimizer, aggregate, aggregate_states, available_rules
from p2pnode.errors import ConfigError
from p2pnode.secagg import (
    SecAggSettings,
    check_rule_compatible,
    layer_variances,
    run_instance,
    split_layers,
    variance_correct,
)
from p2pnode.secagg.quantize import FixedPoint
from p2pnode.transport.clock import run_virtual

SHAPES = [(6, 5), (5,), (3, 6)]


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(s, generator=g) * (0.3 + 0.2 * seed) for i, s in enumerate(SHAPES)}


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in state.values()])


def test_vca_from_appended_variances_matches_the_plain_rule() -> None:
    states = [model(i) for i in range(5)]
    extras = [layer_variances(list(s.values())) for s in states]
    settings = SecAggSettings(threshold=4, extra_range=(0.0, 4.0))  # these layers' variances exceed 1
    out = run_virtual(run_instance([flat(s) for s in states], settings, extras=extras, drop={"masked": [2]}))
    assert out.result is not None
    kept = [s for i, s in enumerate(states) if i != 2]
    layers = split_layers(out.result.mean(), SHAPES)
    got = variance_correct(layers, out.result.extras_mean(), corrected=[len(s) >= 2 for s in SHAPES])
    ref = aggregate_states("vca", kept)  # the mean of the survivors, rescaled to their mean variance
    for g, (name, r) in zip(got, ref.items(), strict=True):
        assert torch.allclose(g.float(), r, atol=1e-4), name
    target = torch.stack([layer_variances(list(s.values())) for s in kept]).mean(0)
    assert torch.allclose(out.result.extras_mean(), target, atol=1e-5)


def test_weighted_mean_matches_the_mean_rule() -> None:
    xs = [flat(model(i)) for i in range(4)]
    w = [10.0, 20.0, 30.0, 40.0]
    out = run_virtual(run_instance(xs, SecAggSettings(threshold=3, max_weight=40.0), weights=w))
    assert out.result is not None
    ref = aggregate("mean", xs, weights=w)
    assert torch.allclose(out.result.mean().float(), ref, atol=4 * FixedPoint(dim=1).step)


def test_outer_optimizer_runs_on_the_secure_mean_of_pseudo_gradients() -> None:
    theta = torch.ones(8)
    workers = [theta - 0.1 * (i + 1) for i in range(3)]  # models after local training
    deltas = [theta - w for w in workers]
    out = run_virtual(run_instance(deltas, SecAggSettings(threshold=2)))
    assert out.result is not None
    secure = OuterOptimizer(lr=0.7, momentum=0.9).step(theta, out.result.mean().float())
    plain = OuterOptimizer(lr=0.7, momentum=0.9).step(theta, torch.stack(deltas).mean(0))
    assert torch.allclose(secure, plain, atol=1e-5)
    fedavg = OuterOptimizer(lr=1.0, momentum=0.0).step(theta, out.result.mean().float())
    assert torch.allclose(fedavg, torch.stack(workers).mean(0), atol=1e-5)  # lr 1, no momentum: FedAvg


def test_rules_that_need_updates_are_refused_inside_a_sample() -> None:
    check_rule_compatible("mean")
    check_rule_compatible("vca")
    for rule in available_rules():
        if rule in ("mean", "vca"):
            continue
        with pytest.raises(ConfigError, match="needs each update in the clear"):
            check_rule_compatible(rule)
        check_rule_compatible(rule, across_samples=True)  # robust across samples is fine
    with pytest.raises(ConfigError, match="unknown aggregation rule"):
        check_rule_compatible("mode")


def test_variance_correct_known_answer() -> None:
    # algorithms.md 2.4: the mean [1, 0, 0, -1] of two layers of variance 1 becomes [sqrt 2, 0, 0, -sqrt 2].
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    b = torch.tensor([1.0, 1.0, -1.0, -1.0])
    target = (layer_variances([a]) + layer_variances([b])) / 2
    out = variance_correct([(a + b) / 2], target)[0]
    assert torch.allclose(out, torch.tensor([2**0.5, 0.0, 0.0, -(2**0.5)]))
