"""Attackers in the simulator: robust rules keep honest accuracy near the clean run, and the suspicion
score ranks the attackers above the honest peers (docs/protocols.md, "Byzantine peers").

Setup of the per-attack checks: 16 nodes of which 3 attack (chosen by the seed), MoDeST (s = 10, a = 1),
rule ``flag``, 10 model versions of digits-mlp, seed 2. Margin: honest accuracy at most `MARGIN` below the
clean run's.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from p2pnode.cli.main import cli
from simulator import SimConfig, run_simulation

#: Largest loss of final honest accuracy against the clean run that a robust rule may show, in [0, 1].
MARGIN = 0.05
NODES, BYZANTINE, ROUNDS, SEED = 16, 3, 10, 2


@cache
def _run(topology: str, rule: str, attack: str | None, **extra: Any) -> dict[str, Any]:
    cfg = SimConfig.of(nodes=NODES, rounds=ROUNDS, topology=topology, rule=rule, seed=SEED,
                       byzantine=BYZANTINE if attack else 0, attack=attack, **extra)
    return run_simulation(cfg)


def _ranked_above(res: dict[str, Any]) -> bool:
    """Every attacker's mean suspicion is above every honest peer's."""
    sus, bad = res["suspicion"], set(res["byzantine"])
    return min(v for p, v in sus.items() if p in bad) > max(v for p, v in sus.items() if p not in bad)


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian", "random", "scaled", "alie", "ipm", "label_flip"])
def test_flag_keeps_modest_near_clean_and_suspicion_ranks_attackers_first(attack: str) -> None:
    clean = _run("modest", "flag", None)["final_accuracy"]
    res = _run("modest", "flag", attack)
    assert len(res["byzantine"]) == BYZANTINE and res["accuracy_over"] == "honest nodes"
    assert res["final_accuracy"] >= clean - MARGIN, (attack, res["final_accuracy"], clean)
    assert _ranked_above(res), res["suspicion"]
    assert res["suspicion_auc"] == 1.0


def test_mean_breaks_under_scaled() -> None:
    clean = _run("modest", "mean", None)["final_accuracy"]
    assert clean >= 0.9
    assert _run("modest", "mean", "scaled")["final_accuracy"] < 0.5


def test_gossip_robust_window_flag_resists_scaled_and_excludes_suspects() -> None:
    clean = _run("gossip", "flag", None)["final_accuracy"]
    res = _run("gossip", "flag", "scaled")
    assert res["final_accuracy"] >= clean - MARGIN
    assert _ranked_above(res)
    assert _run("gossip", "mean", "scaled")["final_accuracy"] < 0.5
    # With --exclude-suspects the honest nodes stop merging the attackers' models once they score above 1.
    ex = _run("gossip", "flag", "scaled", exclude_suspects=True)
    ignored = set().union(*(row.get("ignored", []) for row in ex["rounds"]))
    assert ignored and ignored <= set(ex["byzantine"])
    assert ex["final_accuracy"] >= clean - MARGIN


def test_modest_aggregators_leave_out_suspects_locally() -> None:
    res = _run("modest", "median", "gaussian", exclude_suspects=True)
    ignored = set().union(*(row.get("ignored", []) for row in res["rounds"]))
    assert ignored and ignored <= set(res["byzantine"])
    assert res["final_accuracy"] >= _run("modest", "median", None)["final_accuracy"] - MARGIN


@pytest.mark.parametrize("topology", ["fl", "dpsgd"])
def test_attackers_take_part_in_every_topology(topology: str) -> None:
    res = run_simulation(SimConfig.of(nodes=8, rounds=3, topology=topology, rule="median", seed=1, byzantine=2,
                                      attack="sign_flip", sample_size=4))
    assert len(res["rounds"]) == 3 and len(res["byzantine"]) == 2
    if topology == "fl":
        assert "node-0000" not in res["byzantine"]  # the server is the reference, never an attacker
    assert res["final_accuracy"] is not None


def test_cli_sim_records_attackers_in_the_results(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["sim", "--nodes", "6", "--rounds", "2", "--seed", "4", "--rule", "median", "--byzantine", "2",
            "--attack", "scaled", "--attack-param", "factor=10", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "byzantine=2 attack=scaled" in result.output
    data = json.loads(out.read_text())
    assert data["config"]["byzantine"] == 2 and data["config"]["attack"] == "scaled"
    assert data["config"]["attack_params"] == {"factor": 10}
    assert data["byzantine"] == SimConfig.of(nodes=6, seed=4, byzantine=2, attack="scaled").byzantine_indices_ids()
    assert data["accuracy_over"] == "honest nodes"


def test_cli_sim_refuses_byzantine_without_attack() -> None:
    result = CliRunner().invoke(cli, ["sim", "--nodes", "4", "--byzantine", "1", "--quiet"])
    assert result.exit_code == 2 and "needs an attack" in result.output
    result = CliRunner().invoke(cli, ["sim", "--nodes", "4", "--byzantine", "4", "--attack", "ipm", "--quiet"])
    assert result.exit_code == 2 and "at least one honest" in result.output


def test_attackers_forge_under_secure_aggregation_too() -> None:
    """Masking hides an update, it does not vet it: a scaled attacker wrecks the secure mean."""
    res = run_simulation(SimConfig.of(nodes=12, rounds=4, topology="modest", secagg=True, seed=1, sample_size=6,
                                      byzantine=2, attack="scaled"))
    assert res["final_accuracy"] is not None and res["final_accuracy"] < 0.5


def test_cli_refuses_an_unknown_attack() -> None:
    result = CliRunner().invoke(cli, ["sim", "--nodes", "4", "--byzantine", "1", "--attack", "nope", "--quiet"])
    assert result.exit_code == 2 and "attack='nope' is unknown" in result.output
