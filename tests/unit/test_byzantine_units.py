"""Units of the Byzantine machinery: suspicion scores, the attacker's forging, the gossip window, config."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from p2pnode.config import NodeConfig
from p2pnode.errors import AggregationError, ConfigError
from p2pnode.protocols.adversary import Attacker, HonestBoard, flatten, unflatten
from p2pnode.protocols.gossip import GossipProtocol, default_window
from p2pnode.protocols.suspicion import SuspicionTracker, deviations, state_distance
from p2pnode.transport.clock import run_virtual
from simutil import make_group, running_group

# -- suspicion ------------------------------------------------------------------------------------------


def test_deviation_is_two_sided_log_ratio_to_the_median() -> None:
    d = deviations([1.0, 1.0, 2.0, 0.5, 100.0, 0.0])
    # median of the six is 1.0
    assert d[0] == d[1] == 0.0
    assert d[2] == pytest.approx(math.log(2)) and d[3] == pytest.approx(math.log(2))
    assert d[4] == pytest.approx(math.log(100))  # below the cap of 5
    assert d[5] == 5.0  # exactly at the aggregate: as suspicious as it gets (capped)


def test_deviation_cap_and_degenerate_median() -> None:
    assert deviations([1.0, 1.0, 1e9], cap=5.0)[2] == 5.0
    assert deviations([0.0, 0.0, 3.0]) == [0.0, 0.0, 5.0]
    assert deviations([]) == []


def test_score_is_an_exponential_moving_average_over_observations() -> None:
    t = SuspicionTracker(decay=0.5)
    # own model at distance 1 keeps the median at 1
    t.observe({"a": 1.0, "b": math.e}, others=[1.0])
    assert t.score("a") == 0.0 and t.score("b") == pytest.approx(1.0)
    t.observe({"b": 1.0}, others=[1.0, 1.0])
    assert t.score("b") == pytest.approx(0.5)  # 0.5 * 1 + 0.5 * 0
    assert t.observations("b") == 2 and t.score("zzz") is None
    assert t.suspects(0.4) == {"b"}
    assert t.top(1) == [("b", pytest.approx(0.5))]


def test_tracker_forgets_least_recently_observed_beyond_capacity() -> None:
    t = SuspicionTracker(max_peers=2)
    t.observe({"a": 1.0}, [1.0])
    t.observe({"b": 1.0}, [1.0])
    t.observe({"a": 1.0}, [1.0])
    t.observe({"c": 1.0}, [1.0])
    assert set(t.scores()) == {"a", "c"}
    with pytest.raises(ValueError):
        SuspicionTracker(decay=1.0)


def test_state_distance() -> None:
    a = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([0.0])}
    assert state_distance(a, b) == pytest.approx(5.0)


# -- attacker -------------------------------------------------------------------------------------------


def _state(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values[:-1]), "b": torch.tensor(values[-1:])}


def test_flatten_round_trip() -> None:
    s = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float64)}
    back = unflatten(flatten(s), s)
    assert torch.equal(back["w"], s["w"]) and back["b"].dtype == torch.float64


def test_scaled_forges_reference_plus_boosted_own_update() -> None:
    ref, trained = _state(1.0, 1.0, 1.0), _state(1.5, 0.0, 1.0)
    forged = run_virtual(Attacker("scaled", {"factor": 10}).forge(0, ref, trained))
    assert torch.allclose(flatten(forged), torch.tensor([6.0, -9.0, 1.0]))


def test_daemon_attacker_uses_the_models_it_received() -> None:
    ref, trained, seen = _state(0.0, 0.0, 0.0), _state(1.0, 0.0, 0.0), _state(0.0, 1.0, 0.0)
    forged = run_virtual(Attacker("sign_flip").forge(0, ref, trained, [seen]))
    assert torch.allclose(flatten(forged), torch.tensor([-0.5, -0.5, 0.0]))


def test_omniscient_attacker_reads_the_honest_updates_of_its_round() -> None:
    board = HonestBoard(settle_s=0.0)
    ref = _state(0.0, 0.0, 0.0)
    board.hook("h1")(3, ref, _state(2.0, 0.0, 0.0))
    board.hook("h2")(3, ref, _state(0.0, 2.0, 0.0))
    board.hook("h3")(2, ref, _state(9.0, 9.0, 9.0))  # another round: not used
    att = Attacker("ipm", {"epsilon": 1.0}, peer_id="x", oracle=board.updates)
    forged = run_virtual(att.forge(3, ref, _state(5.0, 5.0, 5.0)))
    assert torch.allclose(flatten(forged), torch.tensor([-1.0, -1.0, 0.0]))
    assert att.forged == 1


def test_alie_default_z_uses_the_run_population() -> None:
    board = HonestBoard(settle_s=0.0)
    ref = _state(0.0, 0.0)
    for i, v in enumerate([0.0, 2.0]):
        board.hook(f"h{i}")(0, ref, _state(v, 0.0))
    att = Attacker("alie", peer_id="x", population=20, colluders=4, oracle=board.updates)
    forged = run_virtual(att.forge(0, ref, ref))
    # mean 1, sample std sqrt(2); z = Phi^-1(13/20)
    from statistics import NormalDist

    z = NormalDist().inv_cdf(13 / 20)
    assert float(flatten(forged)[0]) == pytest.approx(1.0 - z * math.sqrt(2), rel=1e-5)


def test_label_flip_sends_the_trained_model_and_maps_labels() -> None:
    att = Attacker("label_flip")
    assert not att.model_attack
    trained = _state(1.0, 2.0)
    assert run_virtual(att.forge(0, _state(0.0, 0.0), trained)) == trained
    fn = att.label_map(10)
    assert fn is not None and fn(torch.tensor([0, 9, 3])).tolist() == [9, 0, 6]
    assert Attacker("scaled").label_map(10) is None


def test_unknown_attack_or_parameter_is_refused() -> None:
    with pytest.raises(AggregationError, match="unknown attack"):
        Attacker("nope")
    with pytest.raises(AggregationError, match="unknown parameter"):
        Attacker("scaled", {"scale": 3})


def test_config_validation() -> None:
    assert NodeConfig(attack="scaled", attack_params={"factor": 5}).validate().attack == "scaled"
    with pytest.raises(ConfigError, match="attack='nope' is unknown"):
        NodeConfig(attack="nope").validate()
    with pytest.raises(ConfigError, match="without an attack"):
        NodeConfig(attack_params={"factor": 5}).validate()
    with pytest.raises(ConfigError, match="not parameters of scaled"):
        NodeConfig(attack="scaled", attack_params={"z": 1}).validate()
    with pytest.raises(ConfigError, match="robust_window"):
        NodeConfig(robust_window=0).validate()
    with pytest.raises(ConfigError, match="needs topology gossip"):
        NodeConfig(topology="modest", robust_window=2).validate()
    with pytest.raises(ConfigError, match="dpsgd does not score"):
        NodeConfig(topology="dpsgd", exclude_suspects=True).validate()
    with pytest.raises(ConfigError, match="suspicion_decay"):
        NodeConfig(suspicion_decay=1.0).validate()
    # Local settings: an attacker's config hash equals an honest node's, so peers cannot tell them apart.
    assert NodeConfig(attack="scaled", robust_window=3).config_hash == NodeConfig().config_hash


# -- gossip window --------------------------------------------------------------------------------------


def test_default_window_depends_on_the_rule() -> None:
    assert default_window("mean") == 1 and default_window("vca") == 1
    assert default_window("flag") == 4 and default_window("median") == 4


def test_window_keeps_newest_per_sender_for_the_last_n_merges() -> None:
    async def main() -> None:
        async with running_group(2, rule="median", robust_window=2) as group:
            p = group.nodes[0].protocol
            assert isinstance(p, GossipProtocol)
            m = {k: v.clone() for k, v in p.trainer.state().items()}
            p._keep("a", m)
            p._keep("b", m)
            inputs, fresh = p._take_window()  # merge 0
            assert set(inputs) == {"a", "b"} and fresh == {"a", "b"}
            p._keep("b", m)  # b again: replaces its old entry
            p._keep("c", m)
            inputs, fresh = p._take_window()  # merge 1: a is one merge old, still inside a window of 2
            assert set(inputs) == {"a", "b", "c"} and fresh == {"b", "c"}
            inputs, fresh = p._take_window()  # merge 2: a fell out; b, c are one merge old
            assert set(inputs) == {"b", "c"} and fresh == set()
            inputs, fresh = p._take_window()  # merge 3: nothing new, everything fell out
            assert inputs == {} and fresh == set() and p._window == {}

    run_virtual(main())


@pytest.mark.parametrize(("rule", "needed"), [("flag", 3), ("median", 3), ("krum", 5)])
def test_a_robust_merge_waits_for_enough_inputs_to_tolerate_an_attacker(rule: str, needed: int) -> None:
    # With fewer inputs than the rule needs for f = 1, an attacker's model would be half of the merge (flag
    # with 2 inputs runs with f = 0): the node keeps its own model until the window holds enough.
    async def main() -> None:
        group = await make_group(1, rule=rule)
        p = group.nodes[0].protocol
        assert isinstance(p, GossipProtocol)
        start = {k: v.clone() for k, v in p.trainer.state().items()}
        bad = {k: v * -50.0 for k, v in start.items()}
        senders = {f"peer-{i}": start for i in range(needed - 3)} | {"attacker": bad}
        p._merge(start, senders, set(senders))  # own + needed - 2 others: one input too few
        assert p.last_combined == 1
        assert all(torch.equal(v, start[k]) for k, v in p.trainer.state().items())
        senders = {f"peer-{i}": start for i in range(needed - 2)} | {"attacker": bad}
        p._merge(start, senders, set(senders))  # enough: the rule merges and leaves the attacker out
        assert p.last_combined == needed
        assert max(float((v - start[k]).abs().max()) for k, v in p.trainer.state().items()) < 1e-6
        await group.nodes[0].shutdown()

    run_virtual(main())


def test_window_memory_is_bounded_by_max_inbox() -> None:
    async def main() -> None:
        group = await make_group(1, rule="median")
        p = group.nodes[0].protocol
        assert isinstance(p, GossipProtocol)
        m = p.trainer.state()
        for i in range(p.settings.max_inbox + 5):
            p._keep(f"peer-{i}", m)
        assert len(p._window) == p.settings.max_inbox and "peer-0" not in p._window
        await group.nodes[0].shutdown()

    run_virtual(main())


# -- metrics --------------------------------------------------------------------------------------------


def test_suspicion_is_exported_per_peer_with_capped_cardinality() -> None:
    from p2pnode.daemon.metrics import MAX_SUSPICION_PEERS, parse_exposition

    async def main() -> None:
        async with running_group(3, rule="median") as group:
            await asyncio.gather(*(n.run_round() for n in group.nodes))
            node = group.nodes[0]
            text = node.metrics.exposition().decode()
            scraped = parse_exposition(text)
            peers = [k for k in scraped if k.startswith("p2pnode_peer_suspicion{")]
            assert peers and all('peer="node-' in k for k in peers)
            assert scraped["p2pnode_attacker"] == 0.0
            tracker = node.protocol.suspicion  # type: ignore[attr-defined]
            tracker.observe({f"x{i}": float(i + 1) for i in range(MAX_SUSPICION_PEERS + 10)}, [1.0])
            scraped = parse_exposition(node.metrics.exposition().decode())
            exported = {k: v for k, v in scraped.items() if k.startswith("p2pnode_peer_suspicion{")}
            assert len(exported) == MAX_SUSPICION_PEERS
            assert min(exported.values()) >= sorted(tracker.scores().values())[-MAX_SUSPICION_PEERS]

    run_virtual(main())
