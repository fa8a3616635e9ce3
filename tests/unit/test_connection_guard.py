"""The connection guard's classification and caps (`connection_guard.plan_drops`, `ConnectionGuard.known`):
which connected peers are outsiders, and which of them are dropped, why and in what order."""

from __future__ import annotations

from hivemind.p2p import P2P

from p2pnode.transport.connection_guard import (
    HOST_CAP,
    KNOWN_TTL_S,
    NOT_ADMITTED,
    TOTAL_CAP,
    Connection,
    ConnectionGuard,
    Drop,
    plan_drops,
)
from p2pnode.transport.tarpit import Tarpit, host_key


def conns(host: str, peers: range | list[int], prefix: str = "p") -> list[Connection]:
    return [Connection(f"{prefix}{i}", host) for i in peers]


def reasons(drops: list[Drop]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in drops:
        out[d.reason] = out.get(d.reason, 0) + 1
    return out


def test_outsiders_of_one_host_beyond_the_cap_are_dropped_newest_first_and_known_peers_never() -> None:
    # 8 outsiders and 3 members, all on 127.0.0.1: members are not counted, the 4 newest outsiders go.
    connections = conns("127.0.0.1", range(8)) + conns("127.0.0.1", range(3), prefix="m")
    first_seen = {f"p{i}": float(i) for i in range(8)}
    drops = plan_drops(connections, known=lambda p: p.startswith("m"), first_seen=first_seen, now=10.0,
                       max_per_host=4, max_outsiders=64)
    assert [d.peer_id for d in drops] == ["p7", "p6", "p5", "p4"]
    assert {d.reason for d in drops} == {HOST_CAP} and {d.host for d in drops} == {"127.0.0.1"}


def test_each_host_has_its_own_cap_and_a_peer_with_two_connections_counts_once() -> None:
    connections = conns("10.0.0.1", range(4)) + conns("10.0.0.2", range(4, 10)) + [Connection("p0", "10.0.0.1")]
    drops = plan_drops(connections, known=lambda p: False, first_seen={}, now=0.0, max_per_host=4,
                       max_outsiders=0)
    assert reasons(drops) == {HOST_CAP: 2}
    assert {d.host for d in drops} == {"10.0.0.2"}


def test_the_total_cap_drops_hot_hosts_first() -> None:
    # 3 hosts of 3 outsiders each (under the per-host cap); 6 allowed in all: the hot host's 3 go.
    connections = conns("10.0.0.1", range(3)) + conns("10.0.0.2", range(3, 6)) + conns("10.0.0.3", range(6, 9))
    first_seen = {f"p{i}": float(i) for i in range(9)}
    drops = plan_drops(connections, known=lambda p: False, first_seen=first_seen, now=10.0, max_per_host=4,
                       max_outsiders=6, hot=lambda h: h == "10.0.0.1")
    assert reasons(drops) == {TOTAL_CAP: 3}
    assert {d.host for d in drops} == {"10.0.0.1"}
    # Not hot: the newest three, whatever their host.
    drops = plan_drops(connections, known=lambda p: False, first_seen=first_seen, now=10.0, max_per_host=4,
                       max_outsiders=6)
    assert [d.peer_id for d in drops] == ["p8", "p7", "p6"]


def test_within_a_host_tarpitted_and_previously_dropped_peers_go_first() -> None:
    connections = conns("127.0.0.1", range(6))
    first_seen = {f"p{i}": float(i) for i in range(6)}
    drops = plan_drops(connections, known=lambda p: False, first_seen=first_seen, now=10.0, max_per_host=4,
                       max_outsiders=0, held=lambda p: p == "p0", dropped_before=lambda p: p == "p1")
    assert [d.peer_id for d in drops] == ["p0", "p1"]


def test_under_admission_unknown_peers_past_the_grace_are_dropped() -> None:
    connections = conns("10.0.0.1", range(3)) + conns("10.0.0.2", [3])
    first_seen = {"p0": 0.0, "p1": 25.0, "p2": 0.0, "p3": 0.0}
    drops = plan_drops(connections, known=lambda p: p == "p2", first_seen=first_seen, now=30.0, max_per_host=4,
                       max_outsiders=64, admission_grace_s=30.0)
    assert sorted((d.peer_id, d.reason) for d in drops) == [("p0", NOT_ADMITTED), ("p3", NOT_ADMITTED)]
    # Without admission nobody is dropped: all are under the caps.
    assert plan_drops(connections, known=lambda p: p == "p2", first_seen=first_seen, now=30.0, max_per_host=4,
                      max_outsiders=64) == []


def test_peers_without_an_ip_count_only_against_the_total() -> None:
    connections = [Connection(f"p{i}", None) for i in range(6)]
    assert plan_drops(connections, known=lambda p: False, first_seen={}, now=0.0, max_per_host=2,
                      max_outsiders=0) == []
    assert reasons(plan_drops(connections, known=lambda p: False, first_seen={}, now=0.0, max_per_host=2,
                              max_outsiders=5)) == {TOTAL_CAP: 1}


def test_hosts_are_keyed_like_the_tarpit() -> None:
    assert host_key("/ip6/2001:db8:1:2:3:4:5:6/tcp/1") == host_key("/ip6/2001:db8:1:2:ffff::1/tcp/9")
    connections = [Connection(f"p{i}", host_key(f"/ip6/2001:db8:1:2::{i + 1}/tcp/4001")) for i in range(5)]
    assert reasons(plan_drops(connections, known=lambda p: False, first_seen={}, now=0.0, max_per_host=4,
                              max_outsiders=0)) == {HOST_CAP: 1}


def test_known_peers_are_members_bootstrap_dht_and_recently_served_ones() -> None:
    now = [0.0]
    tarpit = Tarpit()

    def p2p() -> P2P:
        raise AssertionError("not called")

    guard = ConnectionGuard(p2p, lambda *a: None, tarpit, clock=lambda: now[0])
    guard.bootstrap = frozenset({"boot"})
    guard._members_view = frozenset({"member"})
    guard._dht_view = frozenset({"dht"})
    guard.note_known("served")
    assert all(guard.known(p) for p in ("boot", "member", "dht", "served"))
    assert not guard.known("stranger")
    now[0] = KNOWN_TTL_S + 1
    assert not guard.known("served") and guard.known("boot")
