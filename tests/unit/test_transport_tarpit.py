"""The per-peer refusal budget (`p2pnode.transport.tarpit.Tarpit`) on a fake clock."""

from __future__ import annotations

import pytest

from p2pnode.transport import tarpit as tarpit_module
from p2pnode.transport.tarpit import (
    COUNTED_REASONS,
    DEFAULT_HOLD_S,
    DEFAULT_MAX_HOST_REFUSALS,
    DEFAULT_MAX_NODE_REFUSALS,
    DEFAULT_MAX_REFUSALS,
    DEFAULT_WINDOW_S,
    STREAMS_PER_PEER,
    Tarpit,
    host_key,
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
    pit.max_node_refusals = 0  # the per-peer tables alone (the node-wide alarm would trip each at its first)
    for i in range(500):
        pit.note(f"sybil-{i}", "not_admitted")
        pit.note(f"sybil-{i}", "not_admitted")
    assert len(pit._recent) == 50 and len(pit._until) == 50 and pit.trips == 500
    assert pit.holds("sybil-499") and not pit.holds("sybil-0")  # the oldest were forgotten
    assert all(len(window.times) <= 2 for window in pit._recent.values())


def test_defaults() -> None:
    pit = Tarpit()
    assert (pit.max_refusals, pit.window_s, pit.hold_s) == (DEFAULT_MAX_REFUSALS, DEFAULT_WINDOW_S, DEFAULT_HOLD_S)
    assert (DEFAULT_MAX_REFUSALS, DEFAULT_WINDOW_S, DEFAULT_HOLD_S) == (20, 10.0, 5.0)


def test_host_key_of_multiaddrs() -> None:
    assert host_key("/ip4/203.0.113.7/tcp/4001") == "203.0.113.7"
    assert host_key("/ip4/127.0.0.1/tcp/31337") == "127.0.0.1"
    assert host_key("/ip6/2001:db8:1:2:3:4:5:6/udp/4001/quic") == "2001:db8:1:2::/64"
    assert host_key("/ip6/2001:db8:1:2:ffff::9/tcp/1") == "2001:db8:1:2::/64"  # same /64: same host
    assert host_key("/ip6/::ffff:198.51.100.3/tcp/1") == "198.51.100.3"
    assert host_key("/ip4/198.51.100.9/tcp/4001/p2p/QmRelay/p2p-circuit") == "198.51.100.9"  # the relay
    assert host_key("/dns4/example.org/tcp/4001") is None
    assert host_key("/ip4/not-an-ip/tcp/1") is None and host_key("") is None


def test_sybils_of_one_host_share_its_budget_and_its_clean_peers_are_not_held() -> None:
    clock = FakeClock()
    pit = Tarpit(20, 10.0, 5.0, max_host_refusals=40, clock=clock)
    sybils = [f"sybil-{i}" for i in range(16)]
    for peer in [*sybils, "honest-neighbour"]:
        pit.seen(peer, "203.0.113.7")
    pit.seen("elsewhere", "198.51.100.1")
    # 16 identities, each well under its own budget of 20, round robin: 40 refusals pass, the 41st
    # makes the host hot and trips the sybil that earned it.
    refused = 0
    while not pit.hot("203.0.113.7"):
        pit.note(sybils[refused % 16], "unknown_method")
        refused += 1
        clock.now += 0.01
    assert refused == 41 and pit.hot_hosts == 1 and pit.trips == 1 and pit.host_trips == 1
    # Every other sybil is held at its next refusal: 41 + 15 refusals in all, not 16 x 21 = 336.
    for peer in sybils:
        if not pit.holds(peer):
            assert pit.note(peer, "unknown_method") is True
            refused += 1
    assert refused == 56 and all(pit.holds(p) for p in sybils) and pit.trips == 16
    # The neighbour that is not refused is not held; nor is another host's peer, which keeps its 20.
    assert not pit.holds("honest-neighbour") and not pit.hot("198.51.100.1")
    for _ in range(20):
        assert not pit.note("elsewhere", "unknown_method")
    assert not pit.holds("elsewhere")
    # Reasons that are not counted do not count against the host either.
    for _ in range(100):
        pit.note("honest-neighbour", "busy")
    assert not pit.holds("honest-neighbour")
    # One window after it became hot, the host's peers get their own budget again.
    clock.now += 10.01
    assert not pit.hot("203.0.113.7") and not pit.holds("sybil-0")
    assert not any(pit.note("honest-neighbour", "truncated") for _ in range(20))


def test_a_peer_of_unknown_host_and_a_host_budget_of_zero_keep_the_per_peer_budget() -> None:
    clock = FakeClock()
    pit = Tarpit(20, 10.0, 5.0, max_host_refusals=0, clock=clock)
    for i in range(50):
        pit.seen(f"s{i}", "203.0.113.7")
        assert not pit.note(f"s{i}", "malformed")
    assert pit.hot_hosts == 0 and pit.trips == 0
    pit = Tarpit(20, 10.0, 5.0, clock=clock)
    pit.seen("p", "203.0.113.7")
    pit.seen("p", None)  # its latest stream named no IP: the host is forgotten
    assert pit.host_of("p") is None
    assert [pit.note("p", "malformed") for _ in range(21)] == [False] * 20 + [True]
    with pytest.raises(ValueError, match="max_host_refusals >= 0"):
        Tarpit(20, 10.0, 5.0, max_host_refusals=-1)
    assert DEFAULT_MAX_HOST_REFUSALS == 2 * DEFAULT_MAX_REFUSALS == Tarpit().max_host_refusals


def test_host_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarpit_module, "MAX_TRACKED", 50)
    pit, _ = make(max_refusals=20)
    pit.max_host_refusals = 1
    for i in range(500):
        pit.seen(f"p{i}", f"10.0.{i // 256}.{i % 256}")
        pit.note(f"p{i}", "malformed")
        pit.note(f"p{i}", "malformed")
    assert len(pit._host_of) == 50 and len(pit._host_recent) == 50 and len(pit._host_until) == 50
    assert pit.hot_hosts == 500 and pit.host_trips == 500


def test_identities_over_many_hosts_alarm_the_node_and_its_known_peers_keep_their_budget() -> None:
    clock = FakeClock()
    members = {"member-a", "member-b"}
    pit = Tarpit(20, 10.0, 5.0, max_host_refusals=40, max_node_refusals=200, exempt=members.__contains__,
                 clock=clock)
    bots = [f"bot-{i}" for i in range(300)]
    for i, peer in enumerate(bots):
        pit.seen(peer, f"10.0.{i // 256}.{i % 256}")  # one host each: no host ever gets hot
    for peer in members:
        pit.seen(peer, "192.0.2.1")
    # 300 identities of 300 hosts, one refusal each round robin: 200 pass, the 201st alarms the node and
    # trips the bot that earned it; every other bot is held at its next refusal: 200 + 100 in all in the
    # first pass, then the first 200 bots once more, not 300 x 21 = 6,300.
    refused = 0
    for peer in bots:
        pit.note(peer, "unknown_method")
        refused += 1
        clock.now += 0.001
    assert pit.alarmed() and pit.alarms == 1 and pit.hot_hosts == 0
    assert pit.trips == 100 and pit.alarm_trips == 100
    for peer in bots:
        if not pit.holds(peer):
            assert pit.note(peer, "unknown_method") is True
            refused += 1
    assert refused == 500 and all(pit.holds(p) for p in bots) and pit.trips == 300
    # Members, known to the node, keep their own budget while it is alarmed: 20 refusals, held at the 21st.
    assert [pit.note("member-a", "truncated") for _ in range(21)] == [False] * 20 + [True]
    assert not pit.holds("member-b")
    # One window later the alarm is over: an unknown peer gets its own budget again.
    clock.now += 10.01
    assert not pit.alarmed()
    pit.seen("newcomer", "198.51.100.20")
    assert not any(pit.note("newcomer", "malformed") for _ in range(20))
    # 0 turns the node-wide count off; a negative one is refused.
    off = Tarpit(20, 10.0, 5.0, max_node_refusals=0, clock=clock)
    for i in range(500):
        off.seen(f"b{i}", f"10.1.{i // 256}.{i % 256}")
        assert not off.note(f"b{i}", "malformed")
    assert off.alarms == 0 and off.trips == 0
    with pytest.raises(ValueError, match="max_node_refusals >= 0"):
        Tarpit(20, 10.0, 5.0, max_node_refusals=-1)
    assert DEFAULT_MAX_NODE_REFUSALS == 5 * DEFAULT_MAX_HOST_REFUSALS == Tarpit().max_node_refusals
