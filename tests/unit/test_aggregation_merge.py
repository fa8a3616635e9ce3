"""merge_states: the merge step shared by gossip and MoDeST, checked on small known answers."""

from __future__ import annotations

import pytest
import torch

from p2pnode.aggregation import merge_states
from p2pnode.errors import AggregationError


def _state(w: list[float], b: float, steps: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "b": torch.tensor([b]), "n": torch.tensor(steps)}


def test_model_rule_combines_the_models_themselves() -> None:
    states = [_state([1.0, 2.0], 0.0), _state([3.0, 6.0], 2.0), _state([5.0, 1.0], 4.0)]
    merged = merge_states("mean", states, None)
    assert merged["w"].tolist() == [3.0, 3.0]
    assert merged["b"].tolist() == [2.0]
    merged = merge_states("median", states, _state([100.0, 100.0], 100.0))  # the base is not read
    assert merged["w"].tolist() == [3.0, 2.0]
    assert merged["b"].tolist() == [2.0]


def test_update_rule_works_on_updates_from_the_base_and_adds_them_back() -> None:
    base = _state([10.0, 10.0], 1.0, steps=4)
    # Updates +1, +2, +3, +4 and a far outlier +100 on every entry, all on one line: their geometric median is +3.
    states = [_state([10.0 + d, 10.0 + d], 1.0 + d, steps=4) for d in (1.0, 2.0, 3.0, 4.0, 100.0)]
    merged = merge_states("geomed", states, base)
    assert merged["w"].tolist() == pytest.approx([13.0, 13.0], abs=1e-2)
    assert merged["b"].item() == pytest.approx(4.0, abs=1e-2)
    assert merged["n"].item() == 4  # integer entries: base + lower median of zero updates
    assert list(merged) == ["w", "b", "n"]


def test_update_rule_equals_base_plus_rule_of_updates() -> None:
    torch.manual_seed(0)
    base = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(5)]
    merged = merge_states("krum", states, base, {"f": 1})
    # Krum picks one input: base + (that update) is that input itself.
    picked = [i for i, st in enumerate(states) if torch.allclose(merged["w"], st["w"], atol=1e-6)]
    assert len(picked) == 1
    assert torch.allclose(merged["b"], states[picked[0]]["b"], atol=1e-6)


def test_inputs_are_not_modified() -> None:
    base = _state([0.0, 0.0], 0.0)
    states = [_state([1.0, 1.0], 1.0), _state([2.0, 2.0], 2.0), _state([3.0, 3.0], 3.0)]
    before = [{k: v.clone() for k, v in st.items()} for st in states]
    merge_states("geomed", states, base)
    for st, old in zip(states, before, strict=True):
        assert all(torch.equal(st[k], old[k]) for k in st)
    assert base["w"].tolist() == [0.0, 0.0]


def test_too_few_inputs_for_the_required_f_raise() -> None:
    states = [_state([1.0, 1.0], 0.0), _state([2.0, 2.0], 0.0)]
    # flag runs on two inputs with f = 0, but one attacker among two is half of the merge.
    with pytest.raises(AggregationError, match="tolerates fewer than f = 1"):
        merge_states("flag", states, _state([0.0, 0.0], 0.0), require_f=1)
    assert merge_states("mean", states, None, require_f=0)["w"].tolist() == [1.5, 1.5]
    with pytest.raises(AggregationError, match="tolerates fewer than f = 0"):
        merge_states("trimmed_mean", states, None, {"trim": 1}, require_f=0)  # a trim that leaves nothing


def test_refusals_raise_aggregation_error() -> None:
    states = [_state([1.0, 1.0], 0.0), _state([2.0, 2.0], 0.0)]
    with pytest.raises(AggregationError, match="needs the base model"):
        merge_states("krum", states, None)
    with pytest.raises(AggregationError, match="keys of the base"):
        merge_states("geomed", states, {"w": torch.zeros(2)})
    with pytest.raises(AggregationError, match="too few"):
        merge_states("multikrum", states, _state([0.0, 0.0], 0.0))  # needs p >= 3
    with pytest.raises(AggregationError, match="unknown aggregation rule"):
        merge_states("nope", states, None)
    bad = [_state([1.0, float("nan")], 0.0), _state([2.0, 2.0], 0.0)]
    with pytest.raises(AggregationError):
        merge_states("mean", bad, None)
