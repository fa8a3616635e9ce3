"""One merge step: models in, the rule's combination of them out, relative to a base where the rule needs it.

Every protocol that merges received models does the same thing: a rule that works on updates (flag,
krum, multikrum, geomed, centered_clip: ``RuleInfo.needs_updates``) gets ``model - base`` for each
model and its result is added back to the base; any other rule gets the models themselves. When the
rule refuses its inputs (too few for it, or fewer than the Byzantine inputs the caller's guarantee
needs) `merge_states` raises `AggregationError`, and the caller falls back: gossip keeps its own model,
MoDeST combines by ``mean``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from p2pnode.aggregation.registry import aggregate_states, rule_info, tolerance
from p2pnode.errors import AggregationError

StateDict = Mapping[str, torch.Tensor]


@torch.no_grad()
def merge_states(rule: str, states: Sequence[StateDict], base: StateDict | None,
                 params: Mapping[str, Any] | None = None, *, require_f: int | None = None) -> dict[str, torch.Tensor]:
    """Combine `states` (models of one architecture) by `rule`, on updates relative to `base` if it needs them.

    Args:
        rule: one of `available_rules()`.
        states: p >= 1 state dicts (name -> tensor) of one model; never modified.
        base: the model the states started from (the round's start, the aggregator's base version);
            only read when the rule needs updates, and may be None otherwise.
        params: the rule's parameters (``f`` and the rule's own; default none).
        require_f: Byzantine inputs the merge must tolerate (default None: no check beyond the rule's):
            inputs too few for that raise, though the rule itself would run with a smaller ``f``
            (0 still raises where the parameters leave nothing, e.g. a trim too large for p).

    Returns:
        A new state dict: ``aggregate_states(rule, states)``, or for an update rule
        ``base + aggregate_states(rule, [s - base for s in states])``, with the keys in the order of
        ``base``.

    Raises:
        AggregationError: the rule refuses the inputs (unknown rule or parameter, too few inputs,
            NaN/Inf, mismatched states), `require_f` is out of reach with this many inputs, or the rule
            needs updates and `base` is missing or has other keys than the states.
    """
    p = dict(params or {})
    if require_f is not None and tolerance(rule, len(states), p) < require_f:
        # e.g. flag with the own model and one peer's: an attacker would be half of the merge.
        raise AggregationError(f"{rule} tolerates fewer than f = {require_f} Byzantine input(s) among {len(states)}")
    if not rule_info(rule).needs_updates:
        return aggregate_states(rule, states, **p)
    if base is None:
        raise AggregationError(f"{rule} combines updates: it needs the base model the states started from")
    for i, st in enumerate(states):
        if st.keys() != base.keys():
            raise AggregationError(f"state {i} does not have the keys of the base model; all states must come "
                                   "from the base's model")
    # Each update keeps its state's key order: the rule's layout follows the first one.
    updates = [{k: st[k] - base[k] for k in st} for st in states]
    delta = aggregate_states(rule, updates, **p)
    return {k: base[k] + delta[k] for k in base}
