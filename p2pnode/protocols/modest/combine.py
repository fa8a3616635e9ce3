"""How received models become the next version: pure functions of the inputs, the base and the settings.

`combine` applies the run's rule to trained models (``model - base`` for rules that need updates, with
a fall back to ``mean`` when the rule refuses too few inputs); `combine_secure` applies the mean update
a secure aggregation revealed (``vca``: rescaled by the mean of the trainers' layer variances);
`combine_groups` combines the means of secure groups by the rule. Each then steps the outer optimizer,
if the run has one (`outer_step`). Integer buffers keep the base's value in the secure paths.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from p2pnode.aggregation import OuterOptimizer, aggregate_states, merge_states, warmup_outer_step
from p2pnode.errors import AggregationError
from p2pnode.protocols.base import State
from p2pnode.protocols.modest.settings import ModestSettings
from p2pnode.protocols.modest.state import Base, Layout
from p2pnode.secagg import SecAggResult, split_layers, variance_correct
from p2pnode.secagg.settings import SUM_RULES

logger = logging.getLogger(__name__)


def combine(states: Sequence[State], base: Base | None, settings: ModestSettings, *, label: str = ""
            ) -> tuple[State, State, str]:
    """Aggregate trained models into the next version (and step the outer optimizer)."""
    s = settings
    params = dict(s.rule_params)
    rule = s.rule
    try:
        combined = merge_states(rule, states, base.state if base is not None else None, params)
    except AggregationError as e:
        # e.g. a robust rule refuses too few inputs after a degraded round: fall back, and say so.
        logger.warning("%s: rule %s refused %d input(s) (%s); using mean", label, rule, len(states), e)
        rule = "mean"
        combined = aggregate_states("mean", states)
    combined, outer_state = outer_step(combined, base, settings)
    return combined, outer_state, rule


def outer_step(combined: State, base: Base | None, settings: ModestSettings) -> tuple[State, State]:
    """Step the outer optimizer (if any) from the base towards `combined`; return the model and its state."""
    s = settings
    if s.outer_lr is None or base is None:
        return combined, {}
    opt = OuterOptimizer(lr=s.outer_lr, momentum=s.outer_momentum, nesterov=s.outer_nesterov)
    opt.load_state_dict(base.outer)
    # The trainers trained `base` for the length of round `base.round` (the warm-up's or local_steps).
    w = s.schedule.warmup_rounds
    combined = warmup_outer_step(opt, base.state, combined, policy=s.sync_warmup_outer,
                                 warmup_round=base.round < w, first_after=w > 0 and base.round == w)
    return combined, opt.state_dict()


def combine_secure(result: SecAggResult, base: Base, settings: ModestSettings, layout: Layout
                   ) -> tuple[State, State, str]:
    """The next version from a secure aggregation: base + mean update (vca: rescaled), then the outer step."""
    shapes = list(layout.shapes)
    deltas = split_layers(result.mean(), shapes)
    combined = {k: v.clone() for k, v in base.state.items()}  # integer buffers keep the base's value
    layers = [base.state[n].to(torch.float64) + d for n, d in zip(layout.float_names, deltas, strict=True)]
    if settings.rule == "vca":
        # Each trainer appended the variance of each of its trained layers: their mean is VCA's target.
        every = settings.rule_params.get("correct", "matrices") == "all"
        layers = variance_correct(layers, result.extras_mean(),
                                  corrected=[every or len(sh) >= 2 for sh in shapes])
    for n, layer in zip(layout.float_names, layers, strict=True):
        combined[n] = layer.to(base.state[n].dtype)
    combined, outer_state = outer_step(combined, base, settings)
    return combined, outer_state, settings.rule


def combine_groups(results: Sequence[SecAggResult], base: Base, settings: ModestSettings, layout: Layout
                   ) -> tuple[State, State, str]:
    """The next version from the secure groups that completed: base + the rule across group means.

    ``mean`` and ``vca`` pool the group sums (weights and extras included), which is exactly one
    secure sum over the union of the groups. A robust rule combines the group mean updates, each
    one input of equal weight (a group's size is no reason to trust it more).
    """
    s = settings
    if s.rule in SUM_RULES:
        first = results[0]
        pooled = dataclasses.replace(
            first, weighted_sum=sum((r.weighted_sum for r in results[1:]), first.weighted_sum.clone()),
            extras_sum=sum((r.extras_sum for r in results[1:]), first.extras_sum.clone()),
            weight_sum=sum(r.weight_sum for r in results),
            survivors=tuple(sorted({u for r in results for u in r.survivors})),
            users=sum(r.users for r in results))
        return combine_secure(pooled, base, settings, layout)
    shapes = list(layout.shapes)
    updates = [dict(zip(layout.float_names, split_layers(r.mean(), shapes), strict=True)) for r in results]
    delta = aggregate_states(s.rule, updates, **dict(s.rule_params))
    combined = {k: v.clone() for k, v in base.state.items()}  # integer buffers keep the base's value
    for n in layout.float_names:
        combined[n] = (base.state[n].to(torch.float64) + delta[n].to(torch.float64)).to(base.state[n].dtype)
    combined, outer_state = outer_step(combined, base, settings)
    return combined, outer_state, s.rule
