"""RoundSchedule: the local steps of each round and the step it starts at, with and without a warm-up."""

from __future__ import annotations

import pytest

from p2pnode.training.round_schedule import RoundSchedule


def test_no_warmup_is_local_steps_every_round() -> None:
    s = RoundSchedule(100)
    assert s.warmup_rounds == 0
    assert [s.steps(k) for k in range(4)] == [100, 100, 100, 100]
    assert [s.start_step(k) for k in range(5)] == [0, 100, 200, 300, 400]
    assert s.rounds_for(400) == 4 and s.rounds_for(401) == 5 and s.rounds_for(0) == 0


def test_warmup_runs_short_rounds_then_long_ones() -> None:
    # 100 steps at H0 = 10, then H = 100: 10 short rounds, then long ones.
    s = RoundSchedule(100, 100, 10)
    assert s.warmup_rounds == 10
    assert [s.steps(k) for k in range(12)] == [10] * 10 + [100, 100]
    assert [s.start_step(k) for k in (0, 1, 9, 10, 11, 12)] == [0, 10, 90, 100, 200, 300]
    # A run of 400 local steps: 10 + 3 rounds; the start steps add up the lengths.
    assert s.rounds_for(400) == 13 and s.rounds_for(100) == 10 and s.rounds_for(95) == 10
    assert all(s.start_step(k + 1) == s.start_step(k) + s.steps(k) for k in range(30))


def test_a_warmup_not_a_multiple_of_its_rounds_ends_exactly_at_its_step() -> None:
    s = RoundSchedule(20, 25, 10)  # rounds of 10, 10, 5, then 20
    assert s.warmup_rounds == 3
    assert [s.steps(k) for k in range(5)] == [10, 10, 5, 20, 20]
    assert [s.start_step(k) for k in range(6)] == [0, 10, 20, 25, 45, 65]
    assert s.rounds_for(25) == 3 and s.rounds_for(26) == 4 and s.rounds_for(65) == 5


@pytest.mark.parametrize(("args", "message"), [
    ((0,), "local_steps must be >= 1"),
    ((10, -1, 5), "warmup_steps must be >= 0"),
    ((10, 10, 0), "warmup_local_steps must be >= 1"),
    ((10, 10, None), "warmup_steps > 0 needs warmup_local_steps"),
])
def test_bad_counts_are_refused(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoundSchedule(*args)  # type: ignore[arg-type]


def test_negative_rounds_are_refused() -> None:
    s = RoundSchedule(10, 20, 5)
    with pytest.raises(ValueError, match="round must be >= 0"):
        s.steps(-1)
    with pytest.raises(ValueError, match="round must be >= 0"):
        s.start_step(-1)
