"""Layered configuration of `run`/`join` and `p2pnode config show|check`: defaults < TOML file < P2PNODE_*
environment < flags; sources named in `config show`; unknown keys and bad values exit 2 with a message that
names the key and where it came from. Also: the control clients (`health` ...) do not import torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from p2pnode.cli.invite import decode_token, differences, encode_token, make_invite, option_values
from p2pnode.cli.main import cli
from p2pnode.cli.options import parse_params
from p2pnode.config import NodeConfig

ROOT = Path(__file__).resolve().parents[2]


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


def show(args: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`config show --json` -> {key: {"value", "source", "origin"}}, plus the whole object under ``_``."""
    result = invoke(["config", "show", "--json", *(args or [])], env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    return {**data["options"], "_": data}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------------ precedence

def test_precedence_default_file_env_flag(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", """\
        seed = 1
        port = 4001
        rule = "median"
        json_logs = true
        [training]
        lr = 0.5
        """)
    # Each key is set by one more layer than the previous one: the last layer that sets it wins.
    env = {"P2PNODE_PORT": "4002", "P2PNODE_RULE": "trimmed_mean", "P2PNODE_LR": "0.25",
           "P2PNODE_JSON_LOGS": "false"}
    got = show(["--config", str(cfg), "--rule", "krum", "--lr", "0.125"], env)
    assert (got["task"]["value"], got["task"]["source"]) == ("digits-mlp", "default")
    assert (got["seed"]["value"], got["seed"]["source"], got["seed"]["origin"]) == (1, "file", f"{cfg}:1")
    assert (got["port"]["value"], got["port"]["source"], got["port"]["origin"]) == (4002, "env", "P2PNODE_PORT")
    assert (got["json_logs"]["value"], got["json_logs"]["source"]) == (False, "env")
    assert (got["rule"]["value"], got["rule"]["source"], got["rule"]["origin"]) == ("krum", "flag", "--rule")
    assert (got["lr"]["value"], got["lr"]["source"]) == (0.125, "flag")
    assert got["config_file"]["value"] == str(cfg) and got["config_file"]["source"] == "flag"
    assert got["_"]["valid"] is True and len(got["_"]["config_hash"]) == 16


def test_file_from_env_and_from_state_dir(tmp_path: Path, clean_env: Path) -> None:
    write(clean_env / "config.toml", "run_id = 'from-state-dir'\n")
    got = show()
    assert got["run_id"]["value"] == "from-state-dir"
    assert got["run_id"]["origin"] == f"{clean_env / 'config.toml'}:1"
    assert got["config_file"]["source"] == "default"
    # P2PNODE_CONFIG (and --config) take the place of the state dir's file.
    other = write(tmp_path / "other.toml", "run_id = 'from-env-file'\n")
    got = show(env={"P2PNODE_CONFIG": str(other)})
    assert got["run_id"]["value"] == "from-env-file"
    assert (got["config_file"]["source"], got["config_file"]["origin"]) == ("env", "P2PNODE_CONFIG")


def test_show_text_names_each_source(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "[network]\nhost = '0.0.0.0'\n")
    result = invoke(["config", "show", "--config", str(cfg), "--seed", "3"], {"P2PNODE_PORT": "4010"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert rows["host"].split()[1:] == ["0.0.0.0", "file", f"{cfg}:2"]
    assert rows["port"].split()[1:] == ["4010", "env", "P2PNODE_PORT"]
    assert rows["seed"].split()[1:] == ["3", "flag", "--seed"]
    assert rows["topology"].split()[1:] == ["gossip", "default"]
    assert rows["rounds"].split()[1:] == ["-", "default"]
    assert "config_hash" in rows


def test_config_show_and_check_take_every_option_of_run() -> None:
    """The Byzantine options of `run` are options of `config show` and `config check` too (flag and env)."""
    result = invoke(["config", "show", "--attack", "scaled", "--robust-window", "3"],
                    {"P2PNODE_SUSPECT_THRESHOLD": "2.5"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert rows["attack"].split()[1:] == ["scaled", "flag", "--attack"]
    assert rows["robust_window"].split()[1:] == ["3", "flag", "--robust-window"]
    assert rows["suspect_threshold"].split()[1:] == ["2.5", "env", "P2PNODE_SUSPECT_THRESHOLD"]
    bad = invoke(["config", "check", "--attack", "no-such-attack"])
    assert bad.exit_code == 2 and "no-such-attack" in bad.output, bad.output

def test_tables_flags_spelling_and_rule_params(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", """\
        min-round-time = 2.5
        [daemon]
        checkpoint-every = 5
        sync = false
        [rule_params]
        trim = 2
        mode = "fast"
        """)
    got = show(["--config", str(cfg)])
    assert got["min_round_time"]["value"] == 2.5
    assert got["checkpoint_every"]["value"] == 5
    assert got["sync_on_join"]["value"] is False
    assert parse_params(tuple(got["rule_params"]["value"])) == {"trim": 2, "mode": "fast"}
    env = show(env={"P2PNODE_RULE_PARAM": "trim=1,tau=0.5"})
    assert parse_params(tuple(env["rule_params"]["value"])) == {"trim": 1, "tau": 0.5}
    assert env["rule_params"]["origin"] == "P2PNODE_RULE_PARAM"


def test_task_options_from_a_table_flags_and_an_invite(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", """\
        task = "tiny-lm"
        [task_options]
        size = "tiny"
        warmup_steps = 10
        """)
    got = show(["--config", str(cfg)])
    assert parse_params(tuple(got["task_options"]["value"])) == {"size": "tiny", "warmup_steps": 10}
    flags = show(["--task", "tiny-lm", "--task-option", "size=tiny", "--task-option", "context=32"])
    assert parse_params(tuple(flags["task_options"]["value"])) == {"size": "tiny", "context": 32}
    config = NodeConfig(task="tiny-lm", task_options={"size": "tiny", "context": 32}).validate()
    invite = decode_token(encode_token(make_invite(config, [])))
    assert parse_params(tuple(option_values(invite)["task_options"])) == {"size": "tiny", "context": 32}
    assert differences(config, invite) == []


@pytest.mark.parametrize("value", [
    "/ip4/10.0.0.1/tcp/1/p2p/QmA,/ip4/10.0.0.2/tcp/2/p2p/QmB",
    "/ip4/10.0.0.1/tcp/1/p2p/QmA /ip4/10.0.0.2/tcp/2/p2p/QmB",
    " /ip4/10.0.0.1/tcp/1/p2p/QmA ,\n /ip4/10.0.0.2/tcp/2/p2p/QmB, ",
])
def test_initial_peers_from_environment(value: str) -> None:
    got = show(env={"P2PNODE_INITIAL_PEERS": value})
    assert got["initial_peers"]["value"] == ["/ip4/10.0.0.1/tcp/1/p2p/QmA", "/ip4/10.0.0.2/tcp/2/p2p/QmB"]
    assert got["initial_peers"]["origin"] == "P2PNODE_INITIAL_PEERS"


def test_initial_peers_from_file_list_or_string(tmp_path: Path) -> None:
    listed = write(tmp_path / "a.toml", "initial_peers = ['/ip4/1.1.1.1/tcp/1', '/ip4/2.2.2.2/tcp/2']\n")
    joined = write(tmp_path / "b.toml", "initial_peer = '/ip4/1.1.1.1/tcp/1, /ip4/2.2.2.2/tcp/2'\n")
    for cfg in (listed, joined):
        assert show(["--config", str(cfg)])["initial_peers"]["value"] == ["/ip4/1.1.1.1/tcp/1", "/ip4/2.2.2.2/tcp/2"]
    # A flag replaces the file's list rather than adding to it.
    got = show(["--config", str(listed), "--initial-peer", "/ip4/3.3.3.3/tcp/3"])
    assert got["initial_peers"]["value"] == ["/ip4/3.3.3.3/tcp/3"]


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("true", True), ("yes", True), ("0", False),
                                                 ("false", False), ("off", False)])
def test_boolean_environment_values(text: str, expected: bool) -> None:
    got = show(env={"P2PNODE_JSON_LOGS": text, "P2PNODE_RESUME": text})
    assert got["json_logs"]["value"] is expected and got["resume"]["value"] is expected


# ------------------------------------------------------------------------------------------ errors

def test_unknown_file_keys_exit_2_with_suggestions(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "prot = 1\n[daemon]\nchekpoint_every = 2\n")
    result = invoke(["config", "check", "--config", str(cfg)])
    assert result.exit_code == 2
    assert f"unknown key 'prot' in {cfg}:1 (did you mean port?)" in result.stderr
    assert f"unknown key 'daemon.chekpoint_every' in {cfg}:3 (did you mean checkpoint_every?)" in result.stderr


def test_unknown_environment_variable_exits_2() -> None:
    result = invoke(["config", "check"], {"P2PNODE_PORTT": "1"})
    assert result.exit_code == 2
    assert "P2PNODE_PORTT matches no option" in result.stderr and "did you mean P2PNODE_PORT" in result.stderr
    # Variables of the Docker swarm script are not options, and not errors either.
    assert invoke(["config", "check"], {"P2PNODE_SWARM_FILE": "/swarm/x"}).exit_code == 0


def test_bad_values_name_key_source_and_allowed_values(tmp_path: Path) -> None:
    result = invoke(["config", "check"], {"P2PNODE_PORT": "abc"})
    assert result.exit_code == 2
    assert "invalid value for port from env P2PNODE_PORT='abc': 'abc' is not a valid integer" in result.stderr

    cfg = write(tmp_path / "c.toml", "run_id = 'x'\ntopology = 'ring'\n")
    result = invoke(["config", "check", "--config", str(cfg)])
    assert result.exit_code == 2
    assert f"invalid value for topology in {cfg}:2" in result.stderr
    assert "'gossip', 'modest', 'fl', 'dpsgd'" in result.stderr

    cfg = write(tmp_path / "d.toml", "port = 1.5\n")
    result = invoke(["config", "check", "--config", str(cfg)])
    assert result.exit_code == 2 and "invalid value for port" in result.stderr and "not an integer" in result.stderr

    result = invoke(["config", "check"], {"P2PNODE_RULE": "nonsense"})
    assert result.exit_code == 2
    assert "rule='nonsense' is unknown; allowed:" in result.stderr and "rule from env P2PNODE_RULE" in result.stderr

    result = invoke(["config", "check"], {"P2PNODE_JSON_LOGS": "maybe"})
    assert result.exit_code == 2 and "P2PNODE_JSON_LOGS='maybe'" in result.stderr

    bad_toml = write(tmp_path / "e.toml", "port = \n")
    result = invoke(["config", "check", "--config", str(bad_toml)])
    assert result.exit_code == 2 and "not valid TOML" in result.stderr and "line 1" in result.stderr


def test_invalid_combination_names_both_sources(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.toml", "topology = 'modest'\nsample_size = 2\n")
    result = invoke(["config", "check", "--config", str(cfg), "--aggregators", "3"])
    assert result.exit_code == 2
    assert "aggregators=3 exceeds sample_size=2" in result.stderr
    assert "aggregators from flag --aggregators" in result.stderr
    assert f"sample_size from file {cfg}:2" in result.stderr
    # `show` prints the values first, then fails the same way.
    shown = invoke(["config", "show", "--json", "--config", str(cfg), "--aggregators", "3"])
    assert shown.exit_code == 2
    data = json.loads(shown.stdout)
    assert data["valid"] is False and "exceeds sample_size" in data["error"] and data["config_hash"] is None


def test_run_refuses_invalid_config_before_starting() -> None:
    result = invoke(["run", "--rounds", "1"], {"P2PNODE_TOPOLOGY": "modest", "P2PNODE_SAMPLE_SIZE": "1",
                                                "P2PNODE_AGGREGATORS": "2"})
    assert result.exit_code == 2
    assert "aggregators=2 exceeds sample_size=1" in result.stderr
    assert "sample_size from env P2PNODE_SAMPLE_SIZE" in result.stderr
    assert "p2pnode ready" not in result.stdout


def test_check_valid_and_help_lists_environment_variables(clean_env: Path) -> None:
    result = invoke(["config", "check"], {"P2PNODE_TOPOLOGY": "modest", "P2PNODE_SAMPLE_SIZE": "4"})
    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.stdout and "modest/mean" in result.stdout
    # --help works even when the state dir's config file is broken, and names each option's variable.
    write(clean_env / "config.toml", "this is not toml\n")
    helped = invoke(["run", "--help"])
    assert helped.exit_code == 0
    for name in ("P2PNODE_PORT", "P2PNODE_INITIAL_PEERS", "P2PNODE_CONFIG", "P2PNODE_STATE_DIR",
                 "P2PNODE_CHECKPOINT_EVERY"):
        assert name in helped.stdout


# ------------------------------------------------------------------------------------------ import cost

def test_control_clients_do_not_import_torch(tmp_path: Path) -> None:
    """The Docker HEALTHCHECK runs `p2pnode health` every few seconds: it must not pay for torch."""
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from p2pnode.cli.main import cli
        for name in ("health", "status", "peers", "leave", "watch"):
            assert CliRunner().invoke(cli, [name, "--help"]).exit_code == 0, name
        result = CliRunner().invoke(cli, ["health", "--state-dir", {str(tmp_path)!r}])
        assert result.exit_code == 1, result.output
        loaded = sorted(m for m in ("torch", "hivemind", "numpy") if m in sys.modules)
        assert not loaded, loaded
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------ shipped files

def test_example_config_file_is_valid() -> None:
    example = ROOT / "docs" / "config.example.toml"
    result = invoke(["config", "check", "--config", str(example)])
    assert result.exit_code == 0, result.output
    got = show(["--config", str(example)])
    assert got["rule_params"]["value"] == ["trim=1"] and got["run_id"]["source"] == "file"


def test_compose_environment_is_valid_for_run() -> None:
    """Each service of docker-compose.yml, as its entry script starts it (`p2pnode run` with the service's
    environment, plus --initial-peer for joiners), makes a valid configuration."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert len(services) == 4
    for name, service in services.items():
        env = {k: str(v) for k, v in service["environment"].items()}
        role, *flags = service["command"]
        if role == "join":
            flags = ["--initial-peer", "/ip4/127.0.0.1/tcp/4001/p2p/QmBootstrap", *flags]
        got = show(flags, env)
        assert got["run_id"]["value"] == "compose-swarm", name
        assert got["shard"]["value"] == f"{name[-1]}/4" and got["shard"]["origin"] == "P2PNODE_SHARD"
        assert got["wait_for_peers"]["value"] == 3
        assert got["_"]["valid"], got["_"]["error"]
