"""The `NodeConfig` schema (`p2pnode.config.Setting`) is the one source of the options of `run`/`join`/`config`:
every field is reachable from a flag, a TOML key and a ``P2PNODE_*`` variable, `config show` lists it, its
value arrives in the `NodeConfig`, and `config_hash` of existing runs is what it was before the schema.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from p2pnode.cli.main import cli
from p2pnode.cli.options import TRAINING_FIELDS, config_fields
from p2pnode.cli.schema_doc import DOC, render
from p2pnode.config import (
    CONDITIONAL_RUN_KEYS,
    RUN_KEYS,
    SECAGG_RUN_KEYS,
    SECTIONS,
    TOPOLOGIES,
    TOPOLOGY_RUN_KEYS,
    NodeConfig,
    Setting,
    field_default,
    schema,
    setting_of,
)
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
#: Hashes computed before the schema existed (literal key lists): they must not change, or old runs split.
KNOWN_HASHES = [
    ({}, "89aabe327b865323"),
    ({"topology": "modest", "outer_lr": 0.5}, "9ae599f65289629d"),
    ({"topology": "fl", "secagg": True, "sample_size": 4}, "9d3473e0a9f70ca4"),
    ({"topology": "modest", "secagg": True, "secagg_groups": 2, "sample_size": 10, "rule": "median"},
     "96690385450e89e6"),
    ({"topology": "dpsgd", "rule_params": {"a": 1}}, "c6f452afad822916"),
]


def sample(f: dataclasses.Field[Any], meta: Setting) -> tuple[str, Any]:
    """A non-default value of field `f`: (as text for a flag or variable, as click parses it)."""
    typ = str(f.type)
    if meta.choices:
        value = meta.choices[-1]
        return value, value
    if typ == "bool":
        return "true", True
    if typ.startswith("dict["):
        return "k=7", ["k=7"]
    if typ.startswith("list["):
        return "p1", ["p1"]
    if typ.startswith("tuple["):
        return "1/3", "1/3"
    if typ.startswith("int"):
        return "7", 7
    if typ.startswith("float"):
        return "2.5", 2.5
    return "some-text", "some-text"


def flag_args(f: dataclasses.Field[Any], meta: Setting, text: str) -> list[str]:
    decl = meta.flag or "--" + meta.param.replace("_", "-")
    if str(f.type) == "bool":
        return [decl.split("/")[0]]
    return [decl, text]


def toml_line(f: dataclasses.Field[Any], meta: Setting, text: str, value: Any) -> str:
    if str(f.type) == "bool":
        return f"{meta.param} = true"
    if isinstance(value, (int, float)):
        return f"{meta.param} = {text}"
    return f"{meta.param} = {json.dumps(text)}"


def show(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["config", "show", "--json", *args], env=env, catch_exceptions=False)
    # Exit 2 is fine here: one unusual value alone may make an invalid node; show prints it all the same.
    assert result.exit_code in (0, 2), result.output
    data: dict[str, Any] = json.loads(result.stdout.splitlines()[0])
    return data["options"]


#: Every field with a generated option: the node's (`NodeConfig`) and the daemon's (`DaemonSettings`).
FIELDS = schema() + [(f, meta) for f, meta in schema(DaemonSettings) if meta.option]


def test_every_field_has_a_section_a_help_and_its_own_key() -> None:
    params = [meta.param for _, meta in FIELDS]
    assert len(params) == len(set(params))
    assert {f.name for f, _ in FIELDS} >= {f.name for f in dataclasses.fields(NodeConfig)}
    # The daemon fields without a generated option are set by a hand-written one.
    assert {f.name for f, meta in schema(DaemonSettings) if not meta.option} == {
        "state_dir", "max_gpu_memory_gib", "max_gpu_memory_fraction"}
    for f, meta in FIELDS:
        assert meta.section in SECTIONS and meta.help, f.name
        assert set(meta.topologies) <= set(TOPOLOGIES), f.name


@pytest.mark.parametrize(("f", "meta"), FIELDS, ids=[f.name for f, _ in FIELDS])
def test_field_reachable_from_flag_toml_and_env(f: dataclasses.Field[Any], meta: Setting, tmp_path: Path) -> None:
    text, value = sample(f, meta)
    masked = "***" if meta.secret else value
    got = show(flag_args(f, meta, text))[meta.param]
    assert (got["value"], got["source"]) == (masked, "flag")
    got = show([], env={"P2PNODE_" + meta.param.upper(): text})[meta.param]
    assert (got["value"], got["source"]) == (masked, "env")
    path = tmp_path / "c.toml"
    path.write_text(toml_line(f, meta, text, value) + "\n")
    got = show(["--config", str(path)])[meta.param]
    assert (got["value"], got["source"]) == (masked, "file")
    # ... and the option's value lands in the field it belongs to.
    cls = NodeConfig if f.name in {g.name for g in dataclasses.fields(NodeConfig)} else DaemonSettings
    assert f.name in config_fields({meta.param: value}, cls)


def test_config_show_lists_every_field_with_its_default() -> None:
    options = show([])
    for f, meta in FIELDS:
        assert meta.param in options, f.name
        assert options[meta.param]["source"] == "default"


def test_sim_and_swarm_share_the_training_fields() -> None:
    from simulator.settings import PER_NODE

    names = {f.name for f, _ in FIELDS}
    assert set(TRAINING_FIELDS) <= names
    for command in ("sim", "swarm"):
        params = {p.name for p in cli.commands[command].params}
        missing = [n for f, meta in FIELDS if f.name in TRAINING_FIELDS and (n := meta.param) not in params
                   and not (command == "sim" and f.name in PER_NODE)]
        assert not missing, (command, missing)


#: Every setting of `p2pnode sim`, walked from the dataclasses themselves: (section, field, setting).
def _sim_fields() -> list[tuple[str, dataclasses.Field[Any], Setting]]:
    from simulator.settings import PER_NODE, SECTION_TYPES, SimConfig

    out = [("config", f, meta) for f, meta in schema() if f.name not in PER_NODE]
    for f in dataclasses.fields(SimConfig):
        if f.name in SECTION_TYPES:
            out += [(f.name, g, meta) for g, meta in schema(SECTION_TYPES[f.name])]
        elif f.name != "config":
            out.append(("", f, setting_of(f)))
    return out


SIM_FIELDS = _sim_fields()


def sim_show(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["sim", "--show-config", *args], env=env, catch_exceptions=False)
    # Exit 2 is fine here: one unusual value alone may make an invalid run; --show-config prints it all the same.
    assert result.exit_code in (0, 2), result.output
    data: dict[str, Any] = json.loads(result.stdout.splitlines()[0])
    return data["options"]


def test_sim_schema_is_every_node_field_but_the_per_node_ones_plus_the_sims_own() -> None:
    from simulator.settings import PER_NODE, SIM_SECTIONS, sim_schema

    assert PER_NODE == ("shard", "fl_server")
    assert sorted((s, f.name) for s, f, _ in sim_schema()) == sorted((s, f.name) for s, f, _ in SIM_FIELDS)
    node = {f.name for f in dataclasses.fields(NodeConfig)}
    assert {f.name for s, f, _ in SIM_FIELDS if s == "config"} == node - set(PER_NODE)
    own = [(f.name, meta.section) for s, f, meta in SIM_FIELDS if s != "config"]
    assert {name for name, _ in own} == {
        "nodes", "latency_ms", "bandwidth_mbps", "loss", "step_time_ms", "crash_fraction", "crash_round",
        "rejoin_round", "rejoin_fraction", "byzantine", "omniscient", "outsiders", "secagg_silent", "record_variance"}
    assert all(section in SIM_SECTIONS for _, section in own)
    params = [meta.param for _, _, meta in SIM_FIELDS]
    assert len(params) == len(set(params))
    sim_params = {p.name for p in cli.commands["sim"].params}
    assert set(params) <= sim_params
    for name in PER_NODE:  # the simulator sets them per node: no option
        assert setting_of(next(f for f in dataclasses.fields(NodeConfig) if f.name == name)).param not in sim_params


@pytest.mark.parametrize(("section", "f", "meta"), SIM_FIELDS, ids=[f.name for _, f, _ in SIM_FIELDS])
def test_sim_field_reachable_from_flag_toml_and_env(section: str, f: dataclasses.Field[Any], meta: Setting,
                                                    tmp_path: Path) -> None:
    """Every NodeConfig field (but shard and fl_server) and every field of the simulator's sections is set by
    a flag, a P2PNODE_* variable and a TOML key of `sim`, and lands in its place in the SimConfig."""
    from simulator.settings import SECTION_TYPES

    text, value = sample(f, meta)
    if section == "":
        expected = value
    else:
        cls = NodeConfig if section == "config" else SECTION_TYPES[section]
        expected = config_fields({meta.param: value}, cls)[f.name]
    expected = "***" if meta.secret else expected
    got = sim_show(flag_args(f, meta, text))[meta.param]
    assert (got["value"], got["source"]) == (expected, "flag")
    got = sim_show([], env={"P2PNODE_" + meta.param.upper(): text})[meta.param]
    assert (got["value"], got["source"]) == (expected, "env")
    path = tmp_path / "c.toml"
    path.write_text(toml_line(f, meta, text, value) + "\n")
    got = sim_show(["--config", str(path)])[meta.param]
    assert (got["value"], got["source"]) == (expected, "file")


def test_sim_defaults_are_the_daemons_but_sim_defaults() -> None:
    from simulator.settings import SIM_DEFAULTS

    options = sim_show([])
    for section, f, meta in SIM_FIELDS:
        assert options[meta.param]["source"] == "default", f.name
        if section == "config":
            expected = SIM_DEFAULTS.get(f.name, field_default(f))
            if f.name == "run_id":  # what a run left at the daemon's run id uses: sim-<seed>
                expected = "sim-0"
            assert options[meta.param]["value"] == (list(expected) if isinstance(expected, tuple) else expected), \
                f.name
    assert (options["exchange_timeout"]["value"], options["aggregation_timeout"]["value"]) == (30.0, 60.0)
    assert (options["rounds"]["value"], options["device"]["value"], options["min_round_time"]["value"]) == (
        20, "cpu", 0.0)


def test_hashed_keys_come_from_the_schema_and_old_hashes_stay() -> None:
    assert set(RUN_KEYS) == {"run_id", "task", "topology", "rule", "rule_params", "model_seed_mode"}
    assert set(TOPOLOGY_RUN_KEYS["modest"]) == {"sample_size", "aggregators", "success_fraction", "sample_key",
                                                "outer_lr", "outer_momentum", "outer_nesterov"}
    assert set(TOPOLOGY_RUN_KEYS["fl"]) == {"sample_size", "success_fraction", "fl_server", "outer_lr",
                                            "outer_momentum", "outer_nesterov"}
    assert set(TOPOLOGY_RUN_KEYS["dpsgd"]) == {"dpsgd_graph", "dpsgd_degree"}
    assert "gossip" not in TOPOLOGY_RUN_KEYS
    # Hashed only when set (not at their default), so that runs without them keep their hash.
    outer = {"outer_lr": "outer_lr", "outer_momentum": "outer_lr", "outer_nesterov": "outer_lr"}
    always = {"compression": "compression", "task_options": "task_options",
              "sync_warmup_steps": "sync_warmup_steps", "sync_warmup_local_steps": "sync_warmup_steps",
              "sync_warmup_outer": "sync_warmup_steps"}
    versions = {"model_compression": "model_compression"}  # modest/fl only: the format of the versions
    assert CONDITIONAL_RUN_KEYS == {"gossip": {**outer, **always}, "dpsgd": {**outer, **always},
                                    "modest": {**always, **versions}, "fl": {**always, **versions}}
    assert set(SECAGG_RUN_KEYS) == {"secagg", "secagg_neighbours", "secagg_threshold", "secagg_clip"}
    for kw, expected in KNOWN_HASHES:
        assert NodeConfig(**kw).config_hash == expected, kw
    # task_options count once given (every node must build the same model), and leave old hashes alone.
    plain = NodeConfig(task="tiny-lm")
    assert "task_options" not in plain.run_fields()
    assert NodeConfig(task="tiny-lm", task_options={"size": "tiny"}).config_hash != plain.config_hash


def test_docs_config_reference_matches_the_schema() -> None:
    text = DOC.read_text()
    assert render(text) == text, "docs/config.md is stale: run `python -m p2pnode.cli.schema_doc`"


@pytest.mark.parametrize("doc", ["README.md", "docs/daemon.md"])
def test_flags_in_the_option_tables_are_options_of_run(doc: str) -> None:
    """Every ``--flag`` at the start of a table row of `doc` is an option of `p2pnode run` (or of `sim`)."""
    known: set[str] = set()
    for command in ("run", "sim"):
        for p in cli.commands[command].params:
            for opt in [*p.opts, *p.secondary_opts]:
                known.add(opt)
    rows = [line for line in (ROOT / doc).read_text().splitlines() if line.startswith("| `--")]
    assert rows
    flags = {f for line in rows for m in re.findall(r"`(--[a-z0-9-]+[^`]*)`", line.split("|")[1])
             for f in m.split()[0].split("=")[0].split("/")}
    assert flags - known == set()


def test_sim_reads_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text("nodes = 4\nrounds = 2\nlocal_steps = 2\n")
    result = CliRunner().invoke(cli, ["sim", "--config", str(path), "--quiet"], env={"P2PNODE_ROUNDS": "1"},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "nodes=4 rounds=1 " in result.output


def test_limits_defaults_are_the_transports_own() -> None:
    """The ``limits`` section passes the transport's defaults unchanged when nothing is set."""
    import inspect

    from p2pnode.transport.p2p import P2PTransport

    params = inspect.signature(P2PTransport.__init__).parameters
    limits = NodeConfig().transport_limits()
    for name, value in limits.items():
        assert name in params, name
        if params[name].default is not None or value is not None:
            assert params[name].default == value, name


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_inflight_bytes_per_peer=10: must be >= max_message_bytes"):
        NodeConfig(max_inflight_bytes_per_peer=10).validate()
    with pytest.raises(ConfigError, match="max_streams=0"):
        NodeConfig(max_streams=0).validate()
    with pytest.raises(ConfigError, match="direct_max_pending=0"):
        NodeConfig(direct_max_pending=0).validate()
    with pytest.raises(ConfigError, match="direct_handshake_timeout_s=0"):
        NodeConfig(direct_handshake_timeout_s=0).validate()
    with pytest.raises(ConfigError, match="tarpit_window_s=0"):
        NodeConfig(tarpit_window_s=0).validate()
    with pytest.raises(ConfigError, match="tarpit_refusals=-1"):
        NodeConfig(tarpit_refusals=-1).validate()
    with pytest.raises(ConfigError, match="conn_max_per_host=-1"):
        NodeConfig(conn_max_per_host=-1).validate()
    with pytest.raises(ConfigError, match="conn_admission_grace_s=-1"):
        NodeConfig(conn_admission_grace_s=-1).validate()
    with pytest.raises(ConfigError, match="tarpit_host_refusals=-1"):
        NodeConfig(tarpit_host_refusals=-1).validate()
    with pytest.raises(ConfigError, match="tarpit_max_held=-1"):
        NodeConfig(tarpit_max_held=-1).validate()


def test_sim_config_is_a_node_config_plus_the_simulators_sections() -> None:
    """SimConfig holds the daemon's NodeConfig (its defaults but SIM_DEFAULTS), and `of` routes flat keywords."""
    from simulator.settings import SIM_DEFAULTS, SimConfig

    cfg = SimConfig.of(nodes=4, topology="modest", sample_size=3, secagg=True, init="independent", crash_fraction=0.5,
                       latency_ms=2.0, record_variance=True)
    assert (cfg.nodes, cfg.churn.crash_fraction, cfg.network.latency_ms, cfg.recording.record_variance) == (
        4, 0.5, 2.0, True)
    got = cfg.node_config(2)
    assert (got.shard, got.model_seed_mode, got.secagg, got.sample_size, got.run_id) == (
        (2, 4), "independent", True, 3, "sim-0")
    daemon = NodeConfig()
    for f in dataclasses.fields(NodeConfig):
        expected = SIM_DEFAULTS.get(f.name, getattr(daemon, f.name))
        assert getattr(SimConfig().config, f.name) == expected, f.name
    assert (got.exchange_timeout_s, got.aggregation_timeout_s) == (30.0, 60.0)
    with pytest.raises(ConfigError, match=r"not a setting of the simulator.*did you mean crash_fraction"):
        SimConfig.of(crash_fractoin=0.5)
    with pytest.raises(ConfigError, match="shard is set per node"):
        SimConfig.of(shard=(0, 2))


def test_sim_results_config_is_flat_with_the_original_keys_and_masks_secrets() -> None:
    from simulator.settings import RESULT_KEYS, SimConfig, results_config

    plain = results_config(SimConfig())
    assert set(plain) == RESULT_KEYS
    assert (plain["nodes"], plain["rounds"], plain["init"], plain["exchange_timeout_s"]) == (16, 20, "shared", 30.0)
    # A setting outside the original keys appears once it is set; a secret only as ***.
    cfg = SimConfig.of(idle_timeout_s=7.0, admission="secret", run_secret="s" * 20, record_variance=True)
    got = results_config(cfg)
    assert set(got) - RESULT_KEYS == {"idle_timeout_s", "admission", "run_secret", "record_variance"}
    assert (got["idle_timeout_s"], got["run_secret"]) == (7.0, "***")


def test_sim_warns_about_settings_without_effect_and_refuses_per_node_ones() -> None:
    result = CliRunner().invoke(cli, ["sim", "--show-config", "--port", "5"], catch_exceptions=False)
    assert result.exit_code == 0 and json.loads(result.stdout)["options"]["port"]["value"] == 5
    result = CliRunner().invoke(cli, ["sim", "--nodes", "2", "--rounds", "0", "--quiet", "--port", "5"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warning: port has no effect in the simulator" in result.stderr and "rounds=0 " in result.stdout
    from simulator.settings import SimConfig

    assert SimConfig.of(port=5, direct=False).ignored_settings() == ["port", "direct"]
    result = CliRunner().invoke(cli, ["sim", "--shard", "1/2"])
    assert result.exit_code == 2 and "No such option '--shard'" in result.output


def test_directory_quota_default_is_the_discovery_default() -> None:
    from p2pnode.discovery.quota import DEFAULT_MAX_SUBKEYS

    assert NodeConfig().directory_max_subkeys == DEFAULT_MAX_SUBKEYS
    with pytest.raises(ConfigError, match="directory_max_subkeys"):
        NodeConfig(directory_max_subkeys=0).validate()


def test_sim_help_and_show_config_give_the_run_id_a_simulated_run_uses() -> None:
    """A sim run left at the daemon's run id runs as ``sim-<seed>``: --help and --show-config say so."""
    from simulator.settings import SimConfig

    help_text = " ".join(CliRunner().invoke(cli, ["sim", "--help"], catch_exceptions=False).output.split())
    assert "--run-id TEXT Name of the run to take part in. [env var: P2PNODE_RUN_ID; default: (sim-<seed>)]" \
        in help_text
    run_help = " ".join(CliRunner().invoke(cli, ["run", "--help"], catch_exceptions=False).output.split())
    assert "P2PNODE_RUN_ID; default: default]" in run_help  # the daemon's own default is unchanged
    shown = json.loads(CliRunner().invoke(cli, ["sim", "--show-config", "--seed", "7"]).stdout)
    assert shown["options"]["run_id"] == {"value": "sim-7", "source": "default", "origin": None}
    shown = json.loads(CliRunner().invoke(cli, ["sim", "--show-config", "--run-id", "mine"]).stdout)
    assert shown["options"]["run_id"]["value"] == "mine" and shown["options"]["run_id"]["source"] == "flag"
    cfg = SimConfig.of(seed=7)
    assert cfg.run_id == "sim-7" == cfg.node_config(0).run_id
    assert SimConfig.of(seed=7, run_id="mine").node_config(1).run_id == "mine"
