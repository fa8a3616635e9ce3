"""Click options shared by `run`, `join` and `sim`, and their conversion into a `NodeConfig`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from p2pnode.config import ADMISSION_MODES, DPSGD_GRAPHS, SAMPLE_KEYS, TOPOLOGIES, NodeConfig
from p2pnode.errors import ConfigError

F = Callable[..., Any]


def parse_shard(value: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8)."""
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError as e:
        raise ConfigError(f"shard={value!r}: expected INDEX/COUNT, for example 0/4") from e
    return index, count


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """``("trim=1", "tau=0.5")`` -> {"trim": 1, "tau": 0.5} (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"parameter {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def training_options(f: F) -> F:
    """Options of the run-wide training setup (task, rule, seed, data split, local steps)."""
    opts = [
        click.option("--task", default="digits-mlp", show_default=True,
                     help="Task: digits-mlp, cifar10-resnet18, or package.module:factory."),
        click.option("--topology", default="gossip", show_default=True, type=click.Choice(list(TOPOLOGIES)),
                     help="Who exchanges with whom: gossip, modest (sampled trainers and aggregators), "
                          "fl (one fixed server; baseline), dpsgd (neighbour averaging; baseline)."),
        click.option("--rule", default="mean", show_default=True, help="Aggregation rule for merging models."),
        click.option("--rule-param", "rule_params", multiple=True, metavar="KEY=VALUE",
                     help="Parameter of the rule (repeatable), for example trim=1."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the run."),
        click.option("--alpha", default=None, type=float, help="Dirichlet alpha for a non-IID split (unset: IID)."),
        click.option("--local-steps", default=None, type=int, help="Local SGD steps per round [task default]."),
        click.option("--lr", default=None, type=float, help="Learning rate [task default]."),
        click.option("--batch-size", default=None, type=int, help="Batch size [task default]."),
        click.option("--init", "init", default="shared", show_default=True,
                     type=click.Choice(["shared", "independent"]),
                     help="One initial model for all nodes, or one per node."),
        click.option("--sample-size", default=10, show_default=True, type=int,
                     help="modest/fl: trainers per round (s)."),
        click.option("--aggregators", default=1, show_default=True, type=int,
                     help="modest: aggregators per round (a)."),
        click.option("--success-fraction", default=1.0, show_default=True, type=float,
                     help="modest/fl: an aggregator completes with floor(F * s) trained models."),
        click.option("--aggregation-timeout", default=None, type=float,
                     help="modest/fl: seconds from an aggregation's first model to its deadline "
                          "[60; 10 in the simulator]."),
        click.option("--sample-key", default="model", show_default=True, type=click.Choice(list(SAMPLE_KEYS)),
                     help="modest: key the sample order of round k by the digest of model k-2 (model, against "
                          "sample grinding) or by the round number only (round, the reference)."),
        click.option("--fl-server", default=None, help="fl: peer id of the server [lowest peer id at start]."),
        click.option("--outer-lr", default=None, type=float,
                     help="modest/fl: learning rate of the outer Nesterov optimizer (unset: none)."),
        click.option("--secagg/--no-secagg", default=False, show_default=True,
                     help="modest/fl: secure aggregation inside each sample; the aggregator learns only the sum "
                          "of the updates (rule mean or vca)."),
        click.option("--secagg-neighbours", default=None, type=int,
                     help="secagg: trainers each trainer masks and shares with, k [the whole sample up to 32, "
                          "else about O(log n)]."),
        click.option("--secagg-threshold", default=None, type=int,
                     help="secagg: shares needed to recover a trainer's secrets, t [above 2/3 of k + 1]; a round "
                          "with fewer trainers left is aborted."),
        click.option("--secagg-clip", default=8.0, show_default=True, type=float,
                     help="secagg: updates are clipped to [-C, C] before the fixed-point encoding."),
        click.option("--secagg-groups", default=1, show_default=True, type=int,
                     help="secagg: split each sample into G secure groups (member i in group i mod G); the "
                          "aggregator combines the G group means with --rule, which may then be robust."),
        click.option("--secagg-min-group", default=5, show_default=True, type=int,
                     help="secagg with --secagg-groups: fewest members of a group (>= 2); the aggregator learns "
                          "each group's mean, so small groups say much about each member."),
        click.option("--dpsgd-graph", default="exponential", show_default=True,
                     type=click.Choice(list(DPSGD_GRAPHS)),
                     help="dpsgd: one-peer exponential graph, or a random regular graph."),
        click.option("--dpsgd-degree", default=4, show_default=True, type=int,
                     help="dpsgd: degree of the regular graph."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def byzantine_options(f: F) -> F:
    """Options of attacking nodes (for tests of a swarm's defences) and of the defences themselves."""
    # Names are checked by NodeConfig.validate: importing the attack registry here would load torch for
    # every command, the light control clients included.
    opts = [
        click.option("--attack", default=None, metavar="NAME",
                     help="Run as an ATTACKER that sends forged models (testing only; logged loudly): sign_flip, "
                          "gaussian, scaled, alie, ipm, random or label_flip."),
        click.option("--attack-param", "attack_params", multiple=True, metavar="KEY=VALUE",
                     help="Parameter of the attack (repeatable), for example factor=10."),
        click.option("--robust-window", default=None, type=int,
                     help="gossip: merges over which received models are kept for the rule [4 for a robust "
                          "rule, else 1]."),
        click.option("--exclude-suspects", is_flag=True,
                     help="Leave out peers whose suspicion score exceeds --suspect-threshold (gossip: not picked "
                          "or merged; modest: their models not aggregated)."),
        click.option("--suspect-threshold", default=1.0, show_default=True, type=float,
                     help="Suspicion score above which a peer is a suspect."),
        click.option("--suspicion-decay", default=0.8, show_default=True, type=float,
                     help="Weight of the old suspicion score in each update, in [0, 1)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def byzantine_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The `NodeConfig` fields of `byzantine_options`."""
    return {"attack": kw.get("attack"), "attack_params": parse_params(tuple(kw.get("attack_params") or ())),
            "robust_window": kw.get("robust_window"), "exclude_suspects": bool(kw.get("exclude_suspects")),
            "suspect_threshold": kw.get("suspect_threshold", 1.0), "suspicion_decay": kw.get("suspicion_decay", 0.8)}


def node_options(f: F) -> F:
    """Options of one real node."""
    opts = [
        click.option("--run-id", default="default", show_default=True, help="Name of the run to take part in."),
        click.option("--admission", default="open", show_default=True, type=click.Choice(list(ADMISSION_MODES)),
                     help="Who may fetch and push the run's models. open: the run's models are public: anyone "
                          "who knows the run id can fetch and push models. secret: only peers holding the run's "
                          "secret. allowlist: only the peers of --allow-peers (may be combined with a secret)."),
        click.option("--run-secret-file", default=None, type=click.Path(dir_okay=False), metavar="FILE",
                     help="File holding the run's secret (at least 16 bytes; preferred over --run-secret)."),
        click.option("--run-secret", default=None, metavar="SECRET",
                     help="The run's secret itself (visible to other users in the process list: prefer "
                          "--run-secret-file or the P2PNODE_RUN_SECRET environment variable)."),
        click.option("--allow-peers", "allow_peers", multiple=True, metavar="ID1,ID2",
                     help="Peer ids admitted with --admission allowlist (comma-separated, repeatable)."),
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--port", default=0, show_default=True, type=int, help="Port to listen on (0: any free)."),
        click.option("--initial-peer", "initial_peers", multiple=True, metavar="MULTIADDR",
                     help="Multiaddr of a peer to join (repeatable)."),
        click.option("--rounds", default=None, type=int, help="Rounds to run (default: until stopped)."),
        click.option("--shard", default="0/1", show_default=True,
                     help="This node's share of the task's training data, INDEX/COUNT."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--min-round-time", default=1.0, show_default=True, type=float,
                     help="Shortest round, in seconds (paces the swarm)."),
        click.option("--exchange-timeout", default=30.0, show_default=True, type=float,
                     help="Seconds allowed for one model exchange."),
        click.option("--wait-for-peers", default=0, show_default=True, type=int,
                     help="Before the first round, wait until this many peers are visible (at most 60 s)."),
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="P2PNODE_STATE_DIR",
                     default=Path("~/.p2pnode").expanduser(), show_default="~/.p2pnode",
                     help="Where the node keeps its control address and token (env P2PNODE_STATE_DIR)."),
        click.option("--json-logs", is_flag=True, help="Log JSON lines (one per event) instead of text."),
        click.option("--log-level", default="INFO", show_default=True,
                     type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def config_from_options(kw: dict[str, Any]) -> NodeConfig:
    """Build and validate a `NodeConfig` from the options of `run`/`join`."""
    return NodeConfig(
        run_id=kw["run_id"], task=kw["task"], topology=kw["topology"], rule=kw["rule"],
        rule_params=parse_params(kw["rule_params"]), model_seed_mode=kw["init"], seed=kw["seed"],
        shard=parse_shard(kw["shard"]), alpha=kw["alpha"], local_steps=kw["local_steps"], lr=kw["lr"],
        batch_size=kw["batch_size"], device=kw["device"], rounds=kw["rounds"],
        min_round_time_s=kw["min_round_time"], exchange_timeout_s=kw["exchange_timeout"], host=kw["host"],
        port=kw["port"], initial_peers=list(kw["initial_peers"]), wait_for_peers=kw["wait_for_peers"],
        **topology_settings(kw), **byzantine_settings(kw), **admission_settings(kw),
    ).validate()


def admission_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The `NodeConfig` fields of the admission options (absent options keep their defaults)."""
    allow: list[str] = []
    for item in kw.get("allow_peers") or ():
        allow.extend(p for p in str(item).replace(",", " ").split() if p)
    return {"admission": kw.get("admission") or "open", "run_secret": kw.get("run_secret") or None,
            "run_secret_file": kw.get("run_secret_file") or None, "allow_peers": allow,
            "admission_key": kw.get("admission_key") or None}


def topology_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The `NodeConfig` fields of the modest, fl and dpsgd options (absent options keep their defaults)."""
    out: dict[str, Any] = {}
    for key in ("sample_size", "aggregators", "success_fraction", "sample_key", "fl_server", "outer_lr",
                "dpsgd_graph", "dpsgd_degree", "secagg", "secagg_neighbours", "secagg_threshold", "secagg_clip",
                "secagg_groups", "secagg_min_group"):
        if key in kw:
            out[key] = kw[key]
    if kw.get("aggregation_timeout") is not None:
        out["aggregation_timeout_s"] = kw["aggregation_timeout"]
    return out
