"""How many local steps each round trains: `RoundSchedule`, with an optional synchronisation warm-up.

DiLoCo with many local steps per round (H = 100) sends far fewer bytes than frequent averaging (H = 10), but
the first rounds, when the models move fastest, suffer most from rare synchronisation. A warm-up runs the
first ``warmup_steps`` local steps of the run in short rounds of ``warmup_local_steps`` each, then the run's
``local_steps`` per round. The schedule is a function of the round number alone, so every peer of a run (it
is run-wide, hashed into the config) agrees on the length of round ``k`` and on the local step it starts at;
a node resumed from a checkpoint or a state sync takes up the schedule at its restored round.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundSchedule:
    """Local steps per round: ``warmup_local_steps`` until ``warmup_steps`` local steps are done, then
    ``local_steps``.

    :param local_steps: local steps of a round after the warm-up (>= 1).
    :param warmup_steps: local steps of the run trained in warm-up rounds (default 0: no warm-up). When it is
        not a multiple of `warmup_local_steps`, the last warm-up round is shortened so that the warm-up ends
        exactly at this step.
    :param warmup_local_steps: local steps of a warm-up round (>= 1; None, the default: no warm-up).

    Raises:
        ValueError: a count out of range, or ``warmup_steps > 0`` without `warmup_local_steps`.
    """

    local_steps: int
    warmup_steps: int = 0
    warmup_local_steps: int | None = None

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_local_steps is not None and self.warmup_local_steps < 1:
            raise ValueError(f"warmup_local_steps must be >= 1, got {self.warmup_local_steps}")
        if self.warmup_steps > 0 and self.warmup_local_steps is None:
            raise ValueError("warmup_steps > 0 needs warmup_local_steps")

    @property
    def warmup_rounds(self) -> int:
        """Rounds of the warm-up: ``ceil(warmup_steps / warmup_local_steps)`` (0 without a warm-up)."""
        if self.warmup_steps == 0 or self.warmup_local_steps is None:
            return 0
        return -(-self.warmup_steps // self.warmup_local_steps)

    def steps(self, round: int) -> int:
        """Local steps of round ``round`` (0-based)."""
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        if round < self.warmup_rounds:
            assert self.warmup_local_steps is not None
            return min(self.warmup_local_steps, self.warmup_steps - round * self.warmup_local_steps)
        return self.local_steps

    def start_step(self, round: int) -> int:
        """Local steps the run has trained before round ``round`` starts (0-based): the step its first local
        step has in the run's learning-rate schedule."""
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        w = self.warmup_rounds
        if round <= w:
            assert round == 0 or self.warmup_local_steps is not None
            return min(round * (self.warmup_local_steps or 0), self.warmup_steps)
        return self.warmup_steps + (round - w) * self.local_steps

    def rounds_for(self, steps: int) -> int:
        """Rounds that train ``steps`` local steps in all, rounded up (a run of ``steps`` local steps)."""
        if steps <= 0:
            return 0
        w = self.warmup_rounds
        if steps <= self.warmup_steps:
            assert self.warmup_local_steps is not None
            return -(-steps // self.warmup_local_steps)
        return w + -(-(steps - self.warmup_steps) // self.local_steps)
