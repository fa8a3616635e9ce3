"""Runs N nodes in one process on the virtual clock and records per-round results."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import build_protocol, build_trainer
from p2pnode.daemon.node import Node
from p2pnode.discovery.memory import MemoryDirectory, MemoryRegistry
from p2pnode.protocols.compute import VirtualCompute
from p2pnode.training.tasks import get_task
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel


@dataclass
class SimConfig:
    """One simulated run.

    :param nodes: number of nodes.
    :param rounds: rounds every live node runs.
    :param latency_ms: one-way latency of every link, in milliseconds (default 5).
    :param bandwidth_mbps: bandwidth of every link, in Mbit/s (default 100).
    :param loss: probability that a message is lost (default 0).
    :param step_time_ms: modelled compute time of one training step, in virtual milliseconds (default 10).
    :param exchange_timeout_s: time allowed for one exchange, in virtual seconds (default 5).
    :param init: ``shared`` (one initial model for all) or ``independent`` (one per node).
    Other fields are those of `NodeConfig`.
    """

    nodes: int = 16
    task: str = "digits-mlp"
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

    def node_config(self, index: int) -> NodeConfig:
        return NodeConfig(run_id=f"sim-{self.seed}", task=self.task, topology=self.topology, rule=self.rule,
                          rule_params=dict(self.rule_params), model_seed_mode=self.init, seed=self.seed,
                          shard=(index, self.nodes), alpha=self.alpha, local_steps=self.local_steps, lr=self.lr,
                          batch_size=self.batch_size, device="cpu", rounds=self.rounds,
                          exchange_timeout_s=self.exchange_timeout_s, eval_every=self.eval_every).validate()


def sim_peer_id(index: int) -> str:
    """Peer id of simulated node `index` (readable and stable across runs)."""
    return f"node-{index:04d}"


def _node_rng(seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


RoundCallback = Callable[[dict[str, Any]], None]


async def _simulate(cfg: SimConfig, on_round: RoundCallback | None) -> dict[str, Any]:
    link = LinkModel(latency_s=cfg.latency_ms / 1000, bandwidth_bytes_per_s=cfg.bandwidth_mbps * 1e6 / 8,
                     loss=cfg.loss)
    network = MemoryNetwork(NetworkModel(link), seed=cfg.seed)
    registry = MemoryRegistry()
    task = get_task(cfg.task)
    compute = VirtualCompute()
    nodes: list[Node] = []
    for i in range(cfg.nodes):
        config = cfg.node_config(i)
        pid = sim_peer_id(i)
        transport = network.transport(pid, max_message_bytes=config.max_message_bytes)
        directory = MemoryDirectory(registry, peer_id=pid, run_id=config.run_id, config_hash=config.config_hash,
                                    ttl_s=config.announce_ttl_s)
        trainer = build_trainer(config, task)
        protocol = build_protocol(config, trainer=trainer, transport=transport, directory=directory,
                                  compute=compute, rng=_node_rng(cfg.seed, i), step_cost_s=cfg.step_time_ms / 1000)
        nodes.append(Node(config, trainer=trainer, transport=transport, directory=directory, protocol=protocol,
                          compute=compute))
    for node in nodes:
        await node.start()
    loop = asyncio.get_running_loop()
    rounds: list[dict[str, Any]] = []
    sent_before = 0
    for r in range(1, cfg.rounds + 1):
        live = [n for n in nodes if network.is_alive(n.peer_id)]
        reports = await asyncio.gather(*(n.run_round() for n in live))
        sent = sum(n.transport.stats.bytes_sent for n in nodes)
        accs = [rep.accuracy for rep in reports if rep.accuracy is not None]
        losses = [rep.train_loss for rep in reports]
        row = {
            "round": r,
            "time_s": round(loop.time(), 6),
            "accuracy": round(sum(accs) / len(accs), 6) if accs else None,
            "loss": round(sum(losses) / len(losses), 6) if losses else None,
            "bytes": sent - sent_before,
            "active_nodes": len(live),
        }
        sent_before = sent
        rounds.append(row)
        if on_round is not None:
            on_round(row)
    for node in nodes:
        await node.shutdown()
    final = next((row["accuracy"] for row in reversed(rounds) if row["accuracy"] is not None), None)
    return {
        "config": dataclasses.asdict(cfg),
        "rounds": rounds,
        "final_accuracy": final,
        "total_bytes": sum(row["bytes"] for row in rounds),
    }


def run_simulation(cfg: SimConfig, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run `cfg` on the virtual clock and return the results (JSON-ready; same seed, same results).

    Uses one torch thread while it runs: the models are small, and it keeps results bit-for-bit
    reproducible across machines with different core counts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_virtual(_simulate(cfg, on_round))
    finally:
        torch.set_num_threads(threads)
