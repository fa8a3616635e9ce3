"""Secure within a group, robust across groups: split a sample into several secure instances.

With ``--secagg-groups G`` the trainers of one sample are split into G groups, each one secure
aggregation instance with the sample's aggregator. The aggregator learns the G group sums (hence the G
group means) instead of one sum, and combines the group means with the run's rule, which may then be
a robust one (``median``, ``krum``, ...): a Byzantine trainer can spoil only the mean of its own group.

Every node derives the groups alike from the sample's order (the order of `candidate_order` that the
model message carries): member ``i`` (0-based position) goes to group ``i mod G``. So groups differ in
size by at most one, and the smallest has ``floor(n / G)`` members for a sample of ``n``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from p2pnode.aggregation.registry import byzantine_target, tolerance
from p2pnode.errors import ConfigError
from p2pnode.secagg.settings import SUM_RULES, check_rule_compatible

__all__ = ["DEFAULT_MIN_GROUP", "check_groups", "group_of", "groups_needed", "split_groups", "target_f"]

#: Fewest members of a secure group by default. A group mean of n members tells the aggregator, together
#: with n - 1 of them, the last one's update; with 5 the aggregator needs 4 colluding members for that.
DEFAULT_MIN_GROUP = 5


def split_groups(sample: Sequence[str], groups: int) -> list[tuple[str, ...]]:
    """The `groups` groups of `sample` (in its order): member ``i`` goes to group ``i mod groups``.

    Duplicates keep their first position. Groups may be empty when the sample has fewer members than
    `groups`; callers check sizes.
    """
    if groups < 1:
        raise ConfigError(f"secagg groups must be >= 1, got {groups}")
    members = list(dict.fromkeys(sample))
    return [tuple(members[g::groups]) for g in range(groups)]


def group_of(sample: Sequence[str], member: str, groups: int) -> int:
    """The group (0-based) of `member` in `sample`; `ConfigError` when it is not in the sample."""
    members = list(dict.fromkeys(sample))
    try:
        return members.index(member) % groups
    except ValueError:
        raise ConfigError(f"{member!r} is not in the sample") from None


def target_f(rule: str, params: Mapping[str, Any]) -> int:
    """Byzantine group means the combination must tolerate (`byzantine_target`): the rule's ``f`` if set,
    else 1 for a robust rule and 0 for a sum rule (``mean``, ``vca``)."""
    return byzantine_target(rule, params)


def groups_needed(rule: str, params: Mapping[str, Any], groups: int) -> int:
    """Fewest group means `rule` can combine with its guarantee (`target_f`) intact; ``groups + 1`` when
    even all `groups` are too few. A round with fewer groups left than this aborts."""
    if rule in SUM_RULES and params.get("f") in (None, 0):
        return 1
    f = target_f(rule, params)
    for p in range(1, groups + 1):
        if tolerance(rule, p, params) >= f:
            return p
    return groups + 1


def check_groups(rule: str, params: Mapping[str, Any], groups: int, sample_size: int,
                 threshold: int | None = None, *, min_group: int = DEFAULT_MIN_GROUP) -> None:
    """Refuse a `groups` setting under which the rule's guarantee cannot hold; `ConfigError` names the numbers.

    :param rule: the run's aggregation rule (applied across the group means when ``groups > 1``).
    :param params: its parameters (``f``: Byzantine group means to tolerate; default 1 for a robust rule).
    :param groups: G, the number of secure instances per sample (1: the whole sample, only sum rules).
    :param sample_size: s, trainers per sample; the smallest group, ``floor(s / G)`` members, needs at
        least `min_group`.
    :param threshold: the configured secagg threshold t (None: each group's default), which every group,
        the smallest having ``floor(s / G)`` members, must be able to reach.
    :param min_group: fewest members a group may have (default `DEFAULT_MIN_GROUP` = 5; at least 2, since a
        sum of one is that input).
    """
    if min_group < 2:
        raise ConfigError(f"secagg_min_group={min_group}: must be >= 2 (a secure sum of one member is that "
                          f"member's update)")
    if groups < 1:
        raise ConfigError(f"secagg_groups={groups}: must be >= 1")
    if groups == 1:
        check_rule_compatible(rule)
        return
    check_rule_compatible(rule, across_samples=True)
    f = target_f(rule, params)
    limit = tolerance(rule, groups, params)
    if limit < f:
        wanted = next((g for g in range(groups + 1, 4 * groups + 64) if tolerance(rule, g, params) >= f), None)
        more = f"; it needs secagg_groups >= {wanted}" if wanted is not None else ""
        raise ConfigError(f"rule={rule!r} across secagg_groups={groups} group means tolerates at most "
                          f"{max(limit, 0)} Byzantine group(s), but f={f} is needed (one Byzantine trainer "
                          f"spoils its whole group){more}")
    smallest = sample_size // groups
    if smallest < min_group:
        raise ConfigError(f"secagg_groups={groups} with sample_size={sample_size}: the smallest group would have "
                          f"{smallest} member(s), below secagg_min_group={min_group} (the aggregator learns each "
                          f"group's mean); use sample_size >= {min_group * groups}, at most "
                          f"{max(1, sample_size // min_group)} group(s), or a lower secagg_min_group (>= 2)")
    if threshold is not None and threshold > smallest:
        raise ConfigError(f"secagg_threshold={threshold} cannot be reached by a group of {smallest} (sample_size="
                          f"{sample_size} split into {groups} groups); use a threshold <= {smallest}, fewer "
                          f"groups, or a larger sample")
