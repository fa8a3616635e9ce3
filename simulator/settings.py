"""The settings of one simulated run: the nodes' `NodeConfig` plus the simulator's own sections.

`SimConfig` holds

- ``config``: a `NodeConfig`, the same fields, defaults and validation as the daemon's (``p2pnode run``),
  applied to every simulated node; the few fields the simulator sets itself are listed in `SIM_DEFAULTS`
  and `PER_NODE`, each with its reason;
- ``nodes`` and four sections of its own: ``network`` (`LinkSettings`), ``churn`` (`Churn`), ``attackers``
  (`Attackers`) and ``recording`` (`Recording`). Their fields carry the same `p2pnode.config.Setting`
  metadata as `NodeConfig`'s, so the options, TOML keys and ``P2PNODE_*`` variables of ``p2pnode sim`` are
  generated from both (`sim_schema`).

`SimConfig.of` takes flat keywords (``SimConfig.of(nodes=16, topology="modest", crash_fraction=0.5)``) and
routes each to its section by the schema. This module does not import torch: the CLI builds its options
from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
from dataclasses import dataclass, field
from typing import Any

from p2pnode.config import MASK, SECRET_KEYS, NodeConfig, Setting, field_default, schema, setting, setting_of
from p2pnode.errors import ConfigError

#: Sections of the simulator's own settings, in the order ``p2pnode sim --help`` and the docs list them.
SIM_SECTIONS = ("sim", "network model", "churn", "attackers", "recording")
EVENT_DRIVEN = ("modest", "fl")

#: `NodeConfig` defaults that the simulator changes, with the reason; every other field keeps the daemon's
#: default (timeouts included: on the virtual clock a longer timeout costs no wall time, it only decides
#: when a crashed or silent peer is given up on).
SIM_DEFAULTS: dict[str, Any] = {
    # A simulation must end; the daemon's unset value runs until stopped.
    "rounds": 20,
    # The models are small and the results must be the same bit for bit on every machine (one torch thread).
    "device": "cpu",
}
#: `NodeConfig` fields that the simulator sets per node, so ``p2pnode sim`` has no option for them: node i
#: trains on shard i/nodes, and the fl server is always ``node-0000`` (churn never picks it).
PER_NODE = ("shard", "fl_server")
#: `NodeConfig` fields of the libp2p transport and the DHT: accepted (one config for both), but without
#: effect on the in-memory network; ``p2pnode sim`` warns when one is set.
NO_EFFECT = ("host", "port", "initial_peers", "directory_read_interval_s", "max_inflight_bytes",
             "max_inflight_bytes_per_peer", "max_streams", "max_streams_per_peer", "min_receive_rate",
             "receive_grace_s", "receive_pool_bytes", "direct", "direct_threshold", "direct_retry_s",
             "direct_connect_timeout_s", "direct_max_connections", "direct_max_pending",
             "direct_max_connections_per_peer", "direct_max_tickets_per_peer", "direct_max_tickets",
             "direct_handshake_timeout_s", "directory_max_subkeys", "tarpit_refusals", "tarpit_window_s",
             "tarpit_hold_s", "tarpit_host_refusals", "tarpit_max_held")
#: Run id of a simulated run whose ``run_id`` is left at the daemon's default: ``sim-<seed>``.
SIM_RUN_ID = "sim-{seed}"


def sim_setting(*, section: str, help: str, **kw: Any) -> Any:
    """A field of the simulator's own settings with its `Setting` (see `p2pnode.config.setting`)."""
    return setting(section=section, help=help, sections=SIM_SECTIONS, **kw)


@dataclass
class LinkSettings:
    """The network model: every link alike (`p2pnode.transport.memory.LinkModel`), and the compute model."""

    #: One-way latency of every link, in milliseconds (default 5).
    latency_ms: float = sim_setting(default=5.0, section="network model", help="One-way link latency, ms.")
    #: Bandwidth of every link, in Mbit/s (default 100).
    bandwidth_mbps: float = sim_setting(default=100.0, section="network model", help="Link bandwidth, Mbit/s.")
    #: Probability that a message is lost, in [0, 1] (default 0).
    loss: float = sim_setting(default=0.0, section="network model", help="Probability that a message is lost.")
    #: Modelled compute time of one training step, in virtual milliseconds (default 10).
    step_time_ms: float = sim_setting(
        default=10.0, section="network model", help="Modelled compute time of one training step, virtual ms.")


@dataclass
class Churn:
    """Which share of the nodes crashes and comes back, and when."""

    #: Share of the nodes, chosen by the seed, that stop answering (default 0). In fl the server is never
    #: chosen: it is the reference.
    crash_fraction: float = sim_setting(
        default=0.0, section="churn",
        help="Share of the nodes (chosen by the seed) that stop answering at --crash-round.")
    #: They stop right after round ``crash_round - 1`` completes: they take no part in round ``crash_round``
    #: and later (default 1).
    crash_round: int = sim_setting(default=1, section="churn", help="First round without the crashed nodes.")
    #: They come back (and announce a join) right after round ``rejoin_round - 1``; None (default): never.
    rejoin_round: int | None = sim_setting(
        default=None, section="churn", help="First round in which they are back (default: never).")
    #: Share of the crashed nodes that come back, chosen by the seed (default 1.0).
    rejoin_fraction: float = sim_setting(
        default=1.0, section="churn", help="Share of the crashed nodes that come back at --rejoin-round.")

    def validate(self) -> None:
        if not 0.0 <= self.crash_fraction <= 1.0:
            raise ConfigError(f"crash_fraction={self.crash_fraction}: must be in [0, 1]")
        if self.crash_round < 1:
            raise ConfigError(f"crash_round={self.crash_round}: must be >= 1")
        if self.rejoin_round is not None and self.rejoin_round <= self.crash_round:
            raise ConfigError(f"rejoin_round={self.rejoin_round}: must be > crash_round={self.crash_round}")
        if not 0.0 <= self.rejoin_fraction <= 1.0:
            raise ConfigError(f"rejoin_fraction={self.rejoin_fraction}: must be in [0, 1]")


@dataclass
class Attackers:
    """Attacking nodes (they run ``config.attack``), outsiders without the run's secret, secagg dropouts."""

    #: Number of attacking nodes, chosen by the seed (default 0; in fl never the server). They run
    #: ``config.attack`` with ``config.attack_params``; accuracy in the results is then over honest nodes.
    byzantine: int = sim_setting(
        default=0, section="attackers",
        help="Number of attacking nodes (chosen by the seed) running --attack; accuracy is then over the honest "
             "nodes only.")
    #: Attackers see the honest updates of the same round (default True, the attack papers' threat model);
    #: False (``--local-attackers``): they use only what they hold themselves, as in the daemon.
    omniscient: bool = sim_setting(
        default=True, section="attackers", flag="--omniscient/--local-attackers",
        help="Attackers see the honest updates of the same round (--local-attackers: only what they hold "
             "themselves, as in the daemon).")
    #: gossip/dpsgd with ``admission = "secret"``: this many extra nodes (peer ids after the run's) that know
    #: the run id and every peer id but not the secret; they train on the shards of nodes 0, 1, ... and run
    #: rounds alongside the run, calling its nodes. Not in the results' rows; ``outsider_refusals`` counts
    #: what the run's nodes refused. Default 0.
    outsiders: int = sim_setting(
        default=0, section="attackers",
        help="gossip/dpsgd with --admission secret: extra nodes that know the run id but not the secret.")
    #: secagg fault injection: peer id (``node-NNNN``) -> stage (``advertise``, ``share``, ``masked``,
    #: ``unmask``); that node goes silent from that stage on in the first secure round it trains in (with
    #: ``unmask`` it has sent its masked input, so its update is in the sum). Default: none.
    secagg_silent: dict[str, str] = sim_setting(
        default_factory=dict, section="attackers", flag="--secagg-silent", metavar="PEER=STAGE",
        help="secagg: the node PEER (node-NNNN) goes silent from STAGE (advertise, share, masked, unmask) on in "
             "the first secure round it trains in (repeatable).")


@dataclass
class Recording:
    """Opt-in extra results; when off, the results are exactly those of a run without the option."""

    #: Add ``layer_variance`` to every round's row: for each floating-point entry of the model with more
    #: than one element, the population variance of its elements averaged over the live nodes' models
    #: (`simulator.analysis.layer_variance`). Default False.
    record_variance: bool = sim_setting(
        default=False, section="recording", flag="--record-variance",
        help="Add each round's per-layer weight variance, averaged over the live nodes, to the results.")


#: SimConfig field -> its section's dataclass.
SECTION_TYPES: dict[str, type] = {"network": LinkSettings, "churn": Churn, "attackers": Attackers,
                                  "recording": Recording}


def sim_node_config(**kw: Any) -> NodeConfig:
    """A `NodeConfig` with the simulator's defaults (`SIM_DEFAULTS`) under `kw`."""
    return NodeConfig(**{**SIM_DEFAULTS, **kw})


@dataclass
class SimConfig:
    """One simulated run: ``nodes`` nodes of ``config``, over the network model ``network``, with
    ``churn``, ``attackers`` and ``recording``.

    For ``gossip`` and ``dpsgd`` every live node runs each of ``config.rounds`` rounds in lockstep; for
    ``modest`` and ``fl`` a round is one model version (one completed aggregation). Node ``i`` is
    ``node-{i:04d}`` with shard ``i/nodes``; the run id is ``sim-<seed>`` unless ``config.run_id`` is set.
    Build it from flat keywords with `of`.
    """

    #: Number of simulated nodes (default 16).
    nodes: int = sim_setting(default=16, section="sim", help="Number of simulated nodes.")
    #: The nodes' settings: the daemon's `NodeConfig`, with `SIM_DEFAULTS`.
    config: NodeConfig = field(default_factory=sim_node_config)
    network: LinkSettings = field(default_factory=LinkSettings)
    churn: Churn = field(default_factory=Churn)
    attackers: Attackers = field(default_factory=Attackers)
    recording: Recording = field(default_factory=Recording)

    @classmethod
    def of(cls, **kw: Any) -> SimConfig:
        """A `SimConfig` from flat keywords: each is a field of `NodeConfig` (or its option key, such as
        ``init`` for ``model_seed_mode``) or of one of the simulator's sections, routed there by the schema.

        Raises:
            ConfigError: a keyword is no setting of either, or a `PER_NODE` one.
        """
        return cls().replace(**kw)

    def replace(self, **kw: Any) -> SimConfig:
        """A copy with the flat keywords `kw` (as for `of`) changed."""
        routes = sim_routes()
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in kw.items():
            where = routes.get(key)
            if where is None:
                hint = difflib.get_close_matches(key, sorted(routes), n=3)
                raise ConfigError(f"{key}={value!r} is not a setting of the simulator"
                                  + (f" (did you mean {' or '.join(hint)}?)" if hint else ""))
            section, name = where
            if section == "config" and name in PER_NODE:
                raise ConfigError(f"{key} is set per node by the simulator (shard i/nodes; fl server node-0000)")
            by_section.setdefault(section, {})[name] = value
        changes: dict[str, Any] = by_section.pop("", {})
        for section, values in by_section.items():
            changes[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """Every setting by its field name (``model_seed_mode`` as ``init``), the run's secret included."""
        out: dict[str, Any] = {}
        for section, name in sim_routes(aliases=False).values():
            value = getattr(self if section == "" else getattr(self, section), name)
            out["init" if name == "model_seed_mode" else name] = value
        return out

    @property
    def rounds(self) -> int:
        """``config.rounds``: rounds to simulate (a number; `validate` refuses an unset one)."""
        if self.config.rounds is None:
            raise ConfigError("rounds is unset: the simulator needs a number of rounds")
        return self.config.rounds

    # -- checks and per-node configs ------------------------------------------------------------------------
    def validate(self) -> SimConfig:
        """Check the simulator's own settings and every node's config (node 0 and the attackers).

        Raises:
            ConfigError: naming the key and the allowed values.
        """
        if self.nodes < 1:
            raise ConfigError(f"nodes={self.nodes}: must be >= 1")
        if self.config.rounds is None or self.config.rounds < 0:
            raise ConfigError(f"rounds={self.config.rounds}: the simulator needs a number of rounds >= 0")
        self.churn.validate()
        for name in ("latency_ms", "bandwidth_mbps", "step_time_ms"):
            if getattr(self.network, name) < 0:
                raise ConfigError(f"{name}={getattr(self.network, name)}: must be >= 0")
        if not 0.0 <= self.network.loss <= 1.0:
            raise ConfigError(f"loss={self.network.loss}: must be in [0, 1]")
        if self.config.fl_server is not None or self.config.shard != (0, 1):
            raise ConfigError("shard and fl_server are set per node by the simulator (shard i/nodes; fl server "
                              "node-0000)")
        for i in [0, *self.byzantine_indices()]:
            self.node_config(i)
        if self.attackers.outsiders:
            self.outsider_config(0)
        return self

    def byzantine_indices(self) -> list[int]:
        """The attacking nodes, chosen by the seed (in fl never node 0, the server)."""
        count, attack, seed = self.attackers.byzantine, self.config.attack, self.config.seed
        if count < 0:
            raise ConfigError(f"byzantine={count}: must be >= 0")
        if count == 0:
            return []
        if attack is None:
            raise ConfigError(f"byzantine={count} needs an attack (--attack NAME)")
        eligible = list(range(1, self.nodes)) if self.config.topology == "fl" else list(range(self.nodes))
        if count >= len(eligible):
            raise ConfigError(f"byzantine={count}: must leave at least one honest trainer of {len(eligible)}")
        return sorted(random.Random(f"byzantine/{seed}").sample(eligible, count))

    def byzantine_indices_ids(self) -> list[str]:
        """Peer ids of `byzantine_indices`."""
        return [sim_peer_id(i) for i in self.byzantine_indices()]

    @property
    def run_id(self) -> str:
        """The run id the nodes use: ``config.run_id``, or ``sim-<seed>`` (`SIM_RUN_ID`) when it is left at
        the daemon's default."""
        c = self.config
        return SIM_RUN_ID.format(seed=c.seed) if c.run_id == field_default(_NODE_FIELDS["run_id"]) else c.run_id

    def node_config(self, index: int) -> NodeConfig:
        """The validated config of node `index`: ``config`` with its shard, the run id, and the attack only
        on the attacking nodes."""
        self.churn.validate()
        c = self.config
        byzantine = index in self.byzantine_indices()
        return dataclasses.replace(
            c, run_id=self.run_id, shard=(index, self.nodes), rule_params=dict(c.rule_params),
            task_options=dict(c.task_options), attack=c.attack if byzantine else None,
            attack_params=dict(c.attack_params) if byzantine else {}).validate()

    def outsider_config(self, j: int) -> NodeConfig:
        """The config of outsider `j`: that of node ``j % nodes``, without the run's secret."""
        if self.attackers.outsiders < 0:
            raise ConfigError(f"outsiders={self.attackers.outsiders}: must be >= 0")
        if self.config.admission != "secret":
            raise ConfigError("outsiders need admission=secret (in an open run everyone is admitted)")
        if self.config.topology in EVENT_DRIVEN:
            raise ConfigError(f"outsiders run rounds alongside gossip or dpsgd, not {self.config.topology}")
        return dataclasses.replace(self.node_config(j % self.nodes), admission="open", run_secret=None).validate()

    def ignored_settings(self) -> list[str]:
        """The `NO_EFFECT` fields of ``config`` set to something other than their default."""
        return [name for name in NO_EFFECT if getattr(self.config, name) != field_default(_NODE_FIELDS[name])]


def sim_peer_id(index: int) -> str:
    """Peer id of simulated node `index` (readable and stable across runs)."""
    return f"node-{index:04d}"


_NODE_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def sim_schema() -> list[tuple[str, dataclasses.Field[Any], Setting]]:
    """``(section, field, setting)`` of every setting of `SimConfig`: ``""`` for its own fields (``nodes``),
    ``"config"`` for `NodeConfig`'s (those of `PER_NODE` left out), else the section's attribute name."""
    out: list[tuple[str, dataclasses.Field[Any], Setting]] = []
    for f in dataclasses.fields(SimConfig):
        if f.name == "config":
            out += [("config", g, meta) for g, meta in schema() if g.name not in PER_NODE]
        elif f.name in SECTION_TYPES:
            out += [(f.name, g, meta) for g, meta in schema(SECTION_TYPES[f.name])]
        else:
            out.append(("", f, setting_of(f)))
    return out


def sim_routes(aliases: bool = True) -> dict[str, tuple[str, str]]:
    """Flat keyword -> (section, field name) of every setting (`sim_schema`, plus ``shard``/``fl_server``,
    refused by `SimConfig.replace`); with `aliases`, option keys that differ from the field name too
    (``init``, ``aggregation_timeout``)."""
    routes: dict[str, tuple[str, str]] = {}
    for section, f, _ in sim_schema():
        routes[f.name] = (section, f.name)
    if aliases:
        for name in PER_NODE:
            routes[name] = ("config", name)
        for section, f, meta in sim_schema():
            routes.setdefault(meta.param, (section, f.name))
    return routes


def results_config(cfg: SimConfig) -> dict[str, Any]:
    """``cfg`` as written into the results: one flat object keyed by field name (``init`` for
    ``model_seed_mode``), secrets as ``***``.

    `RESULT_KEYS` are always written (what the results held before the simulator took every `NodeConfig`
    setting); any other setting only when it differs from its default in the simulator, and a few of
    `RESULT_KEYS` (opt-in recording, newer settings) only when set, so that a run without them gives the
    same file, byte for byte, as before they existed.
    """
    flat = cfg.flat()
    defaults = SimConfig().flat()
    out = {k: v for k, v in flat.items() if k in RESULT_KEYS or v != defaults[k]}
    for key in _ONLY_WHEN_SET:
        if key in out and out[key] == defaults[key]:
            del out[key]
    for key in SECRET_KEYS:
        if out.get(key) is not None:
            out[key] = MASK  # the secret never goes into a results file
    return {k: _jsonable(v) for k, v in out.items()}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


#: Keys of the results' ``config``, written whatever their value (see `results_config`).
RESULT_KEYS = frozenset({
    "nodes", "task", "task_options", "topology", "rule", "rule_params", "rounds", "seed", "alpha", "local_steps",
    "lr", "batch_size", "init", "latency_ms", "bandwidth_mbps", "loss", "step_time_ms", "exchange_timeout_s",
    "eval_every", "sample_size", "aggregators", "success_fraction", "aggregation_timeout_s", "sample_key",
    "inactivity_threshold", "dpsgd_graph", "dpsgd_degree", "outer_lr", "crash_fraction", "crash_round",
    "rejoin_round", "rejoin_fraction", "secagg", "secagg_neighbours", "secagg_threshold", "secagg_clip",
    "secagg_silent", "byzantine", "attack", "attack_params", "omniscient", "robust_window", "suspicion_decay",
    "exclude_suspects", "suspect_threshold"})
#: Keys of `RESULT_KEYS` or newer ones written only when they are not at their default.
_ONLY_WHEN_SET = ("record_variance", "secagg_groups", "secagg_min_group", "outer_momentum", "outer_nesterov",
                  "sync_warmup_steps", "sync_warmup_local_steps", "sync_warmup_outer",
                  "compression", "admission", "run_secret", "outsiders")


__all__ = ["NO_EFFECT", "PER_NODE", "SIM_DEFAULTS", "SIM_SECTIONS", "Attackers", "Churn", "LinkSettings",
           "Recording", "SimConfig", "results_config", "sim_peer_id", "sim_routes", "sim_schema"]
