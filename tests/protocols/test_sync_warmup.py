"""The synchronisation warm-up (``--sync-warmup-steps S --sync-warmup-local-steps H0``): the first S local steps
of a run go in rounds of H0, then rounds of ``local_steps``, on every topology, in the simulator and on a
resumed node (docs/protocols.md, "DiLoCo on each topology")."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json

import pytest
import torch
from click.testing import CliRunner

from p2pnode.cli.main import cli
from p2pnode.config import NodeConfig
from p2pnode.daemon.trainer_state import capture, restore
from p2pnode.errors import ConfigError
from p2pnode.protocols.base import State
from p2pnode.protocols.dpsgd import DpsgdProtocol
from p2pnode.protocols.gossip import GossipProtocol
from p2pnode.protocols.modest import ModestProtocol
from p2pnode.protocols.modest.combine import outer_step
from p2pnode.protocols.modest.settings import ModestSettings
from p2pnode.protocols.modest.state import Base, Incoming
from p2pnode.transport.clock import run_virtual
from simulator import SimConfig, run_simulation
from simutil import max_state_diff, running_group

# 4 warm-up steps in rounds of 2, then rounds of 6: rounds 0 and 1 train 2 steps, the others 6.
WARMUP = {"local_steps": 6, "sync_warmup_steps": 4, "sync_warmup_local_steps": 2}


@pytest.mark.parametrize("topology", ["gossip", "dpsgd"])
def test_lockstep_rounds_train_the_warmup_then_local_steps(topology: str) -> None:
    async def main() -> list[list[int]]:
        done: list[list[int]] = []
        async with running_group(3, topology=topology, outer_lr=0.7, **WARMUP) as group:
            for _ in range(4):
                reports = await asyncio.gather(*(n.run_round() for n in group.nodes))
                assert all(r.combined >= 2 for r in reports)  # every round still merges
                done.append([n.trainer.steps_done for n in group.nodes])
        return done

    assert run_virtual(main()) == [[2] * 3, [4] * 3, [10] * 3, [16] * 3]


def test_a_node_resumed_mid_warmup_or_after_it_trains_its_rounds_length() -> None:
    """A checkpoint keeps the round and the step count; the restored node goes on with the schedule."""
    async def main() -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        async with running_group(2, topology="gossip", **WARMUP) as first:
            node = first.nodes[0]
            saved = []
            for _ in range(3):
                await asyncio.gather(*(n.run_round() for n in first.nodes))
                cfg = node.config
                saved.append(capture(node.trainer, round_=node.protocol.round, config_hash=cfg.config_hash,
                                     run_id=cfg.run_id, task=cfg.task))
        for ckpt in saved[:2]:  # after round 0 (mid warm-up) and after round 1 (its end)
            async with running_group(2, topology="gossip", **WARMUP) as again:
                fresh = again.nodes[0]
                restore(fresh.trainer, ckpt)
                fresh.protocol.round = ckpt.round  # as resume_from_checkpoint does
                before = fresh.trainer.steps_done
                await asyncio.gather(*(n.run_round() for n in again.nodes))
                got.append((before, fresh.trainer.steps_done - before))
        return got

    # Resumed at round 1 (2 steps done): one more warm-up round of 2; at round 2 (4 done): rounds of 6.
    assert run_virtual(main()) == [(2, 2), (4, 6)]


def test_gossip_sim_runs_short_rounds_then_long_ones_and_sends_a_round_s_bytes_each() -> None:
    base = {"nodes": 4, "seed": 0, "topology": "gossip", "outer_lr": 0.7, "step_time_ms": 100.0}
    # 30 local steps: plain H = 10 in 3 rounds; with 10 warm-up steps at H0 = 5, 2 + 2 rounds.
    plain = run_simulation(SimConfig.of(**base, rounds=3, local_steps=10))
    warm = run_simulation(SimConfig.of(**base, rounds=4, local_steps=10, sync_warmup_steps=10,
                                       sync_warmup_local_steps=5))
    assert warm["config"]["sync_warmup_steps"] == 10 and warm["config"]["sync_warmup_local_steps"] == 5
    assert "sync_warmup_steps" not in plain["config"]
    # Every round every node sends its model once (whatever H): the warm-up's extra round is 4/3 the bytes.
    # (Within a few bytes: the envelopes' varints, which peer is picked.)
    per_round = [r["bytes"] for r in plain["rounds"]] + [r["bytes"] for r in warm["rounds"]]
    assert max(per_round) - min(per_round) < 1e-3 * min(per_round), per_round
    assert warm["total_bytes"] / plain["total_bytes"] == pytest.approx(4 / 3, rel=1e-3)
    # Virtual time: 100 ms per local step, so the short rounds take about half as long as the long ones.
    t = [0.0] + [r["time_s"] for r in warm["rounds"]]
    lengths = [b - a for a, b in itertools.pairwise(t)]
    assert 0.5 <= lengths[0] < 0.8 and 0.5 <= lengths[1] < 0.8, lengths
    assert 1.0 <= lengths[2] < 1.3 and 1.0 <= lengths[3] < 1.3, lengths
    assert warm["rounds"][-1]["accuracy"] > 0.6


def test_modest_sim_trains_short_versions_then_long_ones() -> None:
    base = {"nodes": 8, "seed": 0, "topology": "modest", "sample_size": 4, "sample_key": "round",
            "step_time_ms": 100.0, "rounds": 6, "local_steps": 10}
    plain = run_simulation(SimConfig.of(**base))
    warm = run_simulation(SimConfig.of(**base, sync_warmup_steps=6, sync_warmup_local_steps=2))
    assert not warm["stalled"] and len(warm["rounds"]) == 6
    t = [0.0] + [r["time_s"] for r in warm["rounds"]]
    lengths = [b - a for a, b in itertools.pairwise(t)]
    # Versions 0-2 train 2 steps (0.2 s), the later ones 10 (1 s); the rest is the network's time.
    assert max(lengths[1:3]) + 0.6 < min(lengths[4:]), lengths
    # A version's bytes do not depend on its length: the same samples send the same models.
    assert warm["total_bytes"] == pytest.approx(plain["total_bytes"], rel=0.02)


def test_modest_trains_version_k_for_its_length_at_its_start_step() -> None:
    """tiny-lm's learning-rate schedule (a LambdaLR) is put at version k's start step of the swarm."""
    opts = {"size": "tiny", "warmup_steps": 3, "total_steps": 40, "eval_windows": 2}

    async def main() -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        async with running_group(2, topology="modest", task="tiny-lm", task_options=opts, batch_size=2,
                                 local_steps=5, sync_warmup_steps=4, sync_warmup_local_steps=2) as group:
            node = group.nodes[0]
            assert isinstance(node.protocol, ModestProtocol)
            role = node.protocol.trainer_role
            for k in (3, 0, 2, 1):  # any order: the version decides, not the node's own count
                before = node.trainer.steps_done
                await role.train(Incoming(k, node.trainer.state(), {}, group.nodes[1].peer_id))
                assert node.trainer.scheduler is not None
                out.append((k, node.trainer.steps_done - before, node.trainer.scheduler.last_epoch))
        return out

    # Starts 0, 2, 4, 9; lengths 2, 2, 5, 5; the scheduler ends at start + length.
    assert run_virtual(main()) == [(3, 5, 14), (0, 2, 2), (2, 5, 9), (1, 2, 4)]


@pytest.mark.parametrize(("kw", "message"), [
    ({"sync_warmup_steps": 100}, "sync_warmup_steps=100 needs sync_warmup_local_steps"),
    ({"sync_warmup_steps": -1}, "sync_warmup_steps=-1: must be >= 0"),
    ({"sync_warmup_steps": 10, "sync_warmup_local_steps": 0}, "sync_warmup_local_steps=0: must be >= 1"),
])
def test_bad_warmups_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig(**kw).validate()  # type: ignore[arg-type]


def test_the_warmup_is_run_wide_on_every_topology_and_old_hashes_stay() -> None:
    for topology in ("gossip", "dpsgd", "modest", "fl"):
        plain = NodeConfig(topology=topology)
        hashes = {plain.config_hash,
                  NodeConfig(topology=topology, sync_warmup_steps=100, sync_warmup_local_steps=10).config_hash,
                  NodeConfig(topology=topology, sync_warmup_steps=50, sync_warmup_local_steps=10).config_hash,
                  NodeConfig(topology=topology, sync_warmup_steps=100, sync_warmup_local_steps=5).config_hash}
        assert len(hashes) == 4, topology
        # Unset (or H0 alone, which does nothing without S): the hash of a run from before.
        assert NodeConfig(topology=topology, sync_warmup_local_steps=10).config_hash == plain.config_hash
    assert NodeConfig().config_hash == "89aabe327b865323"


def test_warmup_from_flags_and_env(tmp_path: object) -> None:
    args = ["config", "show", "--json", "--sync-warmup-steps", "100"]
    got = CliRunner().invoke(cli, args, env={"P2PNODE_SYNC_WARMUP_LOCAL_STEPS": "10",
                                             "P2PNODE_STATE_DIR": str(tmp_path)}, catch_exceptions=False)
    assert got.exit_code == 0, got.output
    options = json.loads(got.stdout.splitlines()[0])["options"]
    assert (options["sync_warmup_steps"]["value"], options["sync_warmup_steps"]["source"]) == (100, "flag")
    assert (options["sync_warmup_local_steps"]["value"], options["sync_warmup_local_steps"]["source"]) == (10, "env")
    bad = CliRunner().invoke(cli, ["config", "show", "--sync-warmup-steps", "100"],
                             env={"P2PNODE_STATE_DIR": str(tmp_path)})
    assert bad.exit_code == 2 and "needs sync_warmup_local_steps" in bad.output


def _models_and_outer_steps(topology: str, rounds: int, **kw: object) -> tuple[list[list[State]], list[int]]:
    """Each node's model after each of `rounds` lockstep rounds of a 3-node group with `WARMUP`, and the
    outer optimizer's step count of each node at the end (-1: none)."""
    async def main() -> tuple[list[list[State]], list[int]]:
        models: list[list[State]] = []
        async with running_group(3, topology=topology, **WARMUP, **kw) as group:
            for _ in range(rounds):
                await asyncio.gather(*(n.run_round() for n in group.nodes))
                models.append([n.trainer.state() for n in group.nodes])
            protocols = [n.protocol for n in group.nodes]
            assert all(isinstance(p, GossipProtocol | DpsgdProtocol) for p in protocols)
            steps = [p.outer.steps if p.outer is not None else -1 for p in protocols  # type: ignore[union-attr]
                     ]
        return models, steps

    return run_virtual(main())


@pytest.mark.parametrize("topology", ["gossip", "dpsgd"])
def test_plain_warmup_rounds_merge_as_without_outer_step_and_the_momentum_starts_after(topology: str) -> None:
    outer = {"outer_lr": 0.7, "outer_momentum": 0.9}
    none, no_steps = _models_and_outer_steps(topology, 3)
    plain, plain_steps = _models_and_outer_steps(topology, 3, **outer)  # the default
    every, every_steps = _models_and_outer_steps(topology, 3, sync_warmup_outer="outer", **outer)
    reset, reset_steps = _models_and_outer_steps(topology, 3, sync_warmup_outer="reset", **outer)
    diff = [max(max_state_diff(a, b) for a, b in zip(x, y, strict=True)) for x, y in zip(none, plain, strict=True)]
    # The two warm-up rounds: the plain merge, bit for bit; the first long round takes the outer step.
    assert diff[0] == 0.0 and diff[1] == 0.0 and diff[2] > 1e-4, diff
    assert max_state_diff(every[0][0], plain[0][0]) > 1e-4  # ``outer`` steps in the warm-up too
    # reset: the warm-up's outer steps as ``outer``, the momentum forgotten at round 2.
    assert max_state_diff(every[1][0], reset[1][0]) == 0.0 and max_state_diff(every[2][0], reset[2][0]) > 0.0
    assert (no_steps, plain_steps, every_steps, reset_steps) == ([-1] * 3, [1] * 3, [3] * 3, [1] * 3)


def test_modest_aggregator_merges_warmup_versions_plainly_and_steps_after() -> None:
    settings = ModestSettings(run_id="r", config_hash="h", local_steps=6, sync_warmup_steps=4,
                              sync_warmup_local_steps=2, outer_lr=1.0, outer_momentum=0.5)  # plain: the default
    combined = {"w": torch.tensor([0.8])}
    got = []
    outer: State = {}
    for k in range(4):  # versions 0 and 1 trained 2 steps (warm-up), 2 and 3 six
        base = Base(k, b"", {"w": torch.tensor([1.0])}, outer, b"", 1)
        new, outer = outer_step(combined, base, settings)
        got.append((round(float(new["w"]), 6), int(outer["steps"]) if outer else 0))
    # The plain merge (no momentum yet), then Nesterov 0.5 on the pseudo-gradient 0.2 from a fresh buffer.
    assert got == [(0.8, 0), (0.8, 0), (0.7, 1), (0.65, 2)]
    every = dataclasses.replace(settings, sync_warmup_outer="outer")
    assert round(float(outer_step(combined, Base(0, b"", {"w": torch.tensor([1.0])}, {}, b"", 1), every)[0]["w"]),
                 6) == 0.7


def test_sync_warmup_outer_is_run_wide_when_set_and_checked() -> None:
    for topology in ("gossip", "dpsgd", "modest", "fl"):
        warm = {"topology": topology, "sync_warmup_steps": 100, "sync_warmup_local_steps": 10, "outer_lr": 1.0}
        base = NodeConfig(**warm).config_hash  # type: ignore[arg-type]
        assert NodeConfig(**warm, sync_warmup_outer="plain").config_hash == base  # type: ignore[arg-type]
        hashes = {NodeConfig(**warm, sync_warmup_outer=p).config_hash  # type: ignore[arg-type]
                  for p in ("reset", "sgd", "outer")}
        assert len(hashes) == 3 and base not in hashes, topology
    # Without a warm-up the policy is not hashed: those runs keep their hash whatever it says.
    assert NodeConfig().config_hash == "89aabe327b865323"
    assert NodeConfig(sync_warmup_outer="outer").config_hash == "89aabe327b865323"
    with pytest.raises(ConfigError, match="sync_warmup_outer='nesterov'; allowed: outer, reset, sgd, plain"):
        NodeConfig(sync_warmup_outer="nesterov").validate()
