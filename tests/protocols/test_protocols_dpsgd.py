"""D-PSGD: Metropolis-Hastings weights, the communication graphs, the merge step, and a small run."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from p2pnode.aggregation import aggregate_states
from p2pnode.daemon.build import build_trainer
from p2pnode.protocols.base import RoundReport
from p2pnode.protocols.dpsgd import exponential_neighbours, metropolis_hastings, random_regular_graph
from p2pnode.transport.clock import run_virtual
from simulator import SimConfig, run_simulation
from simutil import make_config, running_group

State = dict[str, torch.Tensor]


def test_metropolis_hastings_path_graph_known_answer() -> None:
    # Path 1-2-3 with degrees (1, 2, 1): W = [[2/3, 1/3, 0], [1/3, 1/3, 1/3], [0, 1/3, 2/3]] (algorithms.md 1.3).
    rows = [metropolis_hastings(1, [2]), metropolis_hastings(2, [1, 1]), metropolis_hastings(1, [2])]
    assert rows[0][0] == pytest.approx(2 / 3) and rows[0][1] == [pytest.approx(1 / 3)]
    assert rows[1][0] == pytest.approx(1 / 3) and rows[1][1] == [pytest.approx(1 / 3)] * 2
    x = [0.0, 3.0, 6.0]
    step = [rows[0][0] * x[0] + rows[0][1][0] * x[1],
            rows[1][0] * x[1] + rows[1][1][0] * x[0] + rows[1][1][1] * x[2],
            rows[2][0] * x[2] + rows[2][1][0] * x[1]]
    assert step == [pytest.approx(1.0), pytest.approx(3.0), pytest.approx(5.0)]  # the mean stays 3


def test_one_peer_exponential_graph_is_a_permutation_each_round() -> None:
    n = 100
    hops = math.ceil(math.log2(n))
    for r in range(2 * hops):
        outs = [exponential_neighbours(n, i, r)[0] for i in range(n)]
        ins = [exponential_neighbours(n, i, r)[1] for i in range(n)]
        assert sorted(outs) == list(range(n)) and sorted(ins) == list(range(n))
        assert all(exponential_neighbours(n, outs[i], r)[1] == i for i in range(n))  # i -> j means j <- i
    assert exponential_neighbours(100, 0, 0)[0] == 1 and exponential_neighbours(100, 0, 6)[0] == 64


def test_random_regular_graph_is_simple_regular_and_reproducible() -> None:
    g = random_regular_graph(100, 4, seed=7)
    assert all(len(nb) == 4 and i not in nb for i, nb in enumerate(g))
    assert all(i in g[j] for i, nb in enumerate(g) for j in nb)  # undirected
    assert g == random_regular_graph(100, 4, seed=7) and g != random_regular_graph(100, 4, seed=8)
    with pytest.raises(ValueError):
        random_regular_graph(5, 3, seed=0)  # n * degree odd


@pytest.mark.parametrize(("n", "degree"), [(100, 8), (30, 8), (12, 8), (50, 7), (20, 19)])
def test_dense_regular_graphs_are_drawn_too(n: int, degree: int) -> None:
    # Plain pairing almost never gives a simple graph at degree 8; the edge-swap fallback does.
    g = random_regular_graph(n, degree, seed=3)
    assert all(len(nb) == degree and v not in nb for v, nb in enumerate(g))
    assert all(v in g[u] for v, nb in enumerate(g) for u in nb)
    assert g == random_regular_graph(n, degree, seed=3)
    if degree < n - 1:
        assert g != random_regular_graph(n, degree, seed=4)


@pytest.mark.parametrize("graph", ["exponential", "regular"])
def test_dpsgd_learns_and_sends_the_expected_traffic(graph: str) -> None:
    threads = torch.get_num_threads()
    res = run_simulation(SimConfig.of(nodes=16, rounds=8, seed=0, topology="dpsgd", dpsgd_graph=graph))
    assert torch.get_num_threads() == threads
    rows = res["rounds"]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    # Every node sends one model per out-neighbour every round (headers differ by a few bytes of varint).
    transfers = 16 * (1 if graph == "exponential" else 4)
    model_bytes = 4810 * 4  # digits-mlp: 64*64 + 64 + 64*10 + 10 float32
    assert all(transfers * model_bytes < r["bytes"] < transfers * (model_bytes + 400) for r in rows)


def _pair_round(**overrides: object) -> tuple[list[State], list[RoundReport]]:
    """Two D-PSGD nodes run one round in lockstep: their models and reports."""

    async def main() -> tuple[list[State], list[RoundReport]]:
        async with running_group(2, topology="dpsgd", **overrides) as group:
            reports = await asyncio.gather(*(n.run_round() for n in group.nodes))
            states = [n.trainer.state() for n in group.nodes]
        return states, list(reports)

    return run_virtual(main())


def _trained_by_hand(**overrides: object) -> tuple[list[State], list[State]]:
    """The two nodes' round-start and trained models, computed without the protocol (same data, same steps)."""
    trainers = [build_trainer(make_config(i, 2, topology="dpsgd", **overrides)) for i in range(2)]
    starts = [t.state() for t in trainers]
    for t in trainers:
        t.train(5)
    return starts, [t.state() for t in trainers]


def test_an_update_rule_merges_updates_relative_to_the_round_start() -> None:
    """flag (a rule on updates): x_i <- theta0_i + flag(x_i - theta0_i, x_j - theta0_i), as in gossip and MoDeST."""
    kw: dict[str, object] = {"rule": "flag", "model_seed_mode": "independent"}
    starts, trained = _trained_by_hand(**kw)
    got, reports = _pair_round(**kw)
    assert [r.combined for r in reports] == [2, 2]
    for i in range(2):
        updates = [{k: trained[j][k] - starts[i][k] for k in starts[i]} for j in (i, 1 - i)]
        delta = aggregate_states("flag", updates)
        want = {k: starts[i][k] + delta[k] for k in starts[i]}
        on_models = aggregate_states("flag", [trained[i], trained[1 - i]])
        for k in want:
            torch.testing.assert_close(got[i][k], want[k], rtol=1e-5, atol=1e-6)
        # Flag on the models themselves is another answer: the test tells the two apart.
        assert max(float((on_models[k] - want[k]).abs().max()) for k in want) > 1e-3


def test_a_rule_that_refuses_its_inputs_keeps_the_own_model() -> None:
    """multikrum needs 3 inputs: with one neighbour the node keeps its trained model and reports no merge."""
    _, trained = _trained_by_hand(rule="multikrum")
    got, reports = _pair_round(rule="multikrum")
    assert [(r.combined, r.fraction) for r in reports] == [(1, 0.0), (1, 0.0)]
    for i in range(2):
        for k in trained[i]:
            assert torch.equal(got[i][k], trained[i][k])
