"""Runs N nodes in one process on the virtual clock and records per-round results."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import build_attacker
from p2pnode.daemon.memory import create_memory_node
from p2pnode.daemon.node import Node
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.errors import ConfigError
from p2pnode.protocols.adversary import HonestBoard
from p2pnode.protocols.compute import VirtualCompute
from p2pnode.protocols.modest import AggregationEvent
from p2pnode.secagg import Stage
from p2pnode.secagg.groups import DEFAULT_MIN_GROUP
from p2pnode.secagg.randomness import SeededRandomness
from p2pnode.training.tasks import get_task
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel
from simulator.analysis import layer_variance

EVENT_DRIVEN = ("modest", "fl")
#: `NodeConfig` field -> `SimConfig` field, where the two are spelled differently.
SIM_NAMES = {"model_seed_mode": "init"}


@dataclass
class SimConfig:
    """One simulated run.

    :param nodes: number of nodes.
    :param rounds: rounds to simulate. For ``gossip`` and ``dpsgd`` every live node runs each round in
        lockstep; for ``modest`` and ``fl`` a round is one model version (one completed aggregation).
    :param latency_ms: one-way latency of every link, in milliseconds (default 5).
    :param bandwidth_mbps: bandwidth of every link, in Mbit/s (default 100).
    :param loss: probability that a message is lost (default 0).
    :param step_time_ms: modelled compute time of one training step, in virtual milliseconds (default 10).
    :param exchange_timeout_s: time allowed for one exchange, in virtual seconds (default 5).
    :param init: ``shared`` (one initial model for all) or ``independent`` (one per node).
    :param sample_size: modest/fl: trainers per round ``s`` (default 10).
    :param aggregators: modest: aggregators per round ``a`` (default 1).
    :param success_fraction: modest/fl: ``sf`` (default 1.0).
    :param aggregation_timeout_s: modest/fl: aggregation deadline, in virtual seconds (default 10; a
        simulated round of digits-mlp takes about 0.15 s).
    :param sample_key: modest: ``model`` (default, against grinding) or ``round``.
    :param inactivity_threshold: modest/fl: rounds without activity before a peer leaves the active set
        (default 50, the authors').
    :param dpsgd_graph: dpsgd: ``exponential`` (default) or ``regular``; ``dpsgd_degree``: its degree (4).
    :param crash_fraction: share of the nodes, chosen by the seed, that stop answering (default 0). In fl
        the server is never chosen: it is the reference.
    :param crash_round: they stop right after round ``crash_round - 1`` completes, i.e. they take no part
        in round ``crash_round`` and later (default 1).
    :param rejoin_round: they come back (and announce a join) right after round ``rejoin_round - 1``;
        None (default): never.
    :param rejoin_fraction: share of the crashed nodes that come back, chosen by the seed (default 1.0).
    :param outer_lr: DiLoCo outer Nesterov optimizer's learning rate, every topology (default None: none);
        ``outer_momentum`` (0.9) and ``outer_nesterov`` (True) as `NodeConfig`'s.
    :param compression: the run's wire format (`NodeConfig.compression`; default ``none``).
    :param byzantine: number of attacking nodes, chosen by the seed (default 0; in fl never the server).
    :param attack: what they do (``p2pnode.attacks.available_attacks()``); needed when ``byzantine > 0``.
    :param attack_params: the attack's parameters.
    :param omniscient: attackers see the honest updates of the same round (default True, the attack papers'
        threat model); False: they use only what they hold themselves, as in the daemon.
    :param robust_window: gossip: merges over which received models are kept for the rule (default None:
        4 for a robust rule, 1 otherwise).
    :param exclude_suspects: leave out peers whose suspicion exceeds ``suspect_threshold`` (default 1.0).
    Accuracy in the results is that of honest nodes only (attackers' own models are not counted).
    :param admission: the run's admission (`NodeConfig.admission`): ``open`` (default) or ``secret``, with
        ``run_secret`` (at least 16 bytes; written into the results as ``***``). The in-memory transport and
        directory refuse non-admitted peers exactly as the real ones do.
    :param outsiders: gossip/dpsgd with ``admission = "secret"``: this many extra nodes (peer ids after the
        run's) that know the run id and every peer id but not the secret; they train on the shards of
        nodes 0, 1, ... and run rounds alongside the run, calling its nodes. They are not part of the
        results' rows; ``outsider_refusals`` counts what the run's nodes refused (``not_admitted``: their
        requests at the transport, their records in the directory). Default 0.
    :param record_variance: add ``layer_variance`` to every round's row: for each floating-point entry
        of the model with more than one element, the population variance of its elements averaged over
        the live nodes' current models (see `simulator.analysis.layer_variance`). Default False; when
        False the results (rows and ``config``) are exactly those of a run without this option.
    Other fields are those of `NodeConfig`.
    """

    nodes: int = 16
    task: str = "digits-mlp"
    #: Options of the task (`NodeConfig.task_options`), for example ``{"size": "tiny"}`` for ``tiny-lm``.
    task_options: dict[str, Any] = field(default_factory=dict)
    topology: str = "gossip"
    rule: str = "mean"
    rule_params: dict[str, Any] = field(default_factory=dict)
    rounds: int = 20
    seed: int = 0
    alpha: float | None = None
    local_steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    init: str = "shared"
    latency_ms: float = 5.0
    bandwidth_mbps: float = 100.0
    loss: float = 0.0
    step_time_ms: float = 10.0
    exchange_timeout_s: float = 5.0
    eval_every: int = 1
    sample_size: int = 10
    aggregators: int = 1
    success_fraction: float = 1.0
    aggregation_timeout_s: float = 10.0
    sample_key: str = "model"
    inactivity_threshold: int = 50
    dpsgd_graph: str = "exponential"
    dpsgd_degree: int = 4
    outer_lr: float | None = None
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    compression: str = "none"
    crash_fraction: float = 0.0
    crash_round: int = 1
    rejoin_round: int | None = None
    rejoin_fraction: float = 1.0
    secagg: bool = False
    secagg_neighbours: int | None = None
    secagg_threshold: int | None = None
    secagg_clip: float = 8.0
    #: secagg: split each sample into this many secure groups (`NodeConfig.secagg_groups`; default 1).
    secagg_groups: int = 1
    #: secagg with groups: fewest members of a group (`NodeConfig.secagg_min_group`; default 5).
    secagg_min_group: int = DEFAULT_MIN_GROUP
    #: secagg fault injection: peer id (``node-NNNN``) -> stage label (``advertise``, ``share``, ``masked``,
    #: ``unmask``); that node goes silent from that stage on in the first secure round it trains in (with
    #: ``unmask`` it has sent its masked input, so its update is in the sum). Default: none.
    secagg_silent: dict[str, str] = field(default_factory=dict)
    byzantine: int = 0
    attack: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    omniscient: bool = True
    robust_window: int | None = None
    suspicion_decay: float = 0.8
    exclude_suspects: bool = False
    suspect_threshold: float = 1.0
    admission: str = "open"
    run_secret: str | None = field(default=None, repr=False)
    outsiders: int = 0

    def byzantine_indices(self) -> list[int]:
        """The attacking nodes, chosen by the seed (in fl never node 0, the server)."""
        if self.byzantine < 0:
            raise ConfigError(f"byzantine={self.byzantine}: must be >= 0")
        if self.byzantine == 0:
            return []
        if self.attack is None:
            raise ConfigError(f"byzantine={self.byzantine} needs an attack (--attack NAME)")
        eligible = list(range(1, self.nodes)) if self.topology == "fl" else list(range(self.nodes))
        if self.byzantine >= len(eligible):
            raise ConfigError(f"byzantine={self.byzantine}: must leave at least one honest trainer of "
                              f"{len(eligible)}")
        return sorted(random.Random(f"byzantine/{self.seed}").sample(eligible, self.byzantine))

    def byzantine_indices_ids(self) -> list[str]:
        """Peer ids of `byzantine_indices`."""
        return [sim_peer_id(i) for i in self.byzantine_indices()]
    record_variance: bool = False

    def node_config(self, index: int) -> NodeConfig:
        if not 0.0 <= self.crash_fraction <= 1.0:
            raise ConfigError(f"crash_fraction={self.crash_fraction}: must be in [0, 1]")
        if self.crash_round < 1:
            raise ConfigError(f"crash_round={self.crash_round}: must be >= 1")
        if self.rejoin_round is not None and self.rejoin_round <= self.crash_round:
            raise ConfigError(f"rejoin_round={self.rejoin_round}: must be > crash_round={self.crash_round}")
        if not 0.0 <= self.rejoin_fraction <= 1.0:
            raise ConfigError(f"rejoin_fraction={self.rejoin_fraction}: must be in [0, 1]")
        # Every NodeConfig field that this class repeats is copied by name (init is model_seed_mode), so a
        # setting added to both needs no line here; the rest are the simulator's own or fixed per node.
        shared = {f.name: getattr(self, SIM_NAMES.get(f.name, f.name)) for f in dataclasses.fields(NodeConfig)
                  if hasattr(self, SIM_NAMES.get(f.name, f.name))}
        byzantine = index in self.byzantine_indices()
        shared.update(run_id=f"sim-{self.seed}", shard=(index, self.nodes), device="cpu",
                      rule_params=dict(self.rule_params), task_options=dict(self.task_options),
                      attack=self.attack if byzantine else None,
                      attack_params=dict(self.attack_params) if byzantine else {})
        return NodeConfig(**shared).validate()

    def outsider_config(self, j: int) -> NodeConfig:
        """The config of outsider `j`: that of node ``j % nodes``, without the run's secret."""
        if self.outsiders < 0:
            raise ConfigError(f"outsiders={self.outsiders}: must be >= 0")
        if self.admission != "secret":
            raise ConfigError("outsiders need admission=secret (in an open run everyone is admitted)")
        if self.topology in EVENT_DRIVEN:
            raise ConfigError(f"outsiders run rounds alongside gossip or dpsgd, not {self.topology}")
        return dataclasses.replace(self.node_config(j % self.nodes), admission="open", run_secret=None).validate()


def sim_peer_id(index: int) -> str:
    """Peer id of simulated node `index` (readable and stable across runs)."""
    return f"node-{index:04d}"


def _node_rng(seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


RoundCallback = Callable[[dict[str, Any]], None]
#: Called with every `AggregationEvent` of modest and fl runs (it carries the new model: research, tests).
EventCallback = Callable[[AggregationEvent], None]


class _Churn:
    """Which nodes crash and come back, and when (see `SimConfig`)."""

    def __init__(self, cfg: SimConfig, network: MemoryNetwork, nodes: list[Node]) -> None:
        self.cfg = cfg
        self.network = network
        eligible = list(range(cfg.nodes))
        if cfg.topology == "fl":
            eligible.remove(0)  # the server (lowest peer id) is the reference: it stays up
        count = round(cfg.crash_fraction * cfg.nodes)
        count = min(count, len(eligible))
        rng = random.Random(f"crash/{cfg.seed}")
        self.victims = sorted(rng.sample(eligible, count)) if count else []
        back = round(cfg.rejoin_fraction * len(self.victims))
        self.returning = sorted(rng.sample(self.victims, back)) if back else []
        self.nodes = nodes
        self.crashed = False
        self.rejoined = False

    def crash_due(self, completed: int) -> bool:
        return bool(self.victims) and not self.crashed and completed >= self.cfg.crash_round - 1

    def rejoin_due(self, completed: int) -> bool:
        r = self.cfg.rejoin_round
        return self.crashed and not self.rejoined and r is not None and completed >= r - 1

    def crash(self) -> list[int]:
        self.crashed = True
        for i in self.victims:
            self.network.crash(self.nodes[i].peer_id)
        return self.victims

    def rejoin(self) -> list[int]:
        self.rejoined = True
        for i in self.returning:
            self.network.revive(self.nodes[i].peer_id)
        return self.returning


def _bytes_sent(nodes: list[Node]) -> int:
    return sum(n.transport.stats.bytes_sent for n in nodes)


async def _lockstep(cfg: SimConfig, nodes: list[Node], network: MemoryNetwork, churn: _Churn,
                    on_round: RoundCallback | None) -> dict[str, Any]:
    """gossip, dpsgd: every live node runs each round; the round ends when all of them are done.

    Accuracy and loss of a row are the means over the honest nodes.
    """
    honest = {n.peer_id for n in nodes if n.config.attack is None}
    loop = asyncio.get_running_loop()
    rounds: list[dict[str, Any]] = []
    sent_before = 0
    for r in range(1, cfg.rounds + 1):
        if churn.crash_due(r - 1):
            churn.crash()
        if churn.rejoin_due(r - 1):
            churn.rejoin()
        live = [n for n in nodes if network.is_alive(n.peer_id)]
        reports = await asyncio.gather(*(n.run_round() for n in live))
        sent = _bytes_sent(nodes)
        counted = [rep for n, rep in zip(live, reports, strict=True) if n.peer_id in honest]
        accs = [rep.accuracy for rep in counted if rep.accuracy is not None]
        losses = [rep.train_loss for rep in counted]
        row: dict[str, Any] = {
            "round": r,
            "time_s": round(loop.time(), 6),
            "accuracy": round(sum(accs) / len(accs), 6) if accs else None,
            "loss": round(sum(losses) / len(losses), 6) if losses else None,
            "bytes": sent - sent_before,
            "bytes_per_node": round((sent - sent_before) / max(1, len(live)), 1),
            "active_nodes": len(live),
            "participants": len(live),
        }
        ignored = sorted({p for rep in counted for p in rep.extra.get("ignored", [])})
        if ignored:
            row["ignored"] = ignored
        sent_before = sent
        if cfg.record_variance:
            row["layer_variance"] = layer_variance(n.trainer.state() for n in live)
        rounds.append(row)
        if on_round is not None:
            on_round(row)
    return {"rounds": rounds}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


async def _event_driven(cfg: SimConfig, nodes: list[Node], network: MemoryNetwork, churn: _Churn,
                        on_round: RoundCallback | None, on_event: EventCallback | None = None) -> dict[str, Any]:
    """modest, fl: every node runs its own round loop, as a daemon does; a round is one model version.

    Row ``r`` is written when the first aggregator completes version ``r``; later completions of the
    same version (``a > 1``) are merged into it. The run ends at version ``rounds``, or when no version
    completes for a long (virtual) while, which is reported as ``stalled``.
    """
    loop = asyncio.get_running_loop()
    protocols = [n.protocol for n in nodes]
    attackers = {n.peer_id for n in nodes if n.config.attack is not None}
    rows: dict[int, dict[str, Any]] = {}
    evals: dict[int, list[float]] = {}
    progress = asyncio.Event()
    drivers: dict[int, asyncio.Task[None]] = {}
    sent_before = 0

    async def drive(i: int, rejoin: bool = False) -> None:
        node = nodes[i]
        if rejoin:
            await node.protocol.rejoin()
        while True:
            await node.run_round()

    def start(i: int, rejoin: bool = False) -> None:
        drivers[i] = loop.create_task(drive(i, rejoin))

    def churn_step(completed: int) -> None:
        if churn.crash_due(completed):
            for i in churn.crash():
                driver = drivers.pop(i, None)  # None with crash_round 1: it crashes before it starts
                if driver is not None:
                    driver.cancel()  # the process stops: no more rounds, no more answers
        if churn.rejoin_due(completed):
            for i in churn.rejoin():
                start(i, rejoin=True)

    def on_aggregate(ev: AggregationEvent) -> None:
        nonlocal sent_before
        if on_event is not None:
            on_event(ev)
        row = rows.get(ev.index)
        first = row is None
        if row is None:
            sent = _bytes_sent(nodes)
            row = {
                "round": ev.index,
                "time_s": round(ev.time_s, 6),
                "accuracy": None,
                "loss": round(ev.train_loss, 6) if ev.train_loss is not None else None,
                "bytes": sent - sent_before,
                "bytes_per_node": round((sent - sent_before) / max(1, sum(network.is_alive(n.peer_id)
                                                                          for n in nodes)), 1),
                "active_nodes": sum(network.is_alive(n.peer_id) for n in nodes),
                "participants": len(ev.contributors),
                "sample": list(ev.contributors),
                "aggregators": [ev.aggregator],
            }
            if ev.secure:  # who is in the secure mean, who is not, and whether it was aborted
                row["secagg"] = {"dropped": list(ev.dropped), "aborted": ev.aborted is not None}
            sent_before = sent
            if cfg.record_variance:
                # The live nodes' models at the moment version ev.index first completes.
                row["layer_variance"] = layer_variance(n.trainer.state() for n in nodes
                                                       if network.is_alive(n.peer_id))
            rows[ev.index] = row
            evals[ev.index] = []
        elif ev.aggregator not in row["aggregators"]:
            row["aggregators"] = sorted([*row["aggregators"], ev.aggregator])
            row["sample"] = sorted(set(row["sample"]) | set(ev.contributors))
            row["participants"] = len(row["sample"])
        if ev.ignored:
            row["ignored"] = sorted(set(row.get("ignored", [])) | set(ev.ignored))
        if ev.accuracy is not None and ev.aggregator not in attackers:
            evals[ev.index].append(ev.accuracy)
            row["accuracy"] = _mean(evals[ev.index])
        if first:
            if on_round is not None:
                on_round(row)
            churn_step(ev.index)
        progress.set()

    for p in protocols:
        p.hooks.on_aggregate = on_aggregate
    for peer, label in cfg.secagg_silent.items():
        stage = next((st for st in Stage if st.label == label), None)
        if stage is None:
            raise ConfigError(f"secagg_silent: unknown stage {label!r}; allowed: {', '.join(st.label for st in Stage)}")
        index = int(peer.rsplit("-", 1)[-1])
        protocols[index].hooks.secagg_silent_from = stage
    churn_step(0)
    for i in range(len(nodes)):
        if network.is_alive(nodes[i].peer_id):
            start(i)
    # No new version for this long (virtual seconds) means the swarm is stuck: stop and say so.
    stall_limit_s = 20 * cfg.aggregation_timeout_s + 600.0
    stalled = False
    while max(rows, default=0) < cfg.rounds:
        progress.clear()
        try:
            await asyncio.wait_for(progress.wait(), stall_limit_s)
        except TimeoutError:
            stalled = True
            break
    for task in drivers.values():
        task.cancel()
    await asyncio.gather(*drivers.values(), return_exceptions=True)
    events: Counter[str] = Counter()
    for p in protocols:
        events.update(p.snapshot().counters)
        p.leave_on_close = False  # the whole run ends: no leave storm
    ordered = [rows[r] for r in sorted(rows) if r <= cfg.rounds]
    return {"rounds": ordered, "stalled": stalled, "protocol_events": dict(sorted(events.items()))}


#: Keys of a result row that a task's metric name may not take (it becomes the key of its value).
_ROW_KEYS = frozenset({"round", "time_s", "loss", "bytes", "bytes_per_node", "active_nodes", "participants", "sample",
                       "aggregators", "secagg", "ignored", "layer_variance", "metric"})


def _metric_key(name: str) -> str:
    """The task's metric name as a result key (rows hold it as ``row[name]``, e.g. ``"perplexity"``)."""
    if not name.isidentifier() or name in _ROW_KEYS:
        raise ConfigError(f"task metric name {name!r} cannot be a results key: use an identifier other than "
                          f"{', '.join(sorted(_ROW_KEYS))}")
    return name


def _name_metric(row: dict[str, Any], metric: str) -> dict[str, Any]:
    """Rows are built with the metric's value under ``accuracy``; put it under the metric's own name."""
    if metric != "accuracy":
        row[metric] = row.pop("accuracy")
    return row


async def _simulate(cfg: SimConfig, on_round: RoundCallback | None, on_event: EventCallback | None = None
                    ) -> dict[str, Any]:
    link = LinkModel(latency_s=cfg.latency_ms / 1000, bandwidth_bytes_per_s=cfg.bandwidth_mbps * 1e6 / 8,
                     loss=cfg.loss)
    network = MemoryNetwork(NetworkModel(link), seed=cfg.seed)
    registry = MemoryRegistry()
    task = get_task(cfg.task, **cfg.task_options)
    metric = _metric_key(task.metric)
    if on_round is not None and metric != "accuracy":
        user_round = on_round

        def on_round(row: dict[str, Any]) -> None:
            user_round(_name_metric(dict(row), metric))
    compute = VirtualCompute()
    nodes: list[Node] = []
    byzantine = set(cfg.byzantine_indices())
    # Omniscient attackers read the honest updates of their round; trainings of one sample start within a
    # few link latencies of each other in modest/fl, at the same instant in gossip/dpsgd.
    settle_s = 4 * cfg.latency_ms / 1000 + 0.01 if cfg.topology in EVENT_DRIVEN else 1e-6
    board = HonestBoard(settle_s=settle_s)
    for i in range(cfg.nodes):
        config = cfg.node_config(i)
        pid = sim_peer_id(i)
        attacker = build_attacker(config, peer_id=pid, population=cfg.nodes, colluders=max(1, len(byzantine)),
                                  oracle=board.updates if cfg.omniscient else None)
        node = create_memory_node(config, network=network, registry=registry, peer_id=pid, task=task,
                                  compute=compute, rng=_node_rng(cfg.seed, i), step_cost_s=cfg.step_time_ms / 1000,
                                  # seeded secagg keys and rounding: the same seed gives the same results
                                  secagg_randomness=SeededRandomness(str(cfg.seed).encode(), pid.encode()),
                                  attacker=attacker)
        if i not in byzantine and cfg.omniscient and byzantine:
            node.protocol.hooks.on_trained = board.hook(pid)
        node.loud_attack = False
        nodes.append(node)
    outsiders = [_outsider(cfg, j, network, registry, task, compute) for j in range(cfg.outsiders)]
    for node in [*nodes, *outsiders]:
        await node.start()
    outsider_loops = [asyncio.create_task(_outsider_rounds(o)) for o in outsiders]
    churn = _Churn(cfg, network, nodes)
    if cfg.topology in EVENT_DRIVEN:
        out = await _event_driven(cfg, nodes, network, churn, on_round, on_event)
    else:
        out = await _lockstep(cfg, nodes, network, churn, on_round)
    for task_ in outsider_loops:
        task_.cancel()
    await asyncio.gather(*outsider_loops, return_exceptions=True)
    for node in outsiders:
        await node.shutdown()
    if outsiders:
        out["outsiders"] = [o.peer_id for o in outsiders]
        out["outsider_refusals"] = {
            "transport": sum(n.transport.stats.rejected["not_admitted"] for n in nodes),
            "directory": sum(n.directory.not_admitted for n in nodes)}
    for node in nodes:
        if not network.is_alive(node.peer_id):
            network.revive(node.peer_id)  # let crashed nodes release their resources like the others
        await node.shutdown()
    rounds = out.pop("rounds")
    final = next((row["accuracy"] for row in reversed(rounds) if row["accuracy"] is not None), None)
    result = {
        "config": _config_dict(cfg),
        "rounds": [_name_metric(row, metric) for row in rounds],
        f"final_{metric}": final,
        "total_bytes": sum(row["bytes"] for row in rounds),
        # Bytes one node sent in one round, the mean over the rounds' live nodes (rows: "bytes_per_node").
        "bytes_per_node_per_round": _mean([row["bytes_per_node"] for row in rounds]),
    }
    if metric != "accuracy":  # image tasks keep the results layout they always had
        result["metric"] = metric
        result["higher_is_better"] = bool(task.higher_is_better)
    if byzantine:
        result["byzantine"] = [sim_peer_id(i) for i in sorted(byzantine)]
        result["accuracy_over"] = "honest nodes"
    if byzantine or cfg.exclude_suspects:
        result.update(_suspicion_summary(nodes, {sim_peer_id(i) for i in byzantine}))
    if churn.victims:
        result["crashed"] = [sim_peer_id(i) for i in churn.victims]
        if cfg.rejoin_round is not None:
            result["rejoined"] = [sim_peer_id(i) for i in churn.returning]
    result.update(out)
    return result


def _outsider(cfg: SimConfig, j: int, network: MemoryNetwork, registry: MemoryRegistry, task: Any,
              compute: VirtualCompute) -> Node:
    """Outsider `j` (see `SimConfig.outsiders`): a node of the run's config without its secret."""
    config = cfg.outsider_config(j)
    pid = sim_peer_id(cfg.nodes + j)
    # Its admission is open: it has no secret, so the run's nodes refuse what it sends.
    node = create_memory_node(config, network=network, registry=registry, peer_id=pid, task=task, compute=compute,
                              rng=_node_rng(cfg.seed, cfg.nodes + j), step_cost_s=cfg.step_time_ms / 1000)
    node.loud_attack = False
    return node


async def _outsider_rounds(node: Node) -> None:
    """An outsider's rounds, until cancelled (its failures are its own)."""
    while True:
        try:
            await node.run_round()
        except asyncio.CancelledError:
            raise
        except Exception:
            await asyncio.sleep(1.0)


def _suspicion_summary(nodes: list[Node], attackers: set[str]) -> dict[str, Any]:
    """Per peer, the mean suspicion score given by the honest nodes that observed it; and, with attackers,
    ``suspicion_auc``: the chance that a random attacker scores above a random honest peer (ties count 1/2)."""
    totals: dict[str, list[float]] = {}
    for node in nodes:
        if node.peer_id in attackers:
            continue
        for peer, score in node.suspicion().items():
            totals.setdefault(peer, []).append(score)
    if not totals:
        return {}
    mean = {p: round(sum(v) / len(v), 6) for p, v in sorted(totals.items())}
    out: dict[str, Any] = {"suspicion": mean}
    bad = [mean[p] for p in mean if p in attackers]
    good = [mean[p] for p in mean if p not in attackers]
    if bad and good:
        wins = sum(1.0 if b > g else 0.5 if b == g else 0.0 for b in bad for g in good)
        out["suspicion_auc"] = round(wins / (len(bad) * len(good)), 6)
    return out


def _config_dict(cfg: SimConfig) -> dict[str, Any]:
    """``cfg`` as written into the results; opt-in recording flags and settings left at their default
    appear only when set, so that a run without them gives the same file, byte for byte, as before they
    existed."""
    out = dataclasses.asdict(cfg)
    if not cfg.record_variance:
        del out["record_variance"]
    if cfg.secagg_groups == 1:
        del out["secagg_groups"]
    if cfg.secagg_min_group == DEFAULT_MIN_GROUP:
        del out["secagg_min_group"]
    if cfg.run_secret is not None:
        out["run_secret"] = "***"  # the secret never goes into a results file
    for key, default in (("outer_momentum", 0.9), ("outer_nesterov", True), ("compression", "none"),
                         ("admission", "open"), ("run_secret", None), ("outsiders", 0)):
        if out[key] == default:
            del out[key]
    return out


def run_simulation(cfg: SimConfig, on_round: RoundCallback | None = None,
                   on_event: EventCallback | None = None) -> dict[str, Any]:
    """Run `cfg` on the virtual clock and return the results (JSON-ready; same seed, same results).

    `on_round` gets each result row as it is written; `on_event` (modest and fl) every aggregation event.

    Uses one torch thread while it runs: the models are small, and it keeps results bit-for-bit
    reproducible across machines with different core counts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_virtual(_simulate(cfg, on_round, on_event))
    finally:
        torch.set_num_threads(threads)
