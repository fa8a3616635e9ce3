"""DiLoCo on every topology: the outer step after gossip and D-PSGD merges, its settings, and compression
in modest/fl (docs/protocols.md, "DiLoCo on each topology"; docs/compression.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from p2pnode.aggregation import aggregate_states
from p2pnode.cli.main import cli
from p2pnode.config import NodeConfig
from p2pnode.daemon.build import build_trainer
from p2pnode.errors import ConfigError
from p2pnode.transport.clock import run_virtual
from simulator import SimConfig, run_simulation
from simutil import make_config, running_group

State = dict[str, torch.Tensor]


def _run_lockstep(count: int, rounds: int, *, combined: list[int] | None = None, **overrides: object) -> list[State]:
    """`count` nodes run `rounds` rounds in lockstep; their final models (`combined` gets every report's count)."""

    async def main() -> list[State]:
        async with running_group(count, **overrides) as group:
            for _ in range(rounds):
                reports = await asyncio.gather(*(n.run_round() for n in group.nodes))
                if combined is not None:
                    combined.extend(r.combined for r in reports)
            states = [n.trainer.state() for n in group.nodes]
        return states

    return run_virtual(main())


@pytest.mark.parametrize(("topology", "rule", "extra"), [
    ("gossip", "mean", {}),
    ("gossip", "median", {}),           # robust: the window of 4 merges, own model kept until it fills
    ("gossip", "trimmed_mean", {"rule_params": {"trim": 1}}),
    ("dpsgd", "mean", {}),              # Metropolis-Hastings weights
    ("dpsgd", "median", {"dpsgd_graph": "regular", "dpsgd_degree": 2}),  # three inputs per merge
])
def test_outer_step_with_lr_1_and_no_momentum_is_the_plain_merge(topology: str, rule: str,
                                                                 extra: dict[str, object]) -> None:
    kw: dict[str, object] = {"topology": topology, "rule": rule, "model_seed_mode": "independent", **extra}
    counts: list[int] = []
    plain = _run_lockstep(5, 4, **kw)
    outer = _run_lockstep(5, 4, combined=counts, outer_lr=1.0, outer_momentum=0.0, **kw)
    want = 2 if extra == {} and topology == "dpsgd" else 3  # the exponential graph: one in-neighbour
    assert max(counts) >= want  # merges happened (for a robust rule: once its window holds enough models)
    for a, b in zip(plain, outer, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), (topology, rule, name)
    # A real outer step composes with the rule and its window: the merges still happen, the models move.
    counts.clear()
    moved = _run_lockstep(5, 4, combined=counts, outer_lr=0.7, outer_momentum=0.9, **kw)
    assert max(counts) >= want
    assert max(float((moved[0][k] - plain[0][k]).abs().max()) for k in plain[0]) > 1e-4


@pytest.mark.parametrize("topology", ["gossip", "dpsgd"])
def test_outer_momentum_on_a_node_pair_matches_the_hand_computation(topology: str) -> None:
    """Two nodes, two rounds, outer_lr 0.7, momentum 0.9 (Nesterov): each node's model is
    theta0 - 0.7 * (delta + 0.9 * buf), delta = theta0 - mean(own trained, peer's trained), buf = delta
    after round 1 and 0.9 * buf + delta after round 2 (dpsgd with two nodes: weights 1/2 and 1/2)."""
    kw: dict[str, object] = {"model_seed_mode": "independent", "local_steps": 5, "lr": 0.2, "topology": topology}
    lr, mu = 0.7, 0.9
    # The same two nodes, computed by hand: same data, same start, the same inner steps.
    alone = [build_trainer(make_config(i, 2, **kw)) for i in range(2)]
    theta0 = [t.state() for t in alone]
    bufs: list[State] = [{}, {}]
    for _ in range(2):
        trained = []
        for t in alone:
            t.train(5)
            trained.append(t.state())
        for i in range(2):
            # Every received copy is the other node's freshly trained model, so the merge is the pair's mean.
            merged = aggregate_states("mean", [trained[i], trained[1 - i]])
            new: State = {}
            for name, start in theta0[i].items():
                delta = start.double() - merged[name].double()
                buf = delta if name not in bufs[i] else mu * bufs[i][name] + delta
                bufs[i][name] = buf
                new[name] = (start.double() - lr * (delta + mu * buf)).to(start.dtype)
            theta0[i] = new
        for i, t in enumerate(alone):
            t.load_state(theta0[i])
    got = _run_lockstep(2, 2, outer_lr=lr, outer_momentum=mu, **kw)
    for i in range(2):
        for name, want in theta0[i].items():
            torch.testing.assert_close(got[i][name], want, rtol=1e-5, atol=1e-6)
    # The outer step moved the pair apart from the plain merge: momentum did something.
    plain = _run_lockstep(2, 2, **kw)
    assert max(float((got[0][k] - plain[0][k]).abs().max()) for k in got[0]) > 1e-3


def test_gossip_with_diloco_learns_digits() -> None:
    """4 gossip nodes, 20 local steps per round, outer Nesterov SGD lr 0.7 / momentum 0.9."""
    res = run_simulation(SimConfig.of(nodes=4, rounds=10, seed=0, topology="gossip", local_steps=20, outer_lr=0.7))
    rows = res["rounds"]
    # Measured 0.93 at round 10 (seed 0); chance is 0.1.
    assert rows[-1]["accuracy"] > 0.8, [r["accuracy"] for r in rows]
    assert res["config"]["outer_lr"] == 0.7
    assert all(r["bytes_per_node"] == pytest.approx(r["bytes"] / 4, abs=1) for r in rows)


def test_dpsgd_with_diloco_learns_digits() -> None:
    res = run_simulation(SimConfig.of(nodes=4, rounds=10, seed=0, topology="dpsgd", local_steps=20, outer_lr=0.7))
    assert res["rounds"][-1]["accuracy"] > 0.8, [r["accuracy"] for r in res["rounds"]]


def test_no_outer_lr_keeps_the_results_and_the_config_record() -> None:
    cfg = SimConfig.of(nodes=3, rounds=2, seed=1, topology="gossip")
    res = run_simulation(cfg)
    assert not {"outer_momentum", "outer_nesterov", "compression"} & set(res["config"])
    again = run_simulation(SimConfig.of(nodes=3, rounds=2, seed=1, topology="gossip", compression="none"))
    assert json.dumps(res, sort_keys=True) == json.dumps(again, sort_keys=True)


# -- settings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kw", "message"), [
    ({"outer_lr": 0.0}, "outer_lr=0.0: must be a finite number > 0"),
    ({"outer_lr": -0.5}, "outer_lr=-0.5: must be a finite number > 0"),
    ({"outer_lr": float("nan")}, "outer_lr=nan: must be a finite number > 0"),
    ({"outer_lr": 0.7, "outer_momentum": 1.0}, "outer_momentum=1.0: must be in [0, 1)"),
    ({"compression": "topk:0.01"}, "topology gossip publishes each node's trained model"),
    ({"topology": "dpsgd", "compression": "topk:0.01"}, "topology dpsgd publishes each node's trained model"),
    ({"compression": "int9"},
     "compression: invalid compression 'int9': unknown compression 'int9'; expected one of none, fp16"),
    ({"topology": "modest", "sample_size": 4, "secagg": True, "compression": "int8"},
     "cannot be combined with secure aggregation"),
    ({"topology": "modest", "model_compression": "topk:0.1"}, "a version is a whole model"),
    ({"topology": "modest", "model_compression": "int9"}, "model_compression: invalid compression 'int9'"),
])
def test_refused_settings_say_why(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        NodeConfig(**kw).validate()  # type: ignore[arg-type]
    assert message in str(e.value)


def test_every_topology_takes_the_outer_optimizer_and_old_hashes_stay() -> None:
    for topology in ("gossip", "dpsgd", "modest", "fl"):
        NodeConfig(topology=topology, outer_lr=0.7).validate()
    # Unset: the hash of a run from before (tests/cli/test_config_schema.py pins these).
    assert NodeConfig().config_hash == "89aabe327b865323"
    assert NodeConfig(compression="none").validate().config_hash == "89aabe327b865323"
    assert NodeConfig(topology="modest", outer_lr=0.5).config_hash == "9ae599f65289629d"
    # Set: run-wide, so peers with another value are another run.
    hashes = {NodeConfig(outer_lr=0.7).config_hash, NodeConfig(outer_lr=0.5).config_hash,
              NodeConfig(outer_lr=0.7, outer_momentum=0.5).config_hash, NodeConfig(compression="int8").config_hash,
              NodeConfig(compression="fp16").config_hash, "89aabe327b865323"}
    assert len(hashes) == 6
    # The versions' format: hashed only when set (auto keeps every hash).
    modest = NodeConfig(topology="modest").config_hash
    assert NodeConfig(topology="modest", model_compression="auto").config_hash == modest
    versions_int8 = NodeConfig(topology="modest", model_compression="INT8:1024").validate().config_hash
    assert versions_int8 == NodeConfig(topology="modest", model_compression="int8").validate().config_hash
    assert versions_int8 != modest
    # The canonical text: int8 and int8:1024 are one format, so one hash.
    assert (NodeConfig(compression="INT8:1024").validate().config_hash
            == NodeConfig(compression="int8").validate().config_hash)


def _show(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    result = CliRunner().invoke(cli, ["config", "show", "--json", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    options: dict[str, object] = json.loads(result.stdout.splitlines()[0])["options"]
    return options


def test_compression_int8_from_flag_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PNODE_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    def value(options: dict[str, object], key: str) -> tuple[object, object]:
        got = options[key]
        assert isinstance(got, dict)
        return got["value"], got["source"]

    assert value(_show(["--compression", "int8"]), "compression") == ("int8", "flag")
    assert value(_show([], env={"P2PNODE_COMPRESSION": "int8"}), "compression") == ("int8", "env")
    path = tmp_path / "c.toml"
    path.write_text('compression = "int8"\nouter_lr = 0.7\n')
    got = _show(["--config", str(path)])
    assert value(got, "compression") == ("int8", "file")
    assert value(got, "outer_lr") == (0.7, "file")
    bad = CliRunner().invoke(cli, ["config", "show", "--compression", "topk:0.01"])
    assert bad.exit_code == 2 and "publishes each node's trained model" in bad.output


def test_swarm_forwards_the_diloco_and_compression_settings_to_every_daemon(tmp_path: Path) -> None:
    from p2pnode.cli.swarm import _args

    runner = CliRunner()
    # The swarm command's own parsing, then the daemon command line it builds for node 1.
    ctx = cli.commands["swarm"].make_context("swarm", ["--compression", "int8", "--outer-lr", "0.7",
                                                       "--outer-momentum", "0.5", "--no-outer-nesterov"])
    kw = dict(ctx.params, state_root=str(tmp_path))
    args = _args(kw, 1, [])
    assert args[args.index("--compression") + 1] == "int8"
    assert args[args.index("--outer-lr") + 1] == "0.7"
    assert args[args.index("--outer-momentum") + 1] == "0.5"
    assert "--no-outer-nesterov" in args and "--outer-nesterov" not in args
    # ... and a daemon reads them into its config.
    got = runner.invoke(cli, ["config", "show", "--json", *args[args.index("run") + 1:]], env={
        "P2PNODE_STATE_DIR": str(tmp_path)}, catch_exceptions=False)
    assert got.exit_code == 0, got.output
    options = json.loads(got.stdout.splitlines()[0])["options"]
    assert (options["compression"]["value"], options["outer_nesterov"]["value"]) == ("int8", False)


# -- compression in gossip and modest ---------------------------------------------------------------------
def test_gossip_with_int8_and_diloco_sends_fewer_bytes_and_learns() -> None:
    base = {"nodes": 4, "rounds": 6, "seed": 0, "topology": "gossip", "local_steps": 20, "outer_lr": 0.7}
    raw = run_simulation(SimConfig.of(**base))
    small = run_simulation(SimConfig.of(**base, compression="int8"))
    assert small["config"]["compression"] == "int8"
    assert small["total_bytes"] * 3 < raw["total_bytes"]
    assert small["rounds"][-1]["accuracy"] > 0.75


@pytest.mark.parametrize(("compression", "extra"), [
    ("int8", {}),
    ("topk:0.25", {}),
    ("int8", {"outer_lr": 0.7}),       # DiLoCo: the momentum travels in int8 with each version
    ("int8", {"topology": "fl"}),
])
def test_modest_with_compressed_uploads_learns(compression: str, extra: dict[str, object]) -> None:
    """Trainers upload model - base with error feedback; aggregators send int8 versions (under topk too:
    ``model_compression=auto``)."""
    # Samples keyed by round, not by model digest: with ``model`` who is sampled (and so how many base pulls
    # a round needs) follows the models' last bits, which differ between CPUs, and so would the byte counts.
    cfg = {"nodes": 8, "rounds": 10, "seed": 0, "topology": "modest", "sample_size": 4, "local_steps": 10,
           "sample_key": "round", **extra}
    raw = run_simulation(SimConfig.of(**cfg))
    res = run_simulation(SimConfig.of(**cfg, compression=compression))
    rows = res["rounds"]
    assert not res["stalled"] and len(rows) == 10
    # No upload was made against another base: every holder keeps the decoded version, digests agree.
    assert res["protocol_events"].get("stale_updates", 0) == 0
    assert rows[-1]["accuracy"] > 0.7, [r["accuracy"] for r in rows]
    # int8: versions, base pulls and uploads all travel int8 (measured 0.27-0.31 of the raw run's bytes).
    # topk:0.25: uploads are half the size (a quarter of the entries, float32 value + int32 index each), and
    # versions and base pulls travel int8 (a top-k version would not be the model): measured 0.366 (0.70
    # with the versions raw, below).
    assert res["total_bytes"] < raw["total_bytes"] * (0.33 if compression == "int8" else 0.45)
    assert all(r["bytes_per_node"] > 0 for r in rows)
    assert res["bytes_per_node_per_round"] > 0


@pytest.mark.parametrize(("extra", "most", "version_bytes"), [
    # topk uploads with the versions raw, as a user may ask: measured 0.70 of the raw run's bytes.
    ({"compression": "topk:0.25", "model_compression": "none"}, 0.8, 4),
    # Uploads raw (whole models), versions int8: measured 0.666.
    ({"model_compression": "int8"}, 0.75, 1),
    # int8 uploads, fp16 versions: measured 0.366.
    ({"compression": "int8", "model_compression": "fp16"}, 0.45, 2),
])
def test_the_versions_travel_in_model_compression(extra: dict[str, object], most: float, version_bytes: int) -> None:
    cfg = {"nodes": 8, "rounds": 10, "seed": 0, "topology": "modest", "sample_size": 4, "local_steps": 10,
           "sample_key": "round"}
    raw = run_simulation(SimConfig.of(**cfg))
    res = run_simulation(SimConfig.of(**cfg, **extra))
    assert not res["stalled"] and res["protocol_events"].get("stale_updates", 0) == 0
    assert res["rounds"][-1]["accuracy"] > 0.85
    assert res["total_bytes"] < raw["total_bytes"] * most
    # Each version's tensors: float32 raw, 2 bytes per element in fp16, 1 (and the scales) in int8.
    tensor_bytes = res["bytes_by_method"]["modest.model"]["tensor_bytes"]
    raw_tensor_bytes = raw["bytes_by_method"]["modest.model"]["tensor_bytes"]
    messages = res["bytes_by_method"]["modest.model"]["messages"]
    assert messages == raw["bytes_by_method"]["modest.model"]["messages"]
    assert tensor_bytes == pytest.approx(raw_tensor_bytes * version_bytes / 4, rel=0.01)


def test_secure_aggregation_takes_int8_versions_with_the_same_sums() -> None:
    # The masked uploads keep their own fixed-point encoding; only the versions the aggregator sends are int8,
    # and every holder keeps the version as decoded, so the base the masks are applied to agrees.
    cfg = {"nodes": 8, "rounds": 6, "seed": 0, "topology": "modest", "sample_size": 5, "local_steps": 10,
           "sample_key": "round", "secagg": True}
    raw = run_simulation(SimConfig.of(**cfg))
    res = run_simulation(SimConfig.of(**cfg, model_compression="int8"))
    assert not res["stalled"] and res["protocol_events"]["secagg_rounds"] == 6
    assert res["total_bytes"] < raw["total_bytes"] * 0.75  # measured 0.661
    for a, b in zip(raw["rounds"], res["rounds"], strict=True):
        assert abs(a["accuracy"] - b["accuracy"]) < 0.01
