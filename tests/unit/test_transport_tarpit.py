"""The per-peer refusal budget (`p2pnode.transport.tarpit.Tarpit`) on a fake clock."""

from __future__ import annotations

import pytest

from p2pnode.transport import tarpit as tarpit_module
from p2pnode.transport.tarpit import (
    COUNTED_REASONS,
    DEFAULT_HOLD_S,
    DEFAULT_MAX_REFUSALS,
    DEFAULT_WINDOW_S,
    STREAMS_PER_PEER,
    Tarpit,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(max_refusals: int = 20, window_s: float = 10.0) -> tuple[Tarpit, FakeClock]:
    clock = FakeClock()
    return Tarpit(max_refusals, window_s, 5.0, clock=clock), clock


def test_the_refusal_past_the_budget_trips_and_only_that_peer_is_held() -> None:
    pit, clock = make()
    trips = []
    for _ in range(20):
        trips.append(pit.note("flooder", "unknown_method"))
        clock.now += 0.01
    assert trips == [False] * 20 and not pit.holds("flooder")
    assert pit.note("flooder", "unknown_method") is True
    assert pit.holds("flooder") and pit.trips == 1 and pit.held_peers() == 1
    assert pit.left_s("flooder") == pytest.approx(10.0)
    assert not pit.holds("honest") and pit.left_s("honest") == 0.0


def test_refusals_spread_wider_than_the_window_never_trip() -> None:
    pit, clock = make()
    # 2 per second on average but never 21 within 10 s: 20 at once, then one every 0.6 s after a gap.
    for _ in range(20):
        assert not pit.note("peer", "malformed")
    clock.now += 10.01
    for _ in range(200):
        assert not pit.note("peer", "malformed")
        clock.now += 0.51  # 20 per 10.2 s
    assert pit.trips == 0 and not pit.holds("peer")


def test_the_penalty_ends_one_window_after_the_trip_and_the_count_restarts() -> None:
    pit, clock = make()
    for _ in range(21):
        pit.note("p", "replayed")
    assert pit.holds("p")
    clock.now += 9.99
    assert pit.holds("p")
    clock.now += 0.02
    assert not pit.holds("p") and pit.held_peers() == 0
    # Back to a full budget: 20 more refusals are allowed before it is held again.
    assert [pit.note("p", "replayed") for _ in range(21)] == [False] * 20 + [True]
    assert pit.trips == 2


def test_only_wire_refusals_count() -> None:
    pit, _ = make(max_refusals=3)
    for reason in ("busy", "tarpit", "stale", "wrong_run", "bad_shape", "non_finite", "unavailable"):
        for _ in range(10):
            assert not pit.note("p", reason)
    assert not pit.holds("p")
    assert {"unknown_method", "not_admitted", "malformed", "too_slow", STREAMS_PER_PEER} <= COUNTED_REASONS
    assert "busy" not in COUNTED_REASONS and "tarpit" not in COUNTED_REASONS


def test_zero_turns_it_off_and_bad_settings_are_refused() -> None:
    pit, _ = make(max_refusals=0)
    assert not pit.enabled
    assert not any(pit.note("p", "unknown_method") for _ in range(1000)) and not pit.holds("p")
    with pytest.raises(ValueError, match="window_s > 0"):
        Tarpit(20, 0.0)
    with pytest.raises(ValueError, match="max_refusals >= 0"):
        Tarpit(-1)


def test_memory_is_bounded_by_the_peers_tracked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarpit_module, "MAX_TRACKED", 50)
    pit, _ = make(max_refusals=1)
    for i in range(500):
        pit.note(f"sybil-{i}", "not_admitted")
        pit.note(f"sybil-{i}", "not_admitted")
    assert len(pit._recent) == 50 and len(pit._until) == 50 and pit.trips == 500
    assert pit.holds("sybil-499") and not pit.holds("sybil-0")  # the oldest were forgotten
    assert all(len(times) <= 2 for times in pit._recent.values())


def test_defaults() -> None:
    pit = Tarpit()
    assert (pit.max_refusals, pit.window_s, pit.hold_s) == (DEFAULT_MAX_REFUSALS, DEFAULT_WINDOW_S, DEFAULT_HOLD_S)
    assert (DEFAULT_MAX_REFUSALS, DEFAULT_WINDOW_S, DEFAULT_HOLD_S) == (20, 10.0, 5.0)
