"""Runs N nodes in one process on the virtual clock and records per-round results."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from p2pnode.daemon.build import build_attacker
from p2pnode.daemon.memory import create_memory_node
from p2pnode.daemon.node import Node
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.errors import ConfigError
from p2pnode.protocols.adversary import HonestBoard
from p2pnode.protocols.compute import VirtualCompute
from p2pnode.protocols.modest import AggregationEvent
from p2pnode.secagg import Stage
from p2pnode.secagg.randomness import SeededRandomness
from p2pnode.training.tasks import get_task
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel
from simulator.analysis import layer_variance
from simulator.settings import EVENT_DRIVEN, SimConfig, results_config, sim_peer_id

__all__ = ["EVENT_DRIVEN", "SimConfig", "run_simulation", "sim_peer_id"]


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
        if cfg.config.topology == "fl":
            eligible.remove(0)  # the server (lowest peer id) is the reference: it stays up
        count = round(cfg.churn.crash_fraction * cfg.nodes)
        count = min(count, len(eligible))
        rng = random.Random(f"crash/{cfg.config.seed}")
        self.victims = sorted(rng.sample(eligible, count)) if count else []
        back = round(cfg.churn.rejoin_fraction * len(self.victims))
        self.returning = sorted(rng.sample(self.victims, back)) if back else []
        self.nodes = nodes
        self.crashed = False
        self.rejoined = False

    def crash_due(self, completed: int) -> bool:
        return bool(self.victims) and not self.crashed and completed >= self.cfg.churn.crash_round - 1

    def rejoin_due(self, completed: int) -> bool:
        r = self.cfg.churn.rejoin_round
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


def bytes_by_method(nodes: list[Node]) -> dict[str, dict[str, int]]:
    """The nodes' `TrafficStats.method_dict` summed: ``{method: {"messages", "bytes", "tensor_bytes",
    "envelope_bytes"}}``, largest ``bytes`` first."""
    total: dict[str, dict[str, int]] = {}
    for node in nodes:
        for method, row in node.transport.stats.method_dict().items():
            into = total.setdefault(method, dict.fromkeys(row, 0))
            for key, value in row.items():
                into[key] += value
    return dict(sorted(total.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])))


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
        if cfg.recording.record_variance:
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
            if cfg.recording.record_variance:
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
    for peer, label in cfg.attackers.secagg_silent.items():
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
    stall_limit_s = 20 * cfg.config.aggregation_timeout_s + 600.0
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
    cfg.validate()
    net = cfg.network
    link = LinkModel(latency_s=net.latency_ms / 1000, bandwidth_bytes_per_s=net.bandwidth_mbps * 1e6 / 8, loss=net.loss)
    network = MemoryNetwork(NetworkModel(link), seed=cfg.config.seed)
    registry = MemoryRegistry()
    task = get_task(cfg.config.task, **cfg.config.task_options)
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
    settle_s = 4 * cfg.network.latency_ms / 1000 + 0.01 if cfg.config.topology in EVENT_DRIVEN else 1e-6
    board = HonestBoard(settle_s=settle_s)
    for i in range(cfg.nodes):
        config = cfg.node_config(i)
        pid = sim_peer_id(i)
        attacker = build_attacker(config, peer_id=pid, population=cfg.nodes, colluders=max(1, len(byzantine)),
                                  oracle=board.updates if cfg.attackers.omniscient else None)
        node = create_memory_node(config, network=network, registry=registry, peer_id=pid, task=task,
                                  compute=compute, rng=_node_rng(cfg.config.seed, i),
                                  step_cost_s=net.step_time_ms / 1000,
                                  # seeded secagg keys and rounding: the same seed gives the same results
                                  secagg_randomness=SeededRandomness(str(cfg.config.seed).encode(), pid.encode()),
                                  attacker=attacker)
        if i not in byzantine and cfg.attackers.omniscient and byzantine:
            node.protocol.hooks.on_trained = board.hook(pid)
        node.loud_attack = False
        nodes.append(node)
    outsiders = [_outsider(cfg, j, network, registry, task, compute) for j in range(cfg.attackers.outsiders)]
    for node in [*nodes, *outsiders]:
        await node.start()
    outsider_loops = [asyncio.create_task(_outsider_rounds(o)) for o in outsiders]
    churn = _Churn(cfg, network, nodes)
    if cfg.config.topology in EVENT_DRIVEN:
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
        "config": results_config(cfg),
        "rounds": [_name_metric(row, metric) for row in rounds],
        f"final_{metric}": final,
        "total_bytes": sum(row["bytes"] for row in rounds),
        # Bytes one node sent in one round, the mean over the rounds' live nodes (rows: "bytes_per_node").
        "bytes_per_node_per_round": _mean([row["bytes_per_node"] for row in rounds]),
    }
    # Where the bytes went, by method (requests, and "<method> reply" for the answers), over the nodes and
    # the whole run: counted until shutdown, so a little more than "total_bytes" (sends after the last row).
    result["bytes_by_method"] = bytes_by_method(nodes)
    if metric != "accuracy":  # image tasks keep the results layout they always had
        result["metric"] = metric
        result["higher_is_better"] = bool(task.higher_is_better)
    if byzantine:
        result["byzantine"] = [sim_peer_id(i) for i in sorted(byzantine)]
        result["accuracy_over"] = "honest nodes"
    if byzantine or cfg.config.exclude_suspects:
        result.update(_suspicion_summary(nodes, {sim_peer_id(i) for i in byzantine}))
    if churn.victims:
        result["crashed"] = [sim_peer_id(i) for i in churn.victims]
        if cfg.churn.rejoin_round is not None:
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
                              rng=_node_rng(cfg.config.seed, cfg.nodes + j),
                              step_cost_s=cfg.network.step_time_ms / 1000)
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
