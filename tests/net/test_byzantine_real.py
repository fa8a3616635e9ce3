"""Real attackers: 5 honest daemons and 1 daemon running the ``scaled`` attack, on 127.0.0.1 (hivemind DHT
and libp2p per node), gossip on digits. With ``flag`` over the robust window the honest nodes learn
(accuracy >= 0.85); with ``mean`` the attacker wrecks them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from netutil import NetworkGuard, RealSwarm
from p2pnode.cli.options import byzantine_settings, parse_params
from p2pnode.config import NodeConfig
from p2pnode.daemon.settings import DaemonSettings

pytestmark = [pytest.mark.network, pytest.mark.slow]

HONEST = 5


async def _swarm(rule: str, rounds: int) -> tuple[list[float], Any]:
    """Final accuracies of the honest nodes, and the attacker node (after shutdown). With a robust rule,
    checks that the honest nodes that scored the attacker rank it as their most suspicious peer."""

    def config(i: int, initial: list[str]) -> NodeConfig:
        return NodeConfig(run_id=f"byz-{rule}", seed=5, shard=(i, HONEST + 1), device="cpu", initial_peers=initial,
                          exchange_timeout_s=10.0, announce_ttl_s=20.0, local_steps=40, rule=rule,
                          attack="scaled" if i == HONEST else None)

    # No state sync: every node starts at round 0 together, in lockstep.
    async with RealSwarm(HONEST + 1, config, settings=DaemonSettings(sync_on_join=False)) as swarm:
        nodes = swarm.nodes
        for _ in range(rounds):
            await asyncio.gather(*(n.run_round() for n in nodes))
        honest = nodes[:HONEST]
        accs = [n.last_report.accuracy for n in honest]
        attacker = nodes[HONEST]
        if rule != "mean":
            # Mean over the honest nodes that scored each peer: the attacker is the most suspicious.
            totals: dict[str, list[float]] = {}
            for n in honest:
                for peer, score in n.suspicion().items():
                    totals.setdefault(peer, []).append(score)
            mean = {p: sum(v) / len(v) for p, v in totals.items()}
            assert max(mean, key=mean.__getitem__) == attacker.peer_id, mean
        return accs, attacker


async def test_flag_over_the_robust_window_resists_a_real_scaled_attacker(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2pnode.daemon.node")
    with NetworkGuard() as guard:
        accs, attacker = await _swarm("flag", rounds=10)
        assert all(a is not None and a >= 0.85 for a in accs), accs
        assert attacker.protocol.hooks.attacker.forged >= 10
        # The attacker says so, loudly, at start and every round.
        loud = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ATTACKER")]
        assert any("runs the scaled attack" in m for m in loud) and len(loud) >= 11
        accs_mean, _ = await _swarm("mean", rounds=6)
        assert sum(a or 0.0 for a in accs_mean) / HONEST < 0.85, accs_mean
        assert not all(a is not None and a >= 0.85 for a in accs_mean), accs_mean
    assert not guard.leaked_processes, guard.leaked_processes


def test_run_options_make_an_attacker_config() -> None:
    kw = {"attack": "scaled", "attack_params": ("factor=10",), "robust_window": 3, "exclude_suspects": True,
          "suspect_threshold": 2.0, "suspicion_decay": 0.5}
    cfg = NodeConfig(**byzantine_settings(kw)).validate()
    assert cfg.attack == "scaled" and cfg.attack_params == parse_params(("factor=10",)) == {"factor": 10}
    assert cfg.robust_window == 3 and cfg.exclude_suspects and cfg.suspect_threshold == 2.0
