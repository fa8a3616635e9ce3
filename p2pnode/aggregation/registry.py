"""The rule registry and the public entry points `aggregate` and `aggregate_states`.

Every rule is registered here explicitly (no import side effects) with its guarantee: the largest
number ``f`` of Byzantine inputs among ``p`` it tolerates. Callers may pass ``f``; robust rules default
it to that maximum, and an ``f`` beyond it is refused with a message naming the requirement.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pnode.aggregation import flag as _flag
from p2pnode.aggregation import mean as _mean
from p2pnode.aggregation import robust as _robust
from p2pnode.aggregation import vca as _vca
from p2pnode.aggregation.checks import check_int
from p2pnode.aggregation.inputs import (
    Batch,
    NonFiniteInput,
    is_uniform,
    lower_median_int,
    normalized_weights,
    states_batch,
    updates_batch,
)
from p2pnode.errors import AggregationError

RuleFn = Callable[..., list[torch.Tensor]]


@dataclass(frozen=True)
class RuleInfo:
    """What a rule is, where it comes from, and what it guarantees.

    Attributes:
        name: registry name.
        summary: one line.
        source: paper (and reference code) it follows.
        guarantee: the condition on ``p`` and ``f`` it needs, in words (e.g. ``"p >= 2f + 3"``).
        weighted: accepts non-uniform `weights` (others accept only equal weights).
        sum_reducible: computable from a (weighted) sum of inputs, so it can run under secure aggregation.
        needs_updates: works on directions/distances, so protocols should feed it model updates (the
            difference from the round's start model), not whole models.
        params: the rule's keyword parameters and their defaults (``f`` excluded).
        fn: the implementation, ``fn(batch, weights, f, **params) -> list of output pieces``.
        max_f: ``max_f(p, params)``, the largest tolerated f for p inputs (negative: p is too small).
    """

    name: str
    summary: str
    source: str
    guarantee: str
    weighted: bool
    sum_reducible: bool
    needs_updates: bool
    params: Mapping[str, Any]
    fn: RuleFn
    max_f: Callable[[int, Mapping[str, Any]], int]


_RULES: dict[str, RuleInfo] = {}


def _register(
    name: str,
    fn: RuleFn,
    *,
    summary: str,
    source: str,
    guarantee: str,
    max_f: Callable[[int, Mapping[str, Any]], int],
    weighted: bool = False,
    sum_reducible: bool = False,
    needs_updates: bool = False,
) -> None:
    if name in _RULES:
        raise ValueError(f"aggregation rule {name!r} is already registered")
    sig = inspect.signature(fn)
    params = {n: prm.default for n, prm in sig.parameters.items() if prm.kind is inspect.Parameter.KEYWORD_ONLY}
    _RULES[name] = RuleInfo(name, summary, source, guarantee, weighted, sum_reducible, needs_updates, params, fn, max_f)


def _no_byzantine(p: int, params: Mapping[str, Any]) -> int:
    return 0


def _minority(p: int, params: Mapping[str, Any]) -> int:
    return (p - 1) // 2


def _krum_limit(p: int, params: Mapping[str, Any]) -> int:
    return (p - 3) // 2


def _trimmed_limit(p: int, params: Mapping[str, Any]) -> int:
    trim = params.get("trim")
    if trim is None:
        return (p - 1) // 2
    t = check_int("trimmed_mean", "trim", trim, 0)
    if 2 * t >= p:
        raise AggregationError(
            f"trimmed_mean: trim={t} per side leaves nothing of p={p} inputs; needs 2 * trim < p "
            f"(trim <= {(p - 1) // 2})"
        )
    return t


_register(
    "mean",
    _mean.mean,
    summary="weighted mean (FedAvg, gossip averaging)",
    source="McMahan et al., AISTATS 2017",
    guarantee="no Byzantine input (f = 0)",
    max_f=_no_byzantine,
    weighted=True,
    sum_reducible=True,
)
_register(
    "median",
    _robust.median,
    summary="coordinate-wise median",
    source="Yin et al., ICML 2018",
    guarantee="f < p/2",
    max_f=_minority,
)
_register(
    "trimmed_mean",
    _robust.trimmed_mean,
    summary="coordinate-wise mean after dropping `trim` values on each side (trim defaults to f)",
    source="Yin et al., ICML 2018",
    guarantee="f <= trim and 2 * trim < p",
    max_f=_trimmed_limit,
)
_register(
    "krum",
    _robust.krum,
    summary="the input closest to its p - f - 2 nearest neighbours",
    source="Blanchard et al., NeurIPS 2017",
    guarantee="p >= 2f + 3",
    max_f=_krum_limit,
    needs_updates=True,
)
_register(
    "multikrum",
    _robust.multikrum,
    summary="mean of the m inputs with the lowest Krum scores (m defaults to p - f)",
    source="El Mhamdi et al., ICML 2018",
    guarantee="p >= 2f + 3",
    max_f=_krum_limit,
    needs_updates=True,
)
_register(
    "geomed",
    _robust.geomed,
    summary="geometric median by smoothed Weiszfeld iterations",
    source="Pillutla et al., IEEE TSP 2022 (RFA)",
    guarantee="f < p/2",
    max_f=_minority,
    weighted=True,
    needs_updates=True,
)
_register(
    "centered_clip",
    _robust.centered_clip,
    summary="iterative clipping of the inputs around a centre (medoid or a given point)",
    source="Karimireddy et al., ICML 2021",
    guarantee="f < p/2",
    max_f=_minority,
    weighted=True,
    needs_updates=True,
)
_register(
    "flag",
    _flag.flag,
    summary="Flag Aggregator: IRLS flag-median subspace of the input directions, in the Gram space",
    source="Almasi et al., ICLR 2024",
    guarantee="f < p/2",
    max_f=_minority,
    needs_updates=True,
)
_register(
    "vca",
    _vca.vca,
    summary="variance-corrected averaging, per layer, optionally mixed with the own model",
    source="Tian et al., arXiv 2404.04616 (2024)",
    guarantee="no Byzantine input (f = 0)",
    max_f=_no_byzantine,
    weighted=True,
)


def available_rules() -> list[str]:
    """Names of all registered aggregation rules, sorted."""
    return sorted(_RULES)


def rule_info(rule: str) -> RuleInfo:
    """The `RuleInfo` of a rule; raises `AggregationError` for an unknown name."""
    info = _RULES.get(rule) if isinstance(rule, str) else None
    if info is None:
        raise AggregationError(f"unknown aggregation rule {rule!r}; available: {', '.join(available_rules())}")
    return info


def max_byzantine(rule: str, p: int, **params: Any) -> int:
    """Largest ``f`` the rule tolerates among `p` inputs with these parameters (negative: p is too small)."""
    return rule_info(rule).max_f(p, params)


def tolerance(rule: str, p: int, params: Mapping[str, Any]) -> int:
    """`max_byzantine` of `rule` among `p` inputs under `params` (their ``f`` aside); -1 where the
    parameters leave nothing (e.g. a trim too large for p)."""
    rest = {k: v for k, v in params.items() if k != "f"}
    try:
        return max_byzantine(rule, p, **rest)
    except AggregationError:
        return -1


def byzantine_target(rule: str, params: Mapping[str, Any]) -> int:
    """Byzantine inputs a combination with `rule` must tolerate: its ``f`` parameter if set, else 1 for a
    robust rule (one that tolerates an attacker among a handful of inputs: its reason to be there) and 0
    for the others (``mean``, ``vca``)."""
    f = params.get("f")
    if f is not None:
        return int(f)
    return 1 if tolerance(rule, 9, params) >= 1 else 0


def _prepare(info: RuleInfo, batch: Batch, weights: Any, params: dict[str, Any]) -> tuple[Any, int]:
    """Check weights, parameter names and f; return (normalized weights, f)."""
    p = batch.p
    f = params.pop("f", None)
    unknown = sorted(set(params) - set(info.params))
    if unknown:
        allowed = ", ".join(["f", *info.params]) if info.params else "f"
        raise AggregationError(f"{info.name}: unknown parameter(s) {unknown}; allowed: {allowed}")
    w = normalized_weights(weights, p)
    if not info.weighted and not is_uniform(w):
        weighted = ", ".join(n for n, r in sorted(_RULES.items()) if r.weighted)
        raise AggregationError(
            f"{info.name} does not take per-input weights (only equal weights); rules that do: {weighted}"
        )
    if not info.weighted:
        w = None
    limit = info.max_f(p, params)
    if limit < 0:
        raise AggregationError(f"{info.name} needs {info.guarantee}; {p} input(s) are too few even for f = 0")
    if f is None:
        return w, limit
    f = check_int(info.name, "f", f, 0)
    if f > limit:
        alternatives = ", ".join(n for n, r in sorted(_RULES.items()) if n != info.name and r.max_f(p, {}) >= f)
        raise AggregationError(
            f"{info.name} tolerates at most {limit} Byzantine input(s) among p={p} "
            f"(it needs {info.guarantee}); got f={f}. Rules that tolerate f={f} here: "
            f"{alternatives or 'none (too many attackers for p inputs)'}"
        )
    return w, f


@torch.no_grad()
def aggregate(
    rule: str,
    updates: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """Combine equal-length 1-D tensors into one by the named rule.

    Args:
        rule: one of `available_rules()`.
        updates: p >= 1 flat tensors (models or model updates) of one length, floating dtype and device.
            They are never modified.
        weights: p non-negative numbers (normalized here), for rules with ``weighted``; equal weights are
            accepted by every rule.
        **params: ``f`` (declared Byzantine inputs; robust rules default it to the most they tolerate)
            and the rule's own parameters (see ``rule_info(rule).params`` and docs/aggregation.md).

    Returns:
        A new 1-D tensor on the inputs' device, in their dtype (never part of an autograd graph).

    Raises:
        AggregationError: unknown rule or parameter, bad shapes/dtypes/devices, empty input, NaN/Inf,
            too many Byzantine inputs for the rule's guarantee.
    """
    info = rule_info(rule)
    batch = updates_batch(updates)
    w, f = _prepare(info, batch, weights, dict(params))
    call_params = {k: v for k, v in params.items() if k != "f"}
    return info.fn(batch, w, f, **call_params)[0]


@torch.no_grad()
def aggregate_states(
    rule: str,
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Combine state dicts (name -> tensor) of one model by the named rule; the layer-aware form.

    Floating-point entries are the rule's input: ``vca`` works on each entry separately (see its
    docstring); coordinate-wise rules work entry by entry; the others treat all floating entries together
    as one vector (without concatenating them). Non-floating entries (e.g. ``num_batches_tracked``) are
    not aggregated: with ``vca`` and ``self_index`` they come from the self state, otherwise they are the
    element-wise lower median of the states (a minority cannot set them).

    Returns:
        A new state dict with the keys in the order of ``states[0]``, shapes, dtypes and device unchanged.
    """
    info = rule_info(rule)
    batch, layout = states_batch(states)
    w, f = _prepare(info, batch, weights, dict(params))
    call_params = {k: v for k, v in params.items() if k != "f"}
    result: dict[str, torch.Tensor] = {}
    if layout.float_keys:
        try:
            pieces = info.fn(batch, w, f, **call_params)
        except NonFiniteInput as e:  # the rules speak of updates; here the inputs are states
            raise NonFiniteInput(e.index, "state") from None
        for key, piece, shape in zip(layout.float_keys, pieces, batch.shapes, strict=True):
            result[key] = piece.view(shape)
    self_index = params.get("self_index") if info.name == "vca" else None
    if self_index is not None:
        self_index = check_int("vca", "self_index", self_index, 0, batch.p - 1)
    for key in layout.other_keys:
        if self_index is not None:
            result[key] = states[self_index][key].clone()
        else:
            result[key] = lower_median_int([s[key] for s in states])
    return {k: result[k] for k in layout.keys}
