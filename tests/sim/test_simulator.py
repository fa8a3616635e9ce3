"""The simulator runs the daemon's node code on the in-memory network: accuracy, determinism, CLI."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from p2pnode.cli.main import cli
from simulator import SimConfig, run_simulation


def test_64_nodes_gossip_mean_reach_090_on_digits() -> None:
    res = run_simulation(SimConfig.of(nodes=64, rounds=40, seed=1, task="digits-mlp", topology="gossip", rule="mean"))
    rows = res["rounds"]
    assert len(rows) == 40 and all(r["active_nodes"] == 64 for r in rows)
    assert res["final_accuracy"] >= 0.9, [r["accuracy"] for r in rows]
    assert rows[0]["accuracy"] < rows[-1]["accuracy"]
    # Every node pushes its model once per round and gets one back: bytes per round are stable and add up.
    assert res["total_bytes"] == sum(r["bytes"] for r in rows)
    assert all(r["bytes"] > 0 for r in rows)
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0


def test_same_seed_same_json_byte_for_byte(tmp_path: Path) -> None:
    runner = CliRunner()
    outs = []
    for name in ("a.json", "b.json", "c.json"):
        seed = "2" if name != "c.json" else "3"
        out = tmp_path / name
        result = runner.invoke(cli, ["sim", "--nodes", "64", "--rounds", "3", "--seed", seed, "--task",
                                     "digits-mlp", "--topology", "gossip", "--rule", "mean", "--out", str(out),
                                     "--quiet"])
        assert result.exit_code == 0, result.output
        assert "wall_s=" in result.output  # wall-clock time goes to stdout, never into the file
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    data = json.loads(outs[0])
    assert set(data) == {"config", "rounds", "final_accuracy", "total_bytes", "bytes_per_node_per_round",
                         "bytes_by_method"}
    # By method: gossip's exchanges and their answers, largest first; they count every send, until shutdown.
    by_method = data["bytes_by_method"]
    assert list(by_method)[:2] == ["gossip.exchange", "gossip.exchange reply"], by_method
    assert sum(row["bytes"] for row in by_method.values()) >= data["total_bytes"]
    assert all(row["bytes"] == row["tensor_bytes"] + row["envelope_bytes"] for row in by_method.values())
    assert by_method["gossip.exchange"]["tensor_bytes"] > 0.9 * by_method["gossip.exchange"]["bytes"]
    assert set(data["rounds"][0]) == {"round", "time_s", "accuracy", "loss", "bytes", "bytes_per_node", "active_nodes",
                                      "participants"}
    # Bytes sent per round: all nodes' (bytes) and per live node (bytes_per_node), and their mean over the rounds.
    assert all(r["bytes_per_node"] == round(r["bytes"] / 64, 1) for r in data["rounds"])
    assert data["bytes_per_node_per_round"] == round(sum(r["bytes_per_node"] for r in data["rounds"]) / 3, 6)
    assert "KB_per_node_round=" in result.output
    assert "wall" not in outs[0].decode()


def test_plot_is_written(tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    result = CliRunner().invoke(cli, ["sim", "--nodes", "4", "--rounds", "2", "--plot", str(png), "--quiet"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_sim_options_are_refused() -> None:
    result = CliRunner().invoke(cli, ["sim", "--nodes", "4", "--rule", "nope", "--quiet"])
    assert result.exit_code == 2
    assert "rule='nope' is unknown" in result.output
