"""Run and node configuration: one typed dataclass, validated once at start."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.errors import ConfigError

TOPOLOGIES = ("gossip", "modest", "fl", "dpsgd")
#: Topologies whose nodes send whole models to each other (no update both sides could decode against).
MODEL_TOPOLOGIES = ("gossip", "dpsgd")
SAMPLE_KEYS = ("model", "round")
DPSGD_GRAPHS = ("exponential", "regular")
#: Admission modes (`p2pnode.transport.admission`), the first one the default.
ADMISSION_MODES = ("open", "secret", "allowlist")
#: Fields never printed: `NodeConfig.as_dict` and ``p2pnode config show`` show them as `MASK`.
SECRET_KEYS = ("run_secret", "admission_key")
MASK = "***"
#: Sections of `NodeConfig`, in the order `p2pnode run --help` and the docs list them.
SECTIONS = ("run", "training", "diloco", "node", "network", "modest", "dpsgd", "secagg", "byzantine", "admission",
            "limits", "daemon")
_KEY = "p2pnode"
_UNSET: Any = object()


@dataclass(frozen=True)
class Setting:
    """What the schema knows of one `NodeConfig` field, besides its type and default.

    The click options of ``run``/``join``/``config``/``sim``/``swarm``, the TOML keys and the ``P2PNODE_*``
    variables are generated from this (`p2pnode.cli.options`), so adding an option means adding one field.

    Args:
        section: one of `SECTIONS`.
        help: the option's help text.
        param: option key, TOML key and environment suffix (default: the field name without a ``_s`` unit
            suffix, so ``min_round_time_s`` is ``min_round_time`` / ``--min-round-time`` /
            ``P2PNODE_MIN_ROUND_TIME``).
        flag: the click declaration when it is not ``--<param with dashes>`` (``--secagg/--no-secagg``).
        hashed: run-wide: hashed into `NodeConfig.config_hash` (for `topologies` only, when given).
        topologies: the topologies that use the field (empty: all).
        choices: allowed values, when they are a fixed set.
        metavar: the value's name in ``--help``.
        secret: never printed (``config show`` and `NodeConfig.as_dict` show `MASK`).
        flag_default: default of the option when it must differ from the field's (documented in `help`).
        hash_when: with `hashed`: the name of a field (often this one) that decides whether this one is hashed:
            only when that field is not at its default, so that the hash of runs made before the field
            existed (or without the feature) stays as it was. Empty (default): hashed whenever `hashed`.
        hash_always: with `hash_when`: topologies for which the field is hashed whatever its value (those
            that hashed it before `hash_when` applied).
    """

    section: str
    help: str
    param: str = ""
    flag: str = ""
    hashed: bool = False
    topologies: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    secret: bool = False
    flag_default: Any = _UNSET
    #: False: no generated option (the field is set through a hand-written one, named in `help`).
    option: bool = True
    hash_when: str = ""
    hash_always: tuple[str, ...] = ()


def setting(*, section: str, help: str, sections: tuple[str, ...] = SECTIONS, **kw: Any) -> Any:
    """A dataclass field of `NodeConfig` with its `Setting` attached (``default``/``default_factory``/``repr``
    go to `dataclasses.field`, the rest to `Setting`). `sections`: the allowed sections (default `SECTIONS`;
    the simulator's own settings, `simulator.settings`, have theirs)."""
    field_kw = {k: kw.pop(k) for k in ("default", "default_factory", "repr") if k in kw}
    meta = Setting(section=section, help=help, **kw)
    if meta.section not in sections:
        raise ValueError(f"section {meta.section!r} is not one of {sections}")
    return field(metadata={_KEY: meta}, **field_kw)


def setting_of(f: dataclasses.Field[Any]) -> Setting:
    """The `Setting` of a `NodeConfig` field, with `Setting.param` filled in."""
    meta: Setting = f.metadata[_KEY]
    if not meta.param:
        param = f.name[:-2] if f.name.endswith("_s") else f.name
        meta = dataclasses.replace(meta, param=param)
    return meta


def schema(cls: Any = None) -> list[tuple[dataclasses.Field[Any], Setting]]:
    """Every field of `cls` (default `NodeConfig`; also `DaemonSettings`) with its `Setting`, in order."""
    return [(f, setting_of(f)) for f in dataclasses.fields(NodeConfig if cls is None else cls)]


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The default value of field `f` (a fresh one for a ``default_factory``)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@dataclass
class NodeConfig:
    """Everything one node needs to take part in a run.

    Run-wide keys (equal on every peer, hashed into `config_hash`): `run_id`, `task`, `task_options`,
    `topology`, `rule`, `model_seed_mode`. The rest is local to the node.
    """

    #: Name of the run; peers of different runs never talk to each other.
    run_id: str = setting(default="default", section="run", help="Name of the run to take part in.", hashed=True)
    #: Task name (``digits-mlp``, ``cifar10-resnet18`` or ``package.module:factory``).
    task: str = setting(
        default="digits-mlp", section="training",
        help="Task: digits-mlp, cifar10-resnet18, tiny-lm, or package.module:factory.", hashed=True)
    #: Options of the task, passed to its factory (for example ``{"size": "tiny"}`` for ``tiny-lm``). Run-wide:
    #: every node must build the same model from the same data; hashed only when given, so that the hash of
    #: runs without options stays as it was.
    task_options: dict[str, Any] = setting(
        default_factory=dict, section="training",
        help="Option of the task (repeatable), for example size=tiny for tiny-lm.", hashed=True,
        hash_when="task_options", flag="--task-option", metavar="KEY=VALUE")
    #: Who exchanges with whom: ``gossip`` (push-pull with random peers), ``modest`` (a sample of trainers and
    #: aggregators per round), ``fl`` (federated learning with one fixed server, a baseline) or ``dpsgd``
    #: (every node averages with its graph neighbours every round, a baseline). See docs/protocols.md.
    topology: str = setting(
        default="gossip", section="training",
        help="Who exchanges with whom: gossip, modest (sampled trainers and aggregators), fl (one fixed server; "
             "baseline), dpsgd (neighbour averaging; baseline).",
        hashed=True, choices=TOPOLOGIES)
    #: Aggregation rule used to merge models (see `p2pnode.aggregation.available_rules()`).
    rule: str = setting(default="mean", section="training", help="Aggregation rule for merging models.", hashed=True)
    #: Extra parameters of the rule (for example ``{"trim": 1}``).
    rule_params: dict[str, Any] = setting(
        default_factory=dict, section="training", help="Parameter of the rule (repeatable), for example trim=1.",
        hashed=True, flag="--rule-param", metavar="KEY=VALUE")
    #: ``shared``: every node starts from the model built with `seed`; ``independent``: each node its own.
    model_seed_mode: str = setting(
        default="shared", section="training", help="One initial model for all nodes, or one per node.", hashed=True,
        param="init", choices=("shared", "independent"))
    #: Seed of the run: initial model, data split, peer choice.
    seed: int = setting(default=0, section="training", help="Seed of the run.")
    #: This node's data shard: (index, count). (0, 1) means all of the task's training data.
    shard: tuple[int, int] = setting(
        default=(0, 1), section="node", help="This node's share of the task's training data, INDEX/COUNT.")
    #: Dirichlet concentration for a non-IID split; None for IID.
    alpha: float | None = setting(
        default=None, section="training", help="Dirichlet alpha for a non-IID split (unset: IID).")
    #: Local SGD steps per round; None takes the task's default.
    local_steps: int | None = setting(
        default=None, section="training", help="Local SGD steps per round [task default].")
    #: Learning rate and batch size; None takes the task's default.
    lr: float | None = setting(default=None, section="training", help="Learning rate [task default].")
    batch_size: int | None = setting(default=None, section="training", help="Batch size [task default].")
    #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = setting(default="auto", section="node", help="auto, cpu, cuda or cuda:N.")
    #: Rounds to run; None runs until stopped.
    rounds: int | None = setting(default=None, section="node", help="Rounds to run (default: until stopped).")
    #: Shortest wall time of one round, in seconds (default 0; ``run`` paces a real swarm with 1).
    min_round_time_s: float = setting(
        default=0.0, section="node", help="Shortest round, in seconds (paces the swarm).", flag_default=1.0)
    #: Time allowed for one model exchange with a peer, in seconds.
    exchange_timeout_s: float = setting(default=30.0, section="node", help="Seconds allowed for one model exchange.")
    #: Evaluate the model on the held-out test split every this many rounds (0: never).
    eval_every: int = setting(
        default=1, section="node", help="Evaluate on the held-out test split every this many rounds (0: never).")
    #: Listen address and port (0 picks a free port) of the libp2p host.
    host: str = setting(default="127.0.0.1", section="network", help="Address to listen on.")
    port: int = setting(default=0, section="network", help="Port to listen on (0: any free).")
    #: Multiaddrs of peers to join.
    initial_peers: list[str] = setting(
        default_factory=list, section="network", help="Multiaddr of a peer to join (repeatable).",
        flag="--initial-peer", metavar="MULTIADDR")
    #: Before the first round, wait until this many peers are visible (0: start at once).
    wait_for_peers: int = setting(
        default=0, section="network",
        help="Before the first round, wait until this many peers are visible (at most --wait-timeout s).")
    #: Longest wait for `wait_for_peers`, in seconds; then the node starts with whom it sees.
    wait_timeout_s: float = setting(
        default=60.0, section="network",
        help="Longest wait for --wait-for-peers, in seconds; then the node starts with whom it sees.")
    #: Seconds a directory record lives unless refreshed.
    announce_ttl_s: float = setting(
        default=60.0, section="network", help="Seconds a directory record lives unless refreshed.")
    #: Shortest time between two reads of the peer directory from the DHT, in seconds (default 3): callers in
    #: between (every round's partner choice) use the last read's view. See `DHTDirectory`.
    directory_read_interval_s: float = setting(
        default=3.0, section="network",
        help="Shortest time, in seconds, between two reads of the peer directory from the DHT; rounds in "
             "between choose partners from the last read (0: read every round).")
    #: Largest message sent or accepted, in bytes.
    max_message_bytes: int = setting(
        default=1 << 30, section="limits", help="Largest message sent or accepted, in bytes.")

    # -- modest and fl (algorithms.md 3.5; the authors' values in brackets where ours differ) ---------------
    #: ``s``: trainers per round (default 10).
    sample_size: int = setting(
        default=10, section="modest", help="modest/fl: trainers per round (s).", hashed=True,
        topologies=("modest", "fl"))
    #: ``a``: aggregators per round (default 1; fl always uses its one server).
    aggregators: int = setting(
        default=1, section="modest", help="modest: aggregators per round (a).", hashed=True, topologies=("modest",))
    #: ``sf``: an aggregator completes with ``floor(sf * s)`` trained models, in (0, 1] (default 1.0).
    success_fraction: float = setting(
        default=1.0, section="modest", help="modest/fl: an aggregator completes with floor(F * s) trained models.",
        hashed=True, topologies=("modest", "fl"))
    #: Seconds from an aggregation's first model to its deadline (default 60 [5 s code default, 2 s in the
    #: MW'23 simulations, 300 s in the latest code]).
    aggregation_timeout_s: float = setting(
        default=60.0, section="modest",
        help="modest/fl: seconds from an aggregation's first model to its deadline [60].",
        topologies=("modest", "fl"), flag_default=None)
    #: Models an aggregator needs at its deadline (default 3, the latest code's liveness rule); with fewer
    #: it sends the base model to more peers (top-up).
    liveness_min: int = setting(
        default=3, section="modest",
        help="modest/fl: models an aggregator needs at its deadline; with fewer it tops up.",
        topologies=("modest", "fl"))
    #: Top-ups before an aggregator combines what it has (default 2).
    max_topups: int = setting(
        default=2, section="modest", help="modest/fl: top-ups before an aggregator combines what it has.",
        topologies=("modest", "fl"))
    #: Seconds before a candidate that does not answer pings counts as unavailable (default 5).
    ping_timeout_s: float = setting(
        default=5.0, section="modest",
        help="modest/fl: seconds before a candidate that does not answer pings is unavailable.",
        topologies=("modest", "fl"))
    #: A ping is re-sent every this many seconds until `ping_timeout_s` (default 1).
    ping_interval_s: float = setting(
        default=1.0, section="modest", help="modest/fl: seconds between pings of a candidate.",
        topologies=("modest", "fl"))
    #: Rounds without activity after which a peer leaves the active set (default 50 [1000 in the sims]).
    inactivity_threshold: int = setting(
        default=50, section="modest", help="modest/fl: rounds without activity before a peer leaves the active set.",
        topologies=("modest", "fl"))
    #: Peers told about a join or leave (default None: ``min(10 * sample_size, view size)``).
    join_fanout: int | None = setting(
        default=None, section="modest", help="modest/fl: peers told about a join or leave [min(10 * s, view size)].",
        topologies=("modest", "fl"))
    #: ``model``: the order of round k is keyed by the digest of model k-2, against sample grinding
    #: (default); ``round``: by the round number only (the reference).
    sample_key: str = setting(
        default="model", section="modest",
        help="modest: key the sample order of round k by the digest of model k-2 (model, against sample grinding) or "
             "by the round number only (round, the reference).",
        hashed=True, topologies=("modest",), choices=SAMPLE_KEYS)
    #: Longest wait of a round for a model, in seconds; an idle node then refreshes its view (default 20).
    idle_timeout_s: float = setting(
        default=20.0, section="modest",
        help="modest/fl: longest wait of a round for a model, in seconds; an idle node then refreshes its view.",
        topologies=("modest", "fl"))
    #: fl: peer id of the server (default None: the lowest peer id of the initial view).
    fl_server: str | None = setting(
        default=None, section="modest", help="fl: peer id of the server [lowest peer id at start].", hashed=True,
        topologies=("fl",))

    # -- DiLoCo outer optimizer and wire compression (every topology; docs/protocols.md, docs/compression.md) --
    #: Outer optimizer (DiLoCo-style Nesterov SGD on the pseudo-gradient ``theta0 - merged``): its learning
    #: rate, or None (default) for none; its momentum (default 0.9) and Nesterov flag (default True). Every
    #: topology: gossip and dpsgd step it on each node after the merge (buffers local to the node), modest and fl
    #: on the aggregator (buffers travel with the model). Hashed for modest/fl always (as they were), for
    #: gossip/dpsgd only when outer_lr is set (runs without it keep their hash).
    outer_lr: float | None = setting(
        default=None, section="diloco",
        help="DiLoCo: learning rate of the outer Nesterov optimizer on the pseudo-gradient (round-start model minus "
             "the merge), stepped after every merge (unset: none, plain merge).",
        hashed=True, topologies=TOPOLOGIES, hash_when="outer_lr", hash_always=("modest", "fl"))
    outer_momentum: float = setting(
        default=0.9, section="diloco", help="DiLoCo: momentum of the outer optimizer, in [0, 1).", hashed=True,
        topologies=TOPOLOGIES, hash_when="outer_lr", hash_always=("modest", "fl"))
    outer_nesterov: bool = setting(
        default=True, section="diloco", help="DiLoCo: Nesterov momentum in the outer optimizer.", hashed=True,
        topologies=TOPOLOGIES, flag="--outer-nesterov/--no-outer-nesterov", hash_when="outer_lr",
        hash_always=("modest", "fl"))
    #: Wire format of the exchanged tensors (`p2pnode.transport.compression`): ``none`` (default), ``fp16``,
    #: ``bf16``, ``int8[:<block>]`` or ``topk:<fraction>``. Run-wide: hashed when not ``none``. gossip and
    #: dpsgd send whole models (topk refused); modest and fl send updates from trainers (with error feedback,
    #: topk allowed) and models from aggregators (topk: those travel raw). Not with secagg (lossy).
    compression: str = setting(
        default="none", section="diloco",
        help="Wire compression of exchanged tensors: none, fp16, bf16, int8[:BLOCK] or topk:FRACTION (topk: modest/fl "
             "trainer updates only); run-wide.",
        hashed=True, hash_when="compression", metavar="FORMAT")

    # -- secure aggregation (modest and fl; algorithms.md 5, docs/secagg.md) ---------------------------------
    #: Secure aggregation inside each sample: the aggregator learns only the sum of the trainers' updates
    #: (SecAgg / SecAgg+ with dropout recovery). Needs topology modest or fl and rule mean or vca (default off).
    secagg: bool = setting(
        default=False, section="secagg", hashed=True,
        help="modest/fl: secure aggregation inside each sample; the aggregator learns only the sum of the updates "
             "(rule mean or vca).",
        topologies=("modest", "fl"), flag="--secagg/--no-secagg")
    #: ``k``: other trainers each trainer masks and shares with (default None: all of the sample up to 32
    #: trainers, else the smallest k of docs/secagg.md, about O(log n)); even unless it covers the sample.
    secagg_neighbours: int | None = setting(
        default=None, section="secagg", hashed=True,
        help="secagg: trainers each trainer masks and shares with, k [the whole sample up to 32, else about O(log n)].",
        topologies=("modest", "fl"))
    #: ``t``: shares needed to reconstruct a trainer's secrets, a strict majority of its k + 1 holders
    #: (default None: the smallest integer above 2/3 of them, 7 of 10). A round with fewer than ``t``
    #: trainers left is aborted, counted and reported; its updates are not applied.
    secagg_threshold: int | None = setting(
        default=None, section="secagg", hashed=True,
        help="secagg: shares needed to recover a trainer's secrets, t [above 2/3 of k + 1]; a round with fewer "
             "trainers left is aborted.",
        topologies=("modest", "fl"))
    #: Coordinates of the (model - base) update are clipped to [-clip, clip] before the fixed-point
    #: encoding with 2^22 levels (default 8.0: step 3.8e-6).
    secagg_clip: float = setting(
        default=8.0, section="secagg", hashed=True,
        help="secagg: updates are clipped to [-C, C] before the fixed-point encoding.", topologies=("modest", "fl"))
    #: ``G``: split each sample into G secure groups, member i (in the sample's order) in group i mod G
    #: (default 1: one instance per sample). The aggregator learns the G group means instead of one sum
    #: and combines them with ``rule``, which may then be robust (median, krum, ...) if it tolerates
    #: ``f`` (default 1) Byzantine groups among G. Needs secagg and sample_size >= secagg_min_group * G.
    #: With ``aggregators`` a > 1 (modest) the groups are spread over the aggregators (G >= a), which
    #: exchange their group sums: each trainer uploads once (docs/secagg.md).
    secagg_groups: int = setting(
        default=1, section="secagg", hashed=True,
        help="secagg: split each sample into G secure groups (member i in group i mod G); the aggregator combines the "
             "G group means with --rule, which may then be robust.",
        topologies=("modest", "fl"))
    #: With ``secagg_groups > 1``: fewest members a secure group may have (default 5, at least 2). The
    #: aggregator learns each group's mean, so a small group says much about each member; the config is
    #: refused when ``floor(sample_size / G)`` is smaller, and at run time a trainer whose group came out
    #: smaller (peers missing from the sample) does not train that version (``secagg_small_group``).
    secagg_min_group: int = setting(
        default=5, section="secagg", hashed=True,
        help="secagg with --secagg-groups: fewest members of a group (>= 2); the aggregator learns each group's mean, "
             "so small groups say much about each member.",
        topologies=("modest", "fl"))
    # -- Byzantine peers (local: never hashed, so an attacker is indistinguishable by its config) -----------
    #: Attack this node runs (``p2pnode.attacks.available_attacks()``), or None (default) for an honest node.
    #: For testing a swarm's defences only: the node forges what it sends.
    attack: str | None = setting(
        default=None, section="byzantine",
        help="Run as an ATTACKER that sends forged models (testing only; logged loudly): sign_flip, gaussian, scaled, "
             "alie, ipm, random or label_flip.",
        metavar="NAME")
    #: Parameters of the attack (for example ``{"factor": 10}``).
    attack_params: dict[str, Any] = setting(
        default_factory=dict, section="byzantine", help="Parameter of the attack (repeatable), for example factor=10.",
        flag="--attack-param", metavar="KEY=VALUE")
    #: gossip: merges over which received models are kept for the rule (None, the default: 4 for a robust
    #: rule, 1 otherwise). See docs/protocols.md for the trade-off.
    robust_window: int | None = setting(
        default=None, section="byzantine",
        help="gossip: merges over which received models are kept for the rule [4 for a robust rule, else 1].",
        topologies=("gossip",))
    #: Weight of the old suspicion score in each update, in [0, 1) (default 0.8).
    suspicion_decay: float = setting(
        default=0.8, section="byzantine", help="Weight of the old suspicion score in each update, in [0, 1).")
    #: Leave out peers whose suspicion exceeds `suspect_threshold`: gossip does not pick or merge them, a
    #: MoDeST aggregator does not combine their models (default False).
    exclude_suspects: bool = setting(
        default=False, section="byzantine",
        help="Leave out peers whose suspicion score exceeds --suspect-threshold (gossip: not picked or merged; modest:"
             " their models not aggregated).",
        flag="--exclude-suspects")
    #: Suspicion score above which a peer is a suspect (default 1.0).
    suspect_threshold: float = setting(
        default=1.0, section="byzantine", help="Suspicion score above which a peer is a suspect.")

    # -- admission (local: never hashed; the secret never leaves this node) ----------------------------------
    #: Who may fetch and push this run's models: ``open`` (default: the run's models are public; anyone who
    #: knows the run id can fetch and push models), ``secret`` (only peers holding the run's secret) or
    #: ``allowlist`` (only the peers in `allow_peers`; may be combined with a secret). See docs/daemon.md.
    admission: str = setting(
        default="open", section="admission",
        help="Who may fetch and push the run's models. open: the run's models are public: anyone who knows the run id "
             "can fetch and push models. secret: only peers holding the run's secret. allowlist: only the peers of "
             "--allow-peers (may be combined with a secret).",
        choices=ADMISSION_MODES)
    #: The run's secret (at least 16 bytes), for ``admission = "secret"``; prefer `run_secret_file`, since a
    #: command line is visible to other users of the machine. Never printed, never sent.
    run_secret: str | None = setting(
        default=None, repr=False, section="admission",
        help="The run's secret itself (visible to other users in the process list: prefer --run-secret-file or the "
             "P2PNODE_RUN_SECRET environment variable).",
        metavar="SECRET", secret=True)
    #: File holding the run's secret (surrounding whitespace ignored).
    run_secret_file: str | None = setting(
        default=None, section="admission",
        help="File holding the run's secret (at least 16 bytes; preferred over --run-secret).", metavar="FILE")
    #: Peer ids admitted with ``admission = "allowlist"`` (or in addition to a secret).
    allow_peers: list[str] = setting(
        default_factory=list, section="admission",
        help="Peer ids admitted with --admission allowlist (comma-separated, repeatable).", metavar="ID1,ID2")
    #: The run key itself (URL-safe base64 of 32 bytes), as an invite token carries it, instead of a secret.
    admission_key: str | None = setting(
        default=None, repr=False, section="admission",
        help="The run key itself (URL-safe base64 of 32 bytes), as an invite token carries it; instead of a secret.",
        metavar="KEY", secret=True)

    # -- dpsgd ---------------------------------------------------------------------------------------------
    #: Communication graph: ``exponential`` (one-peer exponential, default) or ``regular`` (random regular).
    dpsgd_graph: str = setting(
        default="exponential", section="dpsgd", help="dpsgd: one-peer exponential graph, or a random regular graph.",
        hashed=True, topologies=("dpsgd",), choices=DPSGD_GRAPHS)
    #: Degree of the ``regular`` graph (default 4).
    dpsgd_degree: int = setting(
        default=4, section="dpsgd", help="dpsgd: degree of the regular graph.", hashed=True, topologies=("dpsgd",))

    #: Most subkeys (peer records) this node's DHT stores under the run's directory key (default 512,
    #: `p2pnode.discovery.quota.DEFAULT_MAX_SUBKEYS`); new ones beyond it are refused (``dht_refused_over_quota``),
    #: records already stored are always refreshed. Raise it for swarms of more than a few hundred peers.
    directory_max_subkeys: int = setting(
        default=512, section="limits",
        help="Most peer records this node's DHT stores under the run's key; new ones beyond it are refused "
             "(junk flood), stored ones are always refreshed.")

    # -- limits of the libp2p transport (local; defaults are `p2pnode.transport.p2p`'s, checked by a test) ------
    #: Bytes of inbound messages being received at once, all peers together (None: 2 x `max_message_bytes`).
    max_inflight_bytes: int | None = setting(
        default=None, section="limits",
        help="Receive budget: bytes of inbound messages in flight, all peers together [2 x max message bytes].")
    #: The same, per peer (None: a quarter of `max_inflight_bytes`, at least one message).
    max_inflight_bytes_per_peer: int | None = setting(
        default=None, section="limits",
        help="Per-peer receive budget: bytes of one peer's inbound messages in flight [max(budget / 4, max "
             "message bytes)].")
    #: Inbound streams served at once, all peers together (default 128) and per peer (default 8).
    max_streams: int = setting(default=128, section="limits", help="Inbound streams served at once, all peers.")
    max_streams_per_peer: int = setting(default=8, section="limits", help="Inbound streams served at once per peer.")
    #: Slowest accepted sender, in bytes/s (default 64 KiB/s), after a grace of `receive_grace_s` (default 5).
    min_receive_rate: float = setting(
        default=64.0 * 1024, section="limits",
        help="Slowest accepted inbound rate, in bytes/s, averaged after the grace period; slower senders are "
             "cut off.")
    receive_grace_s: float = setting(
        default=5.0, section="limits", help="Seconds of a message before --min-receive-rate applies.")
    #: Bytes of large receive buffers kept for reuse (default 512 MiB; 0: off).
    receive_pool_bytes: int = setting(
        default=512 << 20, section="limits", help="Bytes of large receive buffers kept for reuse (0: off).")
    #: Direct TLS channel for bulk tensors (docs/transport.md): on (default), from `direct_threshold` bytes
    #: (default 1 MiB); a peer whose direct connection failed is called over libp2p for `direct_retry_s`
    #: (default 60); a connection attempt may take `direct_connect_timeout_s` (default 5).
    direct: bool = setting(
        default=True, section="limits", flag="--direct/--no-direct",
        help="Send large messages over a direct TLS channel when the peer is reachable (libp2p otherwise).")
    direct_threshold: int = setting(
        default=1 << 20, section="limits", help="Smallest message, in bytes, sent over the direct channel.")
    direct_retry_s: float = setting(
        default=60.0, section="limits",
        help="Seconds a peer whose direct connection failed is called over libp2p only.")
    direct_connect_timeout_s: float = setting(
        default=5.0, section="limits", help="Seconds allowed to open a direct connection.")
    #: Caps of the direct channel's listener, which anyone who reaches its address can connect to (defaults
    #: are `p2pnode.transport.direct`'s): connections at once (128), of them in their TLS handshake (64),
    #: admitted connections per peer (8), unused tickets per peer (32) and in all (4096); and the longest
    #: TLS handshake plus first token (None: the larger of 30 s and the transport's idle timeout).
    direct_max_connections: int = setting(
        default=128, section="limits", help="Direct channel: most connections at once (in their handshake, "
                                            "serving or idle).")
    direct_max_pending: int = setting(
        default=64, section="limits", help="Direct channel: most connections still in their TLS handshake; "
                                           "beyond it the oldest is closed.")
    direct_max_connections_per_peer: int = setting(
        default=8, section="limits", help="Direct channel: most admitted connections of one peer.")
    direct_max_tickets_per_peer: int = setting(
        default=32, section="limits", help="Direct channel: most unused tickets of one peer (beyond it, its "
                                           "messages go over libp2p).")
    direct_max_tickets: int = setting(
        default=4096, section="limits", help="Direct channel: most unused tickets of all peers; the oldest "
                                             "are dropped beyond it.")
    direct_handshake_timeout_s: float | None = setting(
        default=None, section="limits",
        help="Direct channel: seconds allowed for a client's TLS handshake and first token [30].")

    #: Refusal budget (`p2pnode.transport.tarpit`): a peer refused on the wire more than `tarpit_refusals`
    #: times (default 20; 0: off) within `tarpit_window_s` (default 10 s) has its streams held unread for
    #: `tarpit_hold_s` (default 5 s) each, then closed, for `tarpit_window_s`.
    tarpit_refusals: int = setting(
        default=20, section="limits",
        help="Refusals of one peer (unknown method, malformed, not admitted, replayed, ...) allowed within "
             "--tarpit-window before its streams are held unread (0: off).")
    tarpit_window_s: float = setting(
        default=10.0, section="limits", help="Seconds of the refusal budget's window, and of the penalty.")
    tarpit_hold_s: float = setting(
        default=5.0, section="limits",
        help="Seconds each stream of a peer past its refusal budget is held unread before it is closed.")

    def transport_limits(self) -> dict[str, Any]:
        """The keyword arguments of `P2PTransport` that the ``limits`` section sets."""
        return {"max_message_bytes": self.max_message_bytes, "max_inflight_bytes": self.max_inflight_bytes,
                "max_inflight_bytes_per_peer": self.max_inflight_bytes_per_peer, "max_streams": self.max_streams,
                "max_streams_per_peer": self.max_streams_per_peer, "min_receive_rate": self.min_receive_rate,
                "receive_grace_s": self.receive_grace_s, "receive_pool_bytes": self.receive_pool_bytes,
                "direct": self.direct, "direct_threshold": self.direct_threshold,
                "direct_retry_s": self.direct_retry_s, "direct_connect_timeout": self.direct_connect_timeout_s,
                "direct_max_connections": self.direct_max_connections,
                "direct_max_pending": self.direct_max_pending,
                "direct_max_connections_per_peer": self.direct_max_connections_per_peer,
                "direct_max_tickets_per_peer": self.direct_max_tickets_per_peer,
                "direct_max_tickets": self.direct_max_tickets,
                "direct_handshake_timeout": self.direct_handshake_timeout_s,
                "tarpit_refusals": self.tarpit_refusals, "tarpit_window_s": self.tarpit_window_s,
                "tarpit_hold_s": self.tarpit_hold_s}

    def _validate_limits(self) -> None:
        for key in ("max_message_bytes", "max_streams", "max_streams_per_peer", "direct_threshold",
                    "direct_max_connections", "direct_max_pending", "direct_max_connections_per_peer",
                    "direct_max_tickets_per_peer", "direct_max_tickets"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        for key in ("max_inflight_bytes", "max_inflight_bytes_per_peer"):
            v = getattr(self, key)
            if v is not None and v < self.max_message_bytes:
                raise ConfigError(f"{key}={v}: must be >= max_message_bytes={self.max_message_bytes} (or unset), "
                                  "else no message of the largest size could ever be received")
        for key in ("min_receive_rate", "receive_grace_s", "receive_pool_bytes", "direct_retry_s", "tarpit_refusals",
                    "tarpit_hold_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 0")
        if not self.tarpit_window_s > 0:
            raise ConfigError(f"tarpit_window_s={self.tarpit_window_s}: must be > 0")
        if not self.direct_connect_timeout_s > 0:
            raise ConfigError(f"direct_connect_timeout_s={self.direct_connect_timeout_s}: must be > 0")
        if self.direct_handshake_timeout_s is not None and not self.direct_handshake_timeout_s > 0:
            raise ConfigError(f"direct_handshake_timeout_s={self.direct_handshake_timeout_s}: must be > 0 (or unset)")

    def validate(self) -> NodeConfig:
        """Check every value once; raise `ConfigError` naming the key and the allowed values."""
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"topology={self.topology!r} is not supported; allowed: {', '.join(TOPOLOGIES)}")
        if self.model_seed_mode not in ("shared", "independent"):
            raise ConfigError(f"model_seed_mode={self.model_seed_mode!r}; allowed: shared, independent")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard={index}/{count}: need 0 <= index < count")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha}: must be > 0 (or unset for IID)")
        for key in ("local_steps", "batch_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key}={v}: must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if self.rounds is not None and self.rounds < 0:
            raise ConfigError(f"rounds={self.rounds}: must be >= 0")
        for key in ("exchange_timeout_s", "announce_ttl_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be > 0")
        if self.directory_max_subkeys < 1:
            raise ConfigError(f"directory_max_subkeys={self.directory_max_subkeys}: must be at least 1")
        if self.directory_read_interval_s < 0:
            raise ConfigError(f"directory_read_interval_s={self.directory_read_interval_s}: must be >= 0")
        if self.wait_for_peers < 0:
            raise ConfigError(f"wait_for_peers={self.wait_for_peers}: must be >= 0")
        if self.min_round_time_s < 0:
            raise ConfigError(f"min_round_time_s={self.min_round_time_s}: must be >= 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port}: must be in 0..65535")
        from p2pnode.aggregation import available_rules  # local: config is a leaf module

        if self.rule not in available_rules():
            raise ConfigError(f"rule={self.rule!r} is unknown; allowed: {', '.join(available_rules())}")
        self._validate_topology_settings()
        self._validate_byzantine_settings()
        self._validate_admission()
        self._validate_limits()
        return self

    def _validate_admission(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ConfigError(f"admission={self.admission!r}; allowed: {', '.join(ADMISSION_MODES)}")
        given = [k for k in ("run_secret", "run_secret_file", "admission_key") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} are both set; allowed: one source of the run's secret")
        if self.admission == "open" and (given or self.allow_peers):
            what = given[0] if given else "allow_peers"
            raise ConfigError(f"{what} is set but admission=open serves everyone; use --admission "
                              f"{'secret' if given else 'allowlist'} (or drop {what})")
        if self.admission == "secret" and not given:
            raise ConfigError("admission=secret needs the run's secret: --run-secret-file FILE (preferred) or "
                              "--run-secret (or join with an invite token)")
        if self.admission == "allowlist" and not self.allow_peers:
            raise ConfigError("admission=allowlist needs --allow-peers ID1,ID2,... (the peer ids it serves)")
        if any(not isinstance(p, str) or not p.strip() for p in self.allow_peers):
            raise ConfigError(f"allow_peers={self.allow_peers}: every entry must be a peer id")
        if given:
            self.admission_key_bytes()  # reads the file and checks the secret now, not at the first request

    def admission_key_bytes(self) -> bytes | None:
        """The run key (32 bytes) derived from the secret (or given by an invite token); None without one.

        Raises:
            ConfigError: the secret file cannot be read, the secret is too short, or the key is malformed.
        """
        from p2pnode.transport.admission import KEY_BYTES, MIN_SECRET_BYTES, derive_key

        if self.admission_key:
            try:
                key = base64.urlsafe_b64decode(self.admission_key + "=" * (-len(self.admission_key) % 4))
            except (binascii.Error, ValueError) as e:
                raise ConfigError(f"admission_key is not URL-safe base64: {e}") from None
            if len(key) != KEY_BYTES:
                raise ConfigError(f"admission_key holds {len(key)} bytes, expected {KEY_BYTES}")
            return key
        secret: bytes | None = None
        if self.run_secret_file:
            path = Path(self.run_secret_file).expanduser()
            try:
                secret = path.read_bytes().strip()
            except OSError as e:
                raise ConfigError(f"run_secret_file={str(path)!r}: cannot read it: {e.strerror or e}") from None
            where = f"the file {path}"
        elif self.run_secret:
            secret = self.run_secret.encode()
            where = "run_secret"
        if secret is None:
            return None
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the run secret in {where} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are "
                              f"needed (records' MACs are public, so a short secret can be guessed): make one with "
                              f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return derive_key(secret, self.run_id)

    def _validate_byzantine_settings(self) -> None:
        if self.attack is not None:
            from p2pnode.attacks import attack_info, available_attacks  # local: config is a leaf module
            from p2pnode.errors import AggregationError

            if self.attack not in available_attacks():
                raise ConfigError(f"attack={self.attack!r} is unknown; allowed: {', '.join(available_attacks())}")
            unknown = sorted(set(self.attack_params) - set(attack_info(self.attack).params))
            if unknown:
                allowed = ", ".join(attack_info(self.attack).params) or "none"
                raise ConfigError(f"attack_params {unknown} are not parameters of {self.attack}; allowed: {allowed}")
            try:
                for k, v in self.attack_params.items():
                    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                        raise AggregationError(f"attack parameter {k}={v!r}: must be a number")
            except AggregationError as e:
                raise ConfigError(str(e)) from e
        elif self.attack_params:
            raise ConfigError(f"attack_params={self.attack_params} given without an attack")
        if self.robust_window is not None and self.robust_window < 1:
            raise ConfigError(f"robust_window={self.robust_window}: must be >= 1")
        if self.robust_window is not None and self.topology != "gossip":
            raise ConfigError(f"robust_window={self.robust_window} needs topology gossip (got {self.topology!r}); "
                              "modest and fl aggregators apply the rule to their sample's models")
        if self.exclude_suspects and self.topology == "dpsgd":
            raise ConfigError("exclude_suspects needs topology gossip, modest or fl: dpsgd does not score peers")
        if not 0.0 <= self.suspicion_decay < 1.0:
            raise ConfigError(f"suspicion_decay={self.suspicion_decay}: must be in [0, 1)")
        if not self.suspect_threshold > 0:
            raise ConfigError(f"suspect_threshold={self.suspect_threshold}: must be > 0")

    def _validate_topology_settings(self) -> None:
        for key in ("sample_size", "aggregators", "liveness_min", "inactivity_threshold", "dpsgd_degree"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.max_topups < 0:
            raise ConfigError(f"max_topups={self.max_topups}: must be >= 0")
        if self.join_fanout is not None and self.join_fanout < 1:
            raise ConfigError(f"join_fanout={self.join_fanout}: must be >= 1 (or unset for min(10 * s, view))")
        if not 0 < self.success_fraction <= 1:
            raise ConfigError(f"success_fraction={self.success_fraction}: must be in (0, 1]")
        for key in ("aggregation_timeout_s", "ping_timeout_s", "ping_interval_s", "idle_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be > 0")
        if self.sample_key not in SAMPLE_KEYS:
            raise ConfigError(f"sample_key={self.sample_key!r}; allowed: {', '.join(SAMPLE_KEYS)}")
        if self.dpsgd_graph not in DPSGD_GRAPHS:
            raise ConfigError(f"dpsgd_graph={self.dpsgd_graph!r}; allowed: {', '.join(DPSGD_GRAPHS)}")
        self._validate_diloco()
        self._validate_secagg()
        if self.topology == "modest" and self.aggregators > self.sample_size:
            raise ConfigError(f"aggregators={self.aggregators} exceeds sample_size={self.sample_size}; "
                              f"allowed: 1..{self.sample_size}")

    def _validate_diloco(self) -> None:
        if self.outer_lr is not None:
            if isinstance(self.outer_lr, bool) or not (isinstance(self.outer_lr, int | float)
                                                       and math.isfinite(self.outer_lr) and self.outer_lr > 0):
                raise ConfigError(f"outer_lr={self.outer_lr!r}: must be a finite number > 0 (DiLoCo uses 0.7; 1 with "
                                  f"outer_momentum=0 is the plain merge), or unset for no outer optimizer")
            if not (isinstance(self.outer_momentum, int | float) and 0 <= self.outer_momentum < 1):
                raise ConfigError(f"outer_momentum={self.outer_momentum!r}: must be in [0, 1) (DiLoCo uses 0.9)")
        from p2pnode.transport.compression import check_combination, parse_compression  # local: a leaf module

        try:
            c = parse_compression(self.compression)
        except ValueError as e:
            raise ConfigError(f"compression: {e}") from None
        try:
            check_combination(c, secagg=self.secagg,
                              payload="models" if self.topology in MODEL_TOPOLOGIES else "updates")
        except ValueError as e:  # ConfigError is a ValueError
            why = ""
            if self.topology in MODEL_TOPOLOGIES and c.sparse:
                why = (f" (topology {self.topology} publishes each node's trained model, and every receiver forms the "
                       f"pseudo-gradient against its own round-start model, so no update exists to sparsify; topk fits "
                       f"modest/fl trainer updates)")
            raise ConfigError(f"compression={self.compression!r}: {e}{why}") from None
        # The canonical text (``INT8`` and ``int8:1024`` are ``int8``): peers that mean the same format hash alike.
        self.compression = str(c)

    def _validate_secagg(self) -> None:
        if not self.secagg:
            if self.secagg_groups != 1:
                raise ConfigError(f"secagg_groups={self.secagg_groups} splits the secure aggregation of a sample "
                                  f"into groups, but secagg is off; turn it on (--secagg) or leave 1")
            return
        if self.topology not in ("modest", "fl"):
            raise ConfigError(f"secagg needs topology modest or fl, where an aggregator combines the updates of a "
                              f"sample; {self.topology!r} has no such aggregator (peers exchange whole models), so "
                              f"turn secagg off or use --topology modest")
        from p2pnode.secagg.groups import check_groups  # local: config is a leaf module
        from p2pnode.secagg.settings import SUM_RULES

        if self.secagg_groups < 1:
            raise ConfigError(f"secagg_groups={self.secagg_groups}: must be >= 1")
        if self.secagg_groups == 1 and self.rule not in SUM_RULES:
            raise ConfigError(f"rule={self.rule!r} cannot run with secagg: it needs each update in the clear, but "
                              f"with secagg the aggregator of a sample sees only the sum of the updates; allowed "
                              f"rules with secagg: {', '.join(SUM_RULES)} (or split each sample into secure "
                              f"groups with --secagg-groups G and apply {self.rule!r} across the group means, "
                              f"or turn secagg off)")
        if self.secagg_neighbours is not None and self.secagg_neighbours < 1:
            raise ConfigError(f"secagg_neighbours={self.secagg_neighbours}: must be >= 1 (or unset for the default)")
        if self.sample_size < 2:
            raise ConfigError(f"secagg needs sample_size >= 2 (a sum of one update is that update), got "
                              f"{self.sample_size}")
        if self.secagg_threshold is not None:
            quorum = max(1, math.floor(self.success_fraction * self.sample_size + 1e-9))
            if not 2 <= self.secagg_threshold <= quorum:
                raise ConfigError(f"secagg_threshold={self.secagg_threshold}: must be in 2..{quorum} "
                                  f"(floor(success_fraction * sample_size)): an aggregator cannot complete with "
                                  f"fewer updates than that anyway")
        if not (math.isfinite(self.secagg_clip) and self.secagg_clip > 0):
            raise ConfigError(f"secagg_clip={self.secagg_clip}: must be a finite number > 0")
        if self.secagg_min_group < 2:
            raise ConfigError(f"secagg_min_group={self.secagg_min_group}: must be >= 2 (a secure sum of one member is "
                              f"that member's update)")
        if self.secagg_groups > 1:
            check_groups(self.rule, self.rule_params, self.secagg_groups, self.sample_size, self.secagg_threshold,
                         min_group=self.secagg_min_group)
            if self.topology == "modest" and 1 < self.secagg_groups < self.aggregators:
                raise ConfigError(f"secagg_groups={self.secagg_groups} with aggregators={self.aggregators}: the groups "
                                  f"are spread over the aggregators (group g at aggregator g mod a), so each "
                                  f"aggregator needs one; use secagg_groups >= {self.aggregators} or fewer "
                                  f"aggregators")

    def run_fields(self) -> dict[str, Any]:
        """The run-wide fields (equal on every peer of a run): exactly what `config_hash` hashes.

        These are the fields whose `Setting.hashed` is set, those of other topologies left out. The secure
        aggregation fields count only when secagg is on, and ``secagg_groups``/``secagg_min_group`` only
        when there is more than one group, so that the hash of runs made before they existed stays as it was;
        likewise the fields with a `Setting.hash_when` (`CONDITIONAL_RUN_KEYS`: the outer optimizer on gossip
        and dpsgd, the compression) count only when their deciding field is set.
        """
        keys = [*RUN_KEYS, *TOPOLOGY_RUN_KEYS.get(self.topology, ())]
        for key, decider in CONDITIONAL_RUN_KEYS.get(self.topology, {}).items():
            if getattr(self, decider) != _DEFAULTS[decider]:
                keys.append(key)
        if self.secagg:
            keys += SECAGG_RUN_KEYS
            if self.secagg_groups != 1:
                keys += ["secagg_groups", "secagg_min_group"]
        return {k: getattr(self, k) for k in keys}

    @property
    def config_hash(self) -> str:
        """SHA-256 (hex, first 16 chars) of the run-wide keys (`run_fields`)."""
        blob = json.dumps(self.run_fields(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        """Every field, with the run secret and key masked (``***``)."""
        out = dataclasses.asdict(self)
        for key in SECRET_KEYS:
            if out.get(key):
                out[key] = MASK
        return out



def _hashed(section_not: str, topology: str | None) -> tuple[str, ...]:
    return tuple(f.name for f, meta in schema() if meta.hashed and meta.section != section_not
                 and (not meta.hash_when or (topology is not None and topology in meta.hash_always))
                 and (meta.topologies == () if topology is None else topology in meta.topologies))


def _conditional(topology: str) -> dict[str, str]:
    return {f.name: meta.hash_when for f, meta in schema() if meta.hashed and meta.hash_when
            and topology not in meta.hash_always and (meta.topologies == () or topology in meta.topologies)}


_DEFAULTS: dict[str, Any] = {f.name: field_default(f) for f, _ in schema()}


#: Keys that must be equal on all peers of a run: a peer whose hash of these differs is not used (`Setting.hashed`).
RUN_KEYS: tuple[str, ...] = _hashed("secagg", None)
#: Further run-wide keys, per topology (hashed only for that topology, so other runs keep their hash).
TOPOLOGY_RUN_KEYS: dict[str, tuple[str, ...]] = {t: keys for t in TOPOLOGIES if (keys := _hashed("secagg", t))}
#: Run-wide keys hashed only when their deciding field is not at its default (`Setting.hash_when`), per topology:
#: key -> deciding field.
CONDITIONAL_RUN_KEYS: dict[str, dict[str, str]] = {t: cond for t in TOPOLOGIES if (cond := _conditional(t))}
#: Run-wide keys of secure aggregation, hashed when it is on (the group keys only with more than one group).
SECAGG_RUN_KEYS: tuple[str, ...] = tuple(f.name for f, meta in schema() if meta.hashed and meta.section == "secagg"
                                         and f.name not in ("secagg_groups", "secagg_min_group"))
