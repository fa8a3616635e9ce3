"""Aggregation rules: pure tensor math that turns p peers' models or updates into one.

Public API:

- `available_rules()`, `aggregate(rule, updates, weights=None, **params)`,
  `aggregate_states(rule, states, weights=None, **params)` (registry.py): the entry points.
- `rule_info(rule)`, `max_byzantine(rule, p, **params)`, `RuleInfo` (registry.py): what each rule is
  and how many Byzantine inputs it tolerates; `tolerance(rule, p, params)` and
  `byzantine_target(rule, params)`: what a combination of p inputs tolerates and must tolerate.
- `merge_states(rule, states, base, params, require_f=None)` (merge.py): one merge step, on updates
  relative to the base for the rules that need them; raises `AggregationError` for the caller's fallback.
- `OuterOptimizer` (outer.py): DiLoCo-style Nesterov outer step on any rule's output;
  `warmup_outer_step`: that step in the rounds of a synchronisation warm-up (`WARMUP_OUTER`).
- `solve_flag`, `FlagSolution` (flag.py): the Flag Aggregator's solver on a Gram matrix.

Modules: merge.py (the merge step), mean.py (weighted mean), robust.py (median, trimmed mean, Krum,
Multi-Krum, geometric median, centered clipping), vca.py (variance-corrected averaging), flag.py (Flag
Aggregator), gram.py (one-pass Gram matrix), sorting.py (sorting networks for order statistics),
inputs.py (validation, chunked layout), checks.py (parameter checks). Rules and their choices:
docs/aggregation.md.
"""

from p2pnode.aggregation.flag import FlagSolution, solve_flag
from p2pnode.aggregation.merge import merge_states
from p2pnode.aggregation.outer import (
    WARMUP_OUTER,
    OuterOptimizer,
    load_outer_state,
    outer_optimizer,
    warmup_outer_step,
)
from p2pnode.aggregation.registry import (
    RuleInfo,
    aggregate,
    aggregate_states,
    available_rules,
    byzantine_target,
    max_byzantine,
    rule_info,
    tolerance,
)

__all__ = [
    "WARMUP_OUTER",
    "FlagSolution",
    "OuterOptimizer",
    "RuleInfo",
    "aggregate",
    "aggregate_states",
    "available_rules",
    "byzantine_target",
    "load_outer_state",
    "max_byzantine",
    "merge_states",
    "outer_optimizer",
    "rule_info",
    "solve_flag",
    "tolerance",
    "warmup_outer_step",
]
