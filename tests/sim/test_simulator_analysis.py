"""Measurements on simulation results: rounds to a target accuracy and the recorded weight variance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from p2pnode.cli.main import cli
from simulator import SimConfig, run_simulation
from simulator.analysis import layer_variance, rounds_to_target, time_to_target

ROWS = [
    {"round": 1, "time_s": 0.5, "accuracy": 0.40},
    {"round": 2, "time_s": 1.0, "accuracy": None},
    {"round": 3, "time_s": 1.5, "accuracy": 0.86},
    {"round": 4, "time_s": 2.0, "accuracy": 0.84},
    {"round": 5, "time_s": 2.5, "accuracy": 0.90},
]


def test_rounds_to_target_is_the_first_crossing() -> None:
    assert rounds_to_target(ROWS, 0.85) == 3  # the later dip below the target does not matter
    assert rounds_to_target(ROWS, 0.86) == 3  # >=, not >
    assert rounds_to_target(ROWS, 0.40) == 1
    assert rounds_to_target(ROWS, 0.95) is None
    assert rounds_to_target([], 0.5) is None
    assert time_to_target(ROWS, 0.88) == 2.5


def test_rounds_to_target_skips_rows_without_accuracy() -> None:
    assert rounds_to_target([{"round": 1, "time_s": 0.1, "accuracy": None}], 0.0) is None


def test_layer_variance_is_the_mean_population_variance() -> None:
    a = {"w": torch.tensor([[1.0, -1.0], [1.0, -1.0]]), "b": torch.tensor([1.0, 3.0]), "one": torch.tensor([5.0]),
         "count": torch.tensor([1, 2, 3])}
    b = {"w": torch.tensor([[2.0, -2.0], [2.0, -2.0]]), "b": torch.tensor([0.0, 0.0]), "one": torch.tensor([7.0]),
         "count": torch.tensor([4, 5, 6])}
    # Var(w_a) = 1, Var(w_b) = 4, Var(b_a) = 1, Var(b_b) = 0; one-element and integer entries are left out.
    assert layer_variance([a, b]) == {"w": 2.5, "b": 0.5}
    assert list(layer_variance([a, b])) == ["w", "b"]
    assert layer_variance([]) == {}


def test_averaging_independent_models_shrinks_the_variance() -> None:
    gen = torch.Generator().manual_seed(0)
    models = [{"w": torch.randn(64, 64, generator=gen)} for _ in range(16)]
    mean = {"w": torch.stack([m["w"] for m in models]).mean(0)}
    assert layer_variance(models)["w"] == pytest.approx(1.0, rel=0.05)
    assert layer_variance([mean])["w"] == pytest.approx(1.0 / 16, rel=0.1)


def test_record_variance_adds_only_the_variance() -> None:
    base = SimConfig.of(nodes=6, rounds=3, seed=4, init="independent", rule="vca", local_steps=2)
    plain = run_simulation(base)
    recorded = run_simulation(base.replace(record_variance=True))
    assert "record_variance" not in plain["config"] and recorded["config"]["record_variance"] is True
    for p_row, r_row in zip(plain["rounds"], recorded["rounds"], strict=True):
        lv = r_row.pop("layer_variance")
        assert p_row == r_row  # recording does not change the run
        assert list(lv) == ["1.weight", "1.bias", "3.weight", "3.bias"]
        assert all(v > 0 for v in lv.values())
    assert "layer_variance" not in plain["rounds"][0]


def test_record_variance_from_the_cli_and_in_fl(tmp_path: Path) -> None:
    out = tmp_path / "fl.json"
    result = CliRunner().invoke(cli, ["sim", "--nodes", "5", "--rounds", "2", "--topology", "fl", "--sample-size", "4",
                                      "--local-steps", "2", "--record-variance", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rounds"]
    assert len(rows) == 2 and all(set(r["layer_variance"]) == {"1.weight", "1.bias", "3.weight", "3.bias"}
                                  for r in rows)
