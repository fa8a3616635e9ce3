"""MoDeST building blocks: sample ordering, population views, the aggregator's once-only completion."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.proto import peer_pb2
from p2pnode.protocols import candidate_order
from p2pnode.protocols.membership import JOIN, LEAVE, Entry, View, from_proto, initial_view
from p2pnode.protocols.modest import UPDATE, AggregationEvent, ModestProtocol, model_digest
from p2pnode.transport import Message
from p2pnode.transport.clock import run_virtual
from simutil import (
    Group,
    make_group,
)

# -- candidate order -----------------------------------------------------------------------------------

#: Known answers, computed once with SHA-256(peer id || "-" || round) (the spec's table is for MD5).
ORDER_KAT = {
    1: ["B", "C", "D", "A", "E"],
    2: ["D", "C", "B", "E", "A"],
    3: ["C", "A", "B", "D", "E"],
}
#: The same ids keyed by b"k" (the anti-grinding key is a model digest in the protocol).
KEYED_KAT = {1: ["C", "B", "D", "A", "E"]}


@pytest.mark.parametrize("round_", sorted(ORDER_KAT))
def test_candidate_order_known_answers(round_: int) -> None:
    assert candidate_order(["A", "B", "C", "D", "E"], round_) == ORDER_KAT[round_]


def test_candidate_order_is_a_pure_function_of_ids_and_round() -> None:
    ids = ["A", "B", "C", "D", "E"]
    shuffled = ["E", "C", "A", "D", "B", "C"]  # order and duplicates do not matter
    assert candidate_order(shuffled, 2) == candidate_order(ids, 2)
    assert candidate_order(ids, 1, key=b"k") == KEYED_KAT[1]
    assert candidate_order(ids, 1, key=b"k") != candidate_order(ids, 1)
    # The definition, spelled out.
    expected = sorted(ids, key=lambda p: hashlib.sha256(b"k" + p.encode() + b"-1").digest())
    assert candidate_order(ids, 1, key=b"k") == expected


def test_model_digest_sees_every_byte_and_name() -> None:
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": torch.zeros(3), "b": torch.ones(2)}
    assert model_digest(a) == model_digest(b)
    b["w"][1] = 1e-30
    assert model_digest(a) != model_digest(b)
    assert model_digest({"v": torch.zeros(3), "b": torch.ones(2)}) != model_digest(a)


# -- population views --------------------------------------------------------------------------------

_entries = st.dictionaries(
    st.sampled_from([f"p{i}" for i in range(6)]),
    st.builds(Entry, st.integers(-1, 20), st.integers(0, 5), st.sampled_from([JOIN, LEAVE])),
    max_size=6,
)


def _view(entries: dict[str, Entry]) -> View:
    v = View("me")
    v.merge(entries)
    return v


@settings(max_examples=200, deadline=None)
@given(_entries, _entries, _entries)
def test_view_merge_is_commutative_associative_idempotent_and_monotone(a: dict[str, Entry], b: dict[str, Entry],
                                                                        c: dict[str, Entry]) -> None:
    ab = _view(a)
    ab.merge(b)
    ba = _view(b)
    ba.merge(a)
    assert ab.entries() == ba.entries()
    again = _view(ab.entries())
    again.merge(b)
    again.merge(a)
    assert again.entries() == ab.entries()  # idempotent
    left = _view(a)
    left.merge(_view(b))
    left.merge(c)
    bc = _view(b)
    bc.merge(c)
    right = _view(a)
    right.merge(bc)
    assert left.entries() == right.entries()  # associative
    for peer, e in a.items():  # never lowers activity, never lowers the membership index
        merged = ab.get(peer)
        assert merged is not None
        assert merged.last_active_round >= e.last_active_round
        assert (merged.index, merged.status) >= (e.index, e.status)


def test_view_merge_rules_from_the_spec() -> None:
    v = View("me")
    v.set("a", Entry(5, 1, JOIN))
    v.merge({"a": Entry(3, 1, LEAVE), "b": Entry(2, 0, JOIN)})  # same index: LEAVE wins (tie rule)
    assert v.get("a") == Entry(5, 1, LEAVE)
    v.merge({"a": Entry(1, 2, JOIN)})  # strictly larger index replaces the status
    assert v.get("a") == Entry(5, 2, JOIN)
    v.merge({"a": Entry(9, 1, LEAVE)})  # smaller index: only the activity moves
    assert v.get("a") == Entry(9, 2, JOIN)
    assert v.get("b") == Entry(2, 0, JOIN)  # unknown peers are adopted as they are


def test_active_set_follows_status_and_inactivity() -> None:
    v = View("me", inactivity_threshold=10)
    v.merge({"a": Entry(0, 0, JOIN), "b": Entry(15, 0, JOIN), "c": Entry(20, 1, LEAVE)})
    assert v.active(10) == ["a", "b", "me"]
    assert v.active(11) == ["b", "me"]  # a: last heard in round 0, threshold 10
    v.heard_from("a", 12)
    assert v.active(20) == ["a", "b", "me"]
    v.heard_from("a", 3)  # never lowers
    assert v.get("a") == Entry(12, 0, JOIN)


def test_a_pending_join_does_not_change_sample_k() -> None:
    v = initial_view("me", [f"p{i}" for i in range(20)])
    before = candidate_order(v.active(7), 7)[:5]
    # A newcomer whose id would be first in the order of round 7.
    newcomer = next(f"x{i}" for i in range(1000) if candidate_order([*v.active(7), f"x{i}"], 7)[0] == f"x{i}")
    v.receive_join(newcomer, Entry(7, 1, JOIN))
    assert newcomer not in v.active(7)
    assert candidate_order(v.active(7), 7)[:5] == before
    assert v.flush_pending() == [newcomer]  # applied at the next model send
    assert candidate_order(v.active(7), 7)[0] == newcomer
    assert v.pending == {}


def test_leave_applies_at_once_and_drops_an_older_pending_join() -> None:
    v = initial_view("me", ["a", "b"])
    v.receive_join("c", Entry(3, 1, JOIN))
    v.receive_leave("c", Entry(3, 2, LEAVE))
    assert v.pending == {}
    assert "c" not in v.active(3)
    v.receive_leave("a", Entry(3, 1, LEAVE))
    assert v.active(3) == ["b", "me"]


def test_views_round_trip_and_malformed_views_are_refused() -> None:
    v = initial_view("me", ["a", "b"], round_=4)
    v.set("b", Entry(9, 3, LEAVE))
    assert from_proto(v.to_proto()) == v.entries()
    assert from_proto(v.to_proto(), max_round=5)["b"].last_active_round == 5  # clamped to the sender's round
    dup = peer_pb2.MembershipView()
    dup.entries.add(peer_id="a")
    dup.entries.add(peer_id="a")
    bad_id = peer_pb2.MembershipView()
    bad_id.entries.add(peer_id="")
    big = peer_pb2.MembershipView()
    big.entries.add(peer_id="a", index=1 << 60)
    for msg in (dup, bad_id, big):
        with pytest.raises(Exception) as err:
            from_proto(msg)
        assert getattr(err.value, "code", None) == "malformed"


# -- the aggregator ------------------------------------------------------------------------------------

def _protocol(node: object) -> ModestProtocol:
    protocol = node.protocol  # type: ignore[attr-defined]
    assert isinstance(protocol, ModestProtocol)
    return protocol


async def _group(count: int, **overrides: object) -> Group:
    kw: dict[str, object] = {"topology": "modest", "sample_size": 4, "aggregation_timeout_s": 5.0,
                             "idle_timeout_s": 5.0}
    kw.update(overrides)
    group = await make_group(count, **kw)
    for node in group.nodes:
        await _protocol(node)._start()
    return group


def _update(node: object, round_: int = 0, **kw: object) -> Message[peer_pb2.ModestUpdate]:
    p = _protocol(node)
    state = p.trainer.state()
    args: dict[str, object] = {"run_id": p.settings.run_id, "config_hash": p.settings.config_hash, "round": round_,
                               "round_estimate": round_, "view": p.view.to_proto(),
                               "base_digest": model_digest(state), "train_loss": 1.0}
    args.update(kw)
    return Message(peer_pb2.ModestUpdate(**args), state)  # type: ignore[arg-type]


def test_aggregator_completes_a_round_exactly_once_and_ignores_late_models() -> None:
    async def main() -> None:
        group = await _group(8)
        agg_node, *trainers = group.nodes
        agg = _protocol(agg_node)
        events: list[AggregationEvent] = []
        agg.hooks.on_aggregate = events.append
        # Six trainers upload at once (threshold 4): one aggregation, every one of them acknowledged.
        acks = await asyncio.gather(*(t.transport.call(agg_node.peer_id, UPDATE, _update(t), peer_pb2.ModestAggAck,
                                                       timeout=30) for t in trainers[:6]))
        assert len(events) == 1 and events[0].index == 1
        assert agg.counters["aggregations"] == 1
        assert all(a.body.success and a.body.reason == "aggregated" for a in acks)
        assert sorted(events[0].contributors) == sorted(t.peer_id for t in trainers[:6])
        assert len(events[0].sample) == 4 and len(set(events[0].sample)) == 4
        assert agg.core.completed_index == 1
        # A late model for the completed index: refused as late, nothing changes.
        late = await trainers[6].transport.call(agg_node.peer_id, UPDATE, _update(trainers[6]),
                                                peer_pb2.ModestAggAck, timeout=30)
        assert not late.body.success and late.body.reason == "late"
        assert agg.counters["aggregations"] == 1 and agg.counters["late"] == 1
        assert len(events) == 1

    run_virtual(main())


def test_trainers_take_only_the_newest_model() -> None:
    async def main() -> None:
        group = await _group(3)
        p = _protocol(group.nodes[0])
        from p2pnode.protocols.modest import _Incoming

        state = p.trainer.state()
        assert p._offer(_Incoming(5, state, {}, "x"))
        assert not p._offer(_Incoming(5, state, {}, "y"))  # duplicate of the same round from a second aggregator
        assert not p._offer(_Incoming(4, state, {}, "z"))  # older
        assert p._offer(_Incoming(6, state, {}, "w"))
        inbox = p.trainer_role.inbox
        assert inbox is not None and inbox.round == 6 and inbox.sender == "w"

    run_virtual(main())


def test_availability_skips_dead_candidates_in_order() -> None:
    async def main() -> None:
        group = await _group(10, ping_timeout_s=2.0)
        prober = _protocol(group.nodes[0])
        order = [p for p in candidate_order(prober.view.active(3), 3) if p != prober.me]
        for dead in order[:2]:
            group.network.crash(dead)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        found = await prober.sampler.available(3, 3, b"", exclude={prober.me})
        assert found == order[2:5]
        assert 2.0 <= loop.time() - t0 < 3.0  # one ping timeout, the replacements pinged in parallel
        # Failed candidates are in back-off: skipped without a ping next time.
        t0 = loop.time()
        assert await prober.sampler.available(3, 3, b"", exclude={prober.me}) == order[2:5]
        assert loop.time() - t0 < 0.5

    run_virtual(main())


@pytest.mark.parametrize("case,reason", [
    ("bad_shape", "bad_shape"), ("nan", "non_finite"), ("wrong_run", "wrong_run"), ("bad_view", "malformed"),
    ("outer", "bad_shape"), ("huge_round", "malformed"),
])
def test_bad_updates_are_refused_and_counted(case: str, reason: str) -> None:
    async def main() -> None:
        group = await _group(3)
        victim, rogue = group.nodes[0], group.nodes[1]
        msg = _update(rogue)
        first = next(iter(msg.tensors))
        if case == "bad_shape":
            msg.tensors[first] = torch.zeros(2, 2)
        elif case == "nan":
            msg.tensors[first] = torch.full_like(msg.tensors[first], float("nan"))
        elif case == "wrong_run":
            msg.body.run_id = "other"
        elif case == "bad_view":
            msg.body.view.entries.add(peer_id=msg.body.view.entries[0].peer_id)
        elif case == "outer":
            msg.tensors["outer/steps"] = torch.tensor([1])
        elif case == "huge_round":
            msg.body.round = 1 << 50
        from p2pnode.errors import RemoteError

        with pytest.raises(RemoteError) as err:
            await rogue.transport.call(victim.peer_id, UPDATE, msg, peer_pb2.ModestAggAck, timeout=5)
        assert err.value.code == reason
        assert victim.transport.stats.rejected[reason] == 1
        assert not _protocol(victim).core.aggregations  # nothing was opened

    run_virtual(main())


def test_forged_leave_about_a_live_node_is_refuted() -> None:
    async def main() -> None:
        group = await _group(3)
        p = _protocol(group.nodes[0])
        forged = p.view.to_proto()
        for e in forged.entries:
            if e.peer_id == p.me:
                e.index, e.status = 7, LEAVE
        p.membership.merge_view(forged, 0)
        mine = p.view.get(p.me)
        assert mine is not None and mine.status == JOIN and mine.index == 8

    run_virtual(main())


def test_random_sample_sizes_stay_within_bounds() -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [f"n{i}" for i in range(rng.randint(1, 30))]
        order = candidate_order(ids, rng.randint(0, 100))
        assert sorted(order) == sorted(ids)
