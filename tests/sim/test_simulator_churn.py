"""The simulator with modest, fl and dpsgd, and churn for every topology: crashes, rejoins, results."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from p2pnode.cli.main import cli
from simulator import SimConfig, run_simulation
from simulator.runner import sim_peer_id


def test_modest_100_nodes_80_percent_crash_at_round_10_keeps_learning() -> None:
    res = run_simulation(SimConfig.of(nodes=100, rounds=30, seed=1, topology="modest", sample_size=10,
                                      crash_fraction=0.8, crash_round=10))
    rows = res["rounds"]
    assert [r["round"] for r in rows] == list(range(1, 31)) and not res["stalled"]
    crashed = set(res["crashed"])
    assert len(crashed) == 80
    assert all(r["active_nodes"] == 100 for r in rows[:9]) and all(r["active_nodes"] == 20 for r in rows[9:])
    # Rounds keep completing with live trainers only, and accuracy keeps improving after the crash.
    after = rows[10:]
    assert all(r["participants"] >= 1 and not crashed & set(r["sample"]) for r in after)
    assert all(not crashed & set(r["aggregators"]) for r in after)
    at_crash = rows[9]["accuracy"]
    late = [r["accuracy"] for r in rows[-5:]]
    assert min(late) > at_crash and sum(late) / 5 >= 0.9, ([r["accuracy"] for r in rows], at_crash)
    assert all(r["participants"] == 10 and len(r["sample"]) == 10 for r in rows[:9])
    assert res["protocol_events"]["aggregations"] >= 30


def test_modest_rejoin_brings_nodes_back_into_samples() -> None:
    res = run_simulation(SimConfig.of(nodes=40, rounds=16, seed=2, topology="modest", sample_size=5,
                                      crash_fraction=0.5, crash_round=4, rejoin_round=9, rejoin_fraction=0.5))
    rows = res["rounds"]
    assert len(rows) == 16 and not res["stalled"]
    assert len(res["crashed"]) == 20 and len(res["rejoined"]) == 10
    assert set(res["rejoined"]) <= set(res["crashed"])
    assert rows[2]["active_nodes"] == 40 and rows[3]["active_nodes"] == 20 and rows[-1]["active_nodes"] == 30
    gone = set(res["crashed"]) - set(res["rejoined"])
    assert all(not gone & set(r["sample"]) for r in rows[4:])
    back = set(res["rejoined"])
    assert any(back & set(r["sample"] + r["aggregators"]) for r in rows[9:]), "no returning node was sampled"


def test_fl_keeps_its_server_through_churn() -> None:
    res = run_simulation(SimConfig.of(nodes=30, rounds=8, seed=3, topology="fl", sample_size=5,
                                      crash_fraction=0.5, crash_round=4))
    rows = res["rounds"]
    assert len(rows) == 8 and sim_peer_id(0) not in res["crashed"]
    assert all(r["aggregators"] == [sim_peer_id(0)] for r in rows)
    assert all(sim_peer_id(0) not in r["sample"] for r in rows)


def test_gossip_and_dpsgd_churn_skip_crashed_nodes() -> None:
    for topology in ("gossip", "dpsgd"):
        res = run_simulation(SimConfig.of(nodes=20, rounds=6, seed=4, topology=topology, crash_fraction=0.5,
                                          crash_round=3, rejoin_round=5))
        rows = res["rounds"]
        assert [r["active_nodes"] for r in rows] == [20, 20, 10, 10, 20, 20], topology
        assert [r["participants"] for r in rows] == [20, 20, 10, 10, 20, 20], topology
        assert all(r["accuracy"] is not None for r in rows)
        assert "sample" not in rows[0]


def test_modest_sim_cli_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    runner = CliRunner()
    outs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        result = runner.invoke(cli, ["sim", "--nodes", "30", "--rounds", "6", "--seed", "5", "--topology", "modest",
                                     "--sample-size", "5", "--aggregators", "2", "--success-fraction", "0.8",
                                     "--crash-fraction", "0.3", "--crash-round", "3", "--rejoin-round", "5",
                                     "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    data = json.loads(outs[0])
    row = data["rounds"][0]
    assert set(row) == {"round", "time_s", "accuracy", "loss", "bytes", "bytes_per_node", "active_nodes",
                        "participants", "sample", "aggregators"}
    # Each of the two aggregators combines floor(0.8 * 5) = 4 models; the row holds the union.
    assert row["participants"] == len(row["sample"]) and 4 <= row["participants"] <= 5
    assert 1 <= len(row["aggregators"]) <= 2
    assert data["config"]["sample_size"] == 5 and data["config"]["crash_fraction"] == 0.3
    assert {"crashed", "rejoined", "stalled", "protocol_events"} <= set(data)


def test_bad_modest_options_are_refused_with_the_key_and_allowed_values() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["sim", "--nodes", "4", "--topology", "modest", "--success-fraction", "0",
                                 "--quiet"])
    assert result.exit_code == 2 and "success_fraction=0.0: must be in (0, 1]" in result.output
    result = runner.invoke(cli, ["sim", "--nodes", "4", "--topology", "modest", "--sample-size", "2",
                                 "--aggregators", "3", "--quiet"])
    assert result.exit_code == 2 and "aggregators=3 exceeds sample_size=2" in result.output
    result = runner.invoke(cli, ["sim", "--nodes", "4", "--crash-fraction", "1.5", "--quiet"])
    assert result.exit_code == 2 and "crash_fraction=1.5" in result.output
    result = runner.invoke(cli, ["sim", "--nodes", "4", "--topology", "ring", "--quiet"])
    assert result.exit_code == 2 and "gossip" in result.output and "modest" in result.output
