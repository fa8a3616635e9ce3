"""Small measurements on simulation results: when a run reaches a target, and how spread its weights are.

The functions take the per-round rows of a results dict (``results["rounds"]``), as written by
`simulator.run_simulation` and ``p2pnode sim --out``, so that they work on files read back as JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["layer_variance", "rounds_to_target", "time_to_target"]


def _first_reaching(rows: Sequence[Mapping[str, Any]], target: float, key: str, metric: str,
                    higher_is_better: bool) -> Any:
    for row in rows:
        value = row.get(metric)
        # Rows without an evaluation (metric None) cannot say that the target was reached.
        if value is not None and (value >= target if higher_is_better else value <= target):
            return row[key]
    return None


def rounds_to_target(rows: Sequence[Mapping[str, Any]], target: float, *, metric: str = "accuracy",
                     higher_is_better: bool = True) -> int | None:
    """The first round whose metric reaches `target`, or None when no round reaches it.

    Args:
        rows: the per-round rows of a run, in round order (``results["rounds"]``).
        target: value of the metric, e.g. an accuracy in [0, 1].
        metric: the row key of the metric (``results.get("metric", "accuracy")``; ``"perplexity"`` for
            ``tiny-lm``).
        higher_is_better: reach means ``>= target`` (default) or, when false (perplexity;
            ``results["higher_is_better"]``), ``<= target``.

    The first crossing counts, even if a later round dips below the target again: this is the
    "rounds to reach" figure of the papers. Rows whose metric is None (not evaluated) are skipped.
    """
    value = _first_reaching(rows, target, "round", metric, higher_is_better)
    return None if value is None else int(value)


def time_to_target(rows: Sequence[Mapping[str, Any]], target: float, *, metric: str = "accuracy",
                   higher_is_better: bool = True) -> float | None:
    """Like `rounds_to_target`, but the virtual time of that round (``time_s``, in seconds)."""
    value = _first_reaching(rows, target, "time_s", metric, higher_is_better)
    return None if value is None else float(value)


def layer_variance(states: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Per entry, the population variance of its elements, averaged over the given models.

    Args:
        states: the models (state dicts with the same keys), e.g. the live nodes' current models.

    Returns:
        name -> mean over the models of ``Var(model[name])`` (population variance, computed in
        float64), for every floating-point entry with more than one element, in the key order of the
        first model; values are rounded to 6 significant digits so that results files are stable.
        Empty when `states` is empty.

    This is the quantity that vanishes when independently initialised models are averaged: the mean
    of N uncorrelated tensors of variance s2 has variance about s2 / N (algorithms.md 2.1).
    """
    sums: dict[str, float] = {}
    count = 0
    for state in states:
        count += 1
        for name, value in state.items():
            if torch.is_floating_point(value) and value.numel() > 1:
                v = float(torch.var(value.detach().to(torch.float64), correction=0))
                sums[name] = sums.get(name, 0.0) + v
    return {name: float(f"{total / count:.6g}") for name, total in sums.items()} if count else {}
