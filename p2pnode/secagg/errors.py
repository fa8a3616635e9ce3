"""Errors of secure aggregation."""

from __future__ import annotations

from p2pnode.errors import P2PNodeError


class SecAggError(P2PNodeError):
    """A secure aggregation instance cannot go on (bad local input, misuse of the API)."""


class SecAggAborted(SecAggError):
    """The instance stopped before producing a sum; nothing about any single input was revealed.

    :param stage: name of the stage at whose end the check failed (``advertise``, ``share``,
        ``masked``, ``unmask``).
    :param reason: what was missing, in words (for example "4 users sent their masked input; the
        threshold is 7").
    :param survivors: number of users still in the instance when it stopped.
    """

    def __init__(self, stage: str, reason: str, survivors: int) -> None:
        super().__init__(f"secure aggregation aborted at stage {stage!r}: {reason}")
        self.stage = stage
        self.reason = reason
        self.survivors = survivors
