"""The merge quorum: the node's decision over a round's report (`partial_reason`), and the undo of a merge
that combined fewer models than ``min_merge`` (`apply_quorum`).

Logs under the node's logger (``p2pnode.daemon.node``), with its round lines.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from p2pnode.protocols import LocalOuterState, RoundExtra, RoundReport

if TYPE_CHECKING:
    from p2pnode.daemon.node import Node

logger = logging.getLogger("p2pnode.daemon.node")


def partial_reason(report: RoundReport, min_merge: int) -> str | None:
    """Why the round of `report` is partial, or None when it is not: the node's quorum decision.

    Args:
        report: the protocol's report of the round.
        min_merge: the quorum (``--min-merge``): models a round must combine, the node's own included.

    Returns:
        ``"quorum"`` when it combined fewer than `min_merge` models (the node then undoes the merge, if
        one was applied); ``"fraction"`` when it combined several models but only part of the model
        (`RoundReport.fraction` < 1); else the reason the protocol gave (``extra["partial"]``), or None.
    """
    if report.combined < min_merge:
        return "quorum"
    if report.combined > 1 and report.fraction < 1.0:
        return "fraction"
    reason = report.extra.get("partial")
    return str(reason) if reason else None


async def apply_quorum(node: Node, report: RoundReport) -> tuple[RoundReport, str | None]:
    """Decide whether the round was partial (`partial_reason`); below the quorum, undo its merge.

    A merge was applied when the report says it combined part of the model (`RoundReport.fraction` > 0)
    and carries the model from before it (`RoundReport.pre_merge`): the node then loads that model back.
    The returned report never carries `pre_merge` (the node keeps its last report).
    """
    quorum = node.settings.min_merge
    reason = partial_reason(report, quorum)
    pre, pre_outer = report.pre_merge, report.pre_outer
    report = dataclasses.replace(report, pre_merge=None, pre_outer=None)
    if reason == "quorum":
        test_loss, accuracy = report.test_loss, report.accuracy
        undo = pre is not None and report.fraction > 0.0
        if undo:  # put back the model as trained, before the merge
            assert pre is not None
            before = pre
            await node.compute.run(lambda: node.trainer.load_state(before))
            if pre_outer is not None and isinstance(node.protocol, LocalOuterState):
                node.protocol.load_outer_state(pre_outer)  # the momentum from before the round's outer step
            node.state_adopted()
            if accuracy is not None:  # the report must describe the model the node keeps
                test_loss, accuracy = await node.compute.run(node.trainer.evaluate)
        extra = report.extra.copy()
        extra.update(RoundExtra(partial="quorum", offered=report.combined, quorum=quorum, merge_applied=False))
        if undo:
            logger.warning("round %d is partial: %d of the %d models the quorum (--min-merge) asks for; the merge "
                           "is not applied", report.round, report.combined, quorum)
        else:
            logger.warning("round %d is partial: %d of the %d models the quorum (--min-merge) asks for, nothing "
                           "merged", report.round, report.combined, quorum)
        return dataclasses.replace(report, combined=1, fraction=0.0, test_loss=test_loss, accuracy=accuracy,
                                   extra=extra), reason
    if reason == "fraction":
        logger.warning("round %d is partial: the merge combined %.0f %% of the model", report.round,
                       report.fraction * 100)
        extra = report.extra.copy()
        extra["partial"] = "fraction"
        return dataclasses.replace(report, extra=extra), reason
    return report, reason
