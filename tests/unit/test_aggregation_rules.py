"""Contract tests over every registered aggregation rule, plus known answers of the baselines."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from p2pnode.aggregation import (
    aggregate,
    aggregate_states,
    available_rules,
    max_byzantine,
    rule_info,
)
from p2pnode.aggregation import inputs as agg_inputs
from p2pnode.aggregation import robust as agg_robust
from p2pnode.aggregation.sorting import apply_network, selection_network, sorting_network
from p2pnode.errors import AggregationError

RULES = available_rules()
EXPECTED_RULES = {
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multikrum",
    "geomed",
    "centered_clip",
    "flag",
    "vca",
}


def _inputs(p: int = 7, d: int = 64, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen, dtype=torch.float64)
    return [(base + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)).to(dtype) for _ in range(p)]


def test_registry_lists_every_rule() -> None:
    assert set(RULES) == EXPECTED_RULES
    assert RULES == sorted(RULES)
    for name in RULES:
        info = rule_info(name)
        assert info.name == name and info.source and info.guarantee


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_device_preserved(rule: str, dtype: torch.dtype) -> None:
    xs = _inputs(dtype=dtype)
    out = aggregate(rule, xs)
    assert out.dtype == dtype and out.device == xs[0].device and out.shape == xs[0].shape
    # the same rule on the exact same values in float64: only arithmetic rounding differs
    ref = aggregate(rule, [x.double() for x in xs])
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("rule", RULES)
def test_inputs_are_not_modified(rule: str) -> None:
    xs = _inputs()
    copies = [x.clone() for x in xs]
    aggregate(rule, xs)
    assert all(torch.equal(a, b) for a, b in zip(xs, copies, strict=True))


@pytest.mark.parametrize("rule", RULES)
def test_permutation_invariance(rule: str) -> None:
    xs = _inputs(p=8, seed=3)
    out = aggregate(rule, xs)
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    out_perm = aggregate(rule, [xs[i] for i in perm])
    assert torch.allclose(out, out_perm, rtol=1e-9, atol=1e-9)


def test_vca_with_self_is_invariant_to_the_order_of_received() -> None:
    xs = _inputs(p=6, seed=4)
    a = aggregate("vca", xs, self_index=0)
    b = aggregate("vca", [xs[0], *reversed(xs[1:])], self_index=0)
    assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_identical_inputs_give_the_input(rule: str) -> None:
    x = _inputs(p=1, seed=5)[0]
    out = aggregate(rule, [x.clone() for _ in range(7)])
    assert torch.allclose(out, x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", RULES)
def test_single_input_when_the_rule_allows_it(rule: str) -> None:
    x = _inputs(p=1)[0]
    if max_byzantine(rule, 1) < 0:
        with pytest.raises(AggregationError, match="too few"):
            aggregate(rule, [x])
    else:
        assert torch.allclose(aggregate(rule, [x]), x, atol=1e-12)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("rule", RULES)
def test_bad_inputs_raise_clear_errors(rule: str) -> None:
    xs = _inputs()
    with pytest.raises(AggregationError, match="no updates"):
        aggregate(rule, [])
    with pytest.raises(AggregationError, match="same length"):
        aggregate(rule, [xs[0], xs[1][:-1]])
    with pytest.raises(AggregationError, match="1-D"):
        aggregate(rule, [x.reshape(8, 8) for x in xs])
    with pytest.raises(AggregationError, match="dtype"):
        aggregate(rule, [x.to(torch.int64) for x in xs])
    with pytest.raises(AggregationError, match="share one dtype"):
        aggregate(rule, [xs[0], xs[1].float()])
    with pytest.raises(AggregationError, match="length 0"):
        aggregate(rule, [torch.zeros(0), torch.zeros(0)])
    with pytest.raises(AggregationError, match="sequence"):
        aggregate(rule, torch.stack(xs))  # type: ignore[arg-type]
    with pytest.raises(AggregationError, match="unknown parameter"):
        aggregate(rule, xs, bogus=1)
    with pytest.raises(AggregationError, match="tolerates at most"):
        aggregate(rule, xs, f=4)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 3, 6])
def test_non_finite_inputs_are_refused(rule: str, bad: float, where: int) -> None:
    xs = _inputs()
    xs[where] = xs[where].clone()
    xs[where][17] = bad  # a single coordinate: a median would hide it
    with pytest.raises(AggregationError, match=f"update {where} contains NaN or Inf"):
        aggregate(rule, xs)


@pytest.mark.parametrize("rule", RULES)
def test_non_finite_states_are_named_as_states(rule: str) -> None:
    states = [{"w": x.view(-1, 1).clone()} for x in _inputs()]
    states[3]["w"][17, 0] = float("nan")
    with pytest.raises(AggregationError, match="state 3 contains NaN or Inf"):
        aggregate_states(rule, states)


def test_non_finite_input_with_zero_weight_is_refused() -> None:
    xs = _inputs()
    xs[2] = xs[2].clone()
    xs[2][0] = float("nan")
    with pytest.raises(AggregationError, match="update 2"):
        aggregate("mean", xs, weights=[1, 1, 0, 1, 1, 1, 1])


def test_unknown_rule_lists_the_available_ones() -> None:
    with pytest.raises(AggregationError, match="available: centered_clip, flag"):
        aggregate("avg", _inputs())
    with pytest.raises(ValueError):
        rule_info("nope")


def test_weight_errors() -> None:
    xs = _inputs(p=3)
    with pytest.raises(AggregationError, match="3 inputs"):
        aggregate("mean", xs, weights=[1, 2])
    with pytest.raises(AggregationError, match=">= 0"):
        aggregate("mean", xs, weights=[1, -1, 1])
    with pytest.raises(AggregationError, match="sum to 0"):
        aggregate("mean", xs, weights=[0, 0, 0])
    with pytest.raises(AggregationError, match="finite"):
        aggregate("mean", xs, weights=[1, float("nan"), 1])
    with pytest.raises(AggregationError, match="does not take per-input weights"):
        aggregate("median", xs, weights=[1, 2, 3])
    # equal weights are fine for every rule
    assert torch.equal(aggregate("median", xs, weights=[2, 2, 2]), aggregate("median", xs))


def test_guarantees_per_rule() -> None:
    assert max_byzantine("mean", 15) == 0 and max_byzantine("vca", 15) == 0
    for rule in ("median", "geomed", "centered_clip", "flag", "trimmed_mean"):
        assert max_byzantine(rule, 15) == 7 and max_byzantine(rule, 16) == 7
    assert max_byzantine("krum", 15) == 6 and max_byzantine("multikrum", 9) == 3
    assert max_byzantine("trimmed_mean", 15, trim=3) == 3
    xs = _inputs(p=9)
    aggregate("krum", xs, f=3)
    with pytest.raises(AggregationError, match=r"p >= 2f \+ 3.*got f=4.*median"):
        aggregate("krum", xs, f=4)
    with pytest.raises(AggregationError, match="too few even for f = 0"):
        aggregate("krum", xs[:2])
    with pytest.raises(AggregationError, match="f <= trim"):
        aggregate("trimmed_mean", xs, trim=1, f=2)
    with pytest.raises(AggregationError, match="2 \\* trim < p"):
        aggregate("trimmed_mean", xs, trim=5)
    with pytest.raises(AggregationError, match="mean tolerates at most 0"):
        aggregate("mean", xs, f=1)
    with pytest.raises(AggregationError, match="integer"):
        aggregate("median", xs, f=1.5)


# ---------------------------------------------------------------- known answers


def test_mean_weighted_known_answer() -> None:
    xs = [torch.tensor([0.0, 1.0]), torch.tensor([3.0, 1.0])]
    assert torch.allclose(aggregate("mean", xs, weights=[10, 20]), torch.tensor([2.0, 1.0]))


def test_median_and_trimmed_mean_match_sorting() -> None:
    for p in (1, 2, 5, 6, 15, 16):
        xs = _inputs(p=p, seed=p)
        stacked = torch.stack(xs)
        s = stacked.sort(dim=0).values
        med = s[p // 2] if p % 2 else 0.5 * (s[p // 2 - 1] + s[p // 2])
        assert torch.allclose(aggregate("median", xs), med, atol=1e-12)
        for t in range(0, (p - 1) // 2 + 1):
            expect = s[t : p - t].mean(dim=0)
            assert torch.allclose(aggregate("trimmed_mean", xs, trim=t), expect, atol=1e-12)


def test_krum_known_answer() -> None:
    # four close points and one far: Krum picks the most central of the close ones
    pts = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.4, 0.4], [50.0, 50.0]]
    xs = [torch.tensor(v) for v in pts]
    assert torch.equal(aggregate("krum", xs, f=1), torch.tensor([0.4, 0.4]))
    # Multi-Krum with m = p - f = 4 averages the four close points
    assert torch.allclose(aggregate("multikrum", xs, f=1), torch.tensor([0.35, 0.35]))
    assert torch.allclose(aggregate("multikrum", xs, f=1, m=2), torch.tensor([0.2, 0.2]))
    with pytest.raises(AggregationError, match="m must be"):
        aggregate("multikrum", xs, f=1, m=5)


def test_geomed_known_answer() -> None:
    # the geometric median of the vertices of an equilateral triangle is its centre
    xs = [torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([1.0, math.sqrt(3.0)])]
    out = aggregate("geomed", xs)
    assert torch.allclose(out, torch.tensor([1.0, 1.0 / math.sqrt(3.0)]), atol=1e-5)
    # collinear points: the median point; an outlier does not drag it
    ys = [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1000.0])]
    assert abs(float(aggregate("geomed", ys, f=1)) - 1.5) < 0.51


def test_centered_clip_known_answer() -> None:
    xs = [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([100.0])]
    # medoid is 1 (or 2); tau = median distance = 1; an outlier moves the centre by at most tau/p per step
    out = float(aggregate("centered_clip", xs, f=1, iterations=1))
    assert 1.0 <= out <= 2.0
    # from an explicit centre with a huge tau it is one plain mean step
    out2 = aggregate("centered_clip", xs, f=1, tau=1e9, iterations=1, center=torch.tensor([0.0]))
    assert torch.allclose(out2, torch.tensor([25.75]))
    with pytest.raises(AggregationError, match="tau must be > 0"):
        aggregate("centered_clip", xs, tau=0.0)
    with pytest.raises(AggregationError, match="center"):
        aggregate("centered_clip", xs, center=torch.zeros(3))


# ---------------------------------------------------------------- state dicts


def _state(seed: int) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("conv.weight", torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)),
            ("conv.bias", torch.randn(4, generator=gen, dtype=torch.float64)),
            ("bn.weight", 1 + 0.1 * torch.randn(4, generator=gen, dtype=torch.float64)),
            ("bn.running_mean", torch.randn(4, generator=gen, dtype=torch.float64)),
            ("bn.num_batches_tracked", torch.tensor(seed * 10, dtype=torch.int64)),
            ("fc.weight", torch.randn(5, 36, generator=gen, dtype=torch.float64)),
        ]
    )


@pytest.mark.parametrize("rule", [r for r in RULES if r != "vca"])
def test_states_equal_the_flat_form(rule: str) -> None:
    states = [_state(s) for s in range(7)]
    out = aggregate_states(rule, states)
    assert list(out) == list(states[0])
    float_keys = [k for k, v in states[0].items() if v.dtype.is_floating_point]
    flat = aggregate(rule, [torch.cat([s[k].reshape(-1) for k in float_keys]) for s in states])
    got = torch.cat([out[k].reshape(-1) for k in float_keys])
    assert torch.allclose(got, flat, atol=1e-10)
    for k, v in states[0].items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
    # integer counters: element-wise lower median of (0, 10, ..., 60)
    assert int(out["bn.num_batches_tracked"]) == 30


def test_state_errors() -> None:
    a, b = _state(0), _state(1)
    with pytest.raises(AggregationError, match="keys"):
        aggregate_states("mean", [a, {k: v for k, v in b.items() if k != "fc.weight"}])
    b["fc.weight"] = b["fc.weight"][:, :-1]
    with pytest.raises(AggregationError, match="shape"):
        aggregate_states("mean", [a, b])
    with pytest.raises(AggregationError, match="no states"):
        aggregate_states("mean", [])
    with pytest.raises(AggregationError, match="empty"):
        aggregate_states("mean", [{}, {}])
    c = _state(2)
    c["conv.bias"] = c["conv.bias"].float()
    with pytest.raises(AggregationError, match="dtype"):
        aggregate_states("mean", [a, c])


@pytest.mark.parametrize("rule", RULES)
def test_small_chunks_give_the_same_result(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces straddling chunk boundaries, many chunks: the chunked passes must not change results."""
    states = [_state(s) for s in range(7)]
    big = aggregate_states(rule, states)
    monkeypatch.setattr(agg_inputs, "CPU_SCRATCH_BYTES", 8 * 7 * 5)
    monkeypatch.setattr(agg_inputs, "CPU_ACCUMULATE_CHUNK", 7)
    monkeypatch.setattr(agg_robust, "SORT_CHUNK", 11)
    small = aggregate_states(rule, states)
    for k in big:
        assert torch.allclose(big[k].double(), small[k].double(), atol=1e-9), k


# ---------------------------------------------------------------- sorting networks


def test_sorting_networks_sort_every_zero_one_input() -> None:
    # 0-1 principle: a comparator network sorts all inputs iff it sorts all 0/1 inputs
    for n in range(1, 13):
        cols = torch.tensor([[(c >> i) & 1 for c in range(2**n)] for i in range(n)], dtype=torch.float32)
        rows = cols.clone()
        apply_network(rows, sorting_network(n))
        assert torch.equal(rows, cols.sort(dim=0).values), n
    for n in (15, 16, 17, 31, 40):
        x = torch.randn(n, 500)
        y = x.clone()
        apply_network(y, sorting_network(n))
        assert torch.equal(y, x.sort(dim=0).values)
        mid = x.clone()
        apply_network(mid, selection_network(n, (n // 2,)))
        assert torch.equal(mid[n // 2], x.sort(dim=0).values[n // 2])


@pytest.mark.parametrize("rule", RULES)
def test_parameters_that_require_grad(rule: str) -> None:
    xs = [torch.nn.Parameter(x) for x in _inputs()]
    out = aggregate(rule, xs)
    assert not out.requires_grad
    assert torch.allclose(out, aggregate(rule, [x.detach() for x in xs]))
