"""Checks of rule parameters, with messages that say what is allowed."""

from __future__ import annotations

import math
from collections.abc import Collection

from p2pnode.errors import AggregationError


def check_int(rule: str, name: str, value: object, lo: int, hi: int | None = None) -> int:
    """Return `value` as an int in ``[lo, hi]`` or raise `AggregationError` naming the rule and bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AggregationError(f"{rule}: {name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise AggregationError(f"{rule}: {name} must be >= {lo}{upper}, got {value}")
    return value


def check_float(
    rule: str,
    name: str,
    value: object,
    lo: float | None = None,
    hi: float | None = None,
    *,
    strict_lo: bool = False,
) -> float:
    """Return `value` as a finite float within the bounds or raise `AggregationError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AggregationError(f"{rule}: {name} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise AggregationError(f"{rule}: {name} must be finite, got {x}")
    if lo is not None and (x < lo or (strict_lo and x == lo)):
        op = ">" if strict_lo else ">="
        raise AggregationError(f"{rule}: {name} must be {op} {lo}, got {x}")
    if hi is not None and x > hi:
        raise AggregationError(f"{rule}: {name} must be <= {hi}, got {x}")
    return x


def check_choice(rule: str, name: str, value: object, allowed: Collection[str]) -> str:
    """Return `value` if it is one of `allowed`, else raise `AggregationError` listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise AggregationError(f"{rule}: {name} must be one of {sorted(allowed)}, got {value!r}")
    return value
