"""Builds small groups of real `Node`s over the in-memory network for protocol tests."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from p2pnode.config import NodeConfig
from p2pnode.daemon.checkpoint import CheckpointStore
from p2pnode.daemon.memory import create_memory_node
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.transport.memory import MemoryNetwork


@dataclass
class Group:
    network: MemoryNetwork
    registry: MemoryRegistry
    nodes: list[Node]


def make_config(index: int, count: int, **overrides: object) -> NodeConfig:
    base: dict[str, object] = {"run_id": "test", "task": "digits-mlp", "seed": 3, "shard": (index, count),
                               "device": "cpu", "local_steps": 5, "exchange_timeout_s": 2.0}
    base.update(overrides)
    return NodeConfig(**base).validate()  # type: ignore[arg-type]


async def make_group(count: int, *, signed_records: bool = True, unkeyed: Iterable[int] = (),
                     compression: str | None = None, settings: DaemonSettings | None = None,
                     **overrides: object) -> Group:
    """`count` started nodes of one run on one in-memory network (call inside `run_virtual`).

    With ``secagg=True`` each node gets its seeded secagg identity key, except the nodes whose indices are
    in `unkeyed`; `signed_records` False makes the directories unauthenticated (``--unsigned-records``);
    `compression` is the run's ``compression`` setting and every transport's wire compression
    (`Transport.compression`; default none).
    `settings`: the nodes' daemon settings (default None: `DaemonSettings.in_memory()`).
    """
    no_key = set(unkeyed)
    if compression is not None:
        overrides = {**overrides, "compression": compression}
    network = MemoryNetwork(seed=0)
    registry = MemoryRegistry()
    nodes = []
    for i in range(count):
        config = make_config(i, count, **overrides)
        pid = f"node-{i}"
        node = create_memory_node(config, settings, network=network, registry=registry, peer_id=pid,
                                  rng=random.Random(i), step_cost_s=0.01, compression=compression, ttl_s=30.0,
                                  authenticated=signed_records, secagg_key=i not in no_key)
        await node.start()
        nodes.append(node)
    return Group(network, registry, nodes)


async def shutdown_nodes(nodes: Iterable[Node]) -> None:
    """Shut every node down, one after the other; a failing shutdown does not spare the others (the first
    error is raised after the last node)."""
    error: BaseException | None = None
    for node in nodes:
        try:
            await node.shutdown()
        except Exception as e:
            error = error or e
    if error is not None:
        raise error


@contextlib.asynccontextmanager
async def running_group(count: int, **kwargs: Any) -> AsyncIterator[Group]:
    """`make_group` (same arguments) as a context: its nodes are shut down on the way out, test failure
    included (call inside `run_virtual`)."""
    group = await make_group(count, **kwargs)
    try:
        yield group
    finally:
        await shutdown_nodes(group.nodes)


@contextlib.asynccontextmanager
async def running_nodes(nodes: Iterable[Node], *, start: bool = True) -> AsyncIterator[list[Node]]:
    """Nodes built by hand (`memory_node`, ...) as a context: started in order (unless `start` is False:
    they were), and every one shut down on the way out, test failure included. It yields its list of the
    nodes: a node appended to it (a late joiner, started by the test) is shut down too, last."""
    nodes = list(nodes)
    try:
        if start:
            for node in nodes:
                await node.start()
        yield nodes
    finally:
        await shutdown_nodes(nodes)


#: Per-coordinate bound on the error of a securely aggregated mean: each update is quantized with step
#: 2 c / Q (c = 8, Q = 2^22), so their mean is off by at most that; plus float32 rounding.
SECAGG_TOLERANCE = 2 * 8.0 / 2**22 + 1e-6


def max_state_diff(a: Mapping[str, torch.Tensor] | None, b: Mapping[str, torch.Tensor] | None) -> float:
    """Largest absolute difference between two models (same entries), in float64."""
    assert a is not None and b is not None and a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


async def run_rounds_until(nodes: Iterable[Node], done: asyncio.Event, *, timeout_s: float = 120.0,
                           settle_s: float = 0.0) -> None:
    """Run every node's rounds until `done` is set (or `timeout_s` seconds), `settle_s` seconds more (late
    messages of the last round), then cancel the round loops; the nodes stay up."""

    async def loop(node: Node) -> None:
        while True:
            await node.run_round()

    tasks = [asyncio.get_running_loop().create_task(loop(n)) for n in nodes]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout_s)
        await asyncio.sleep(settle_s)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_until(group: Group, done: asyncio.Event, *, timeout_s: float = 120.0, settle_s: float = 1.0) -> None:
    """`run_rounds_until` (settling `settle_s` seconds), then shut every node down."""
    try:
        await run_rounds_until(group.nodes, done, timeout_s=timeout_s, settle_s=settle_s)
    finally:
        await shutdown_nodes(group.nodes)


def memory_node(network: MemoryNetwork, registry: MemoryRegistry, index: int, count: int,
                settings: DaemonSettings | None = None, checkpoints: CheckpointStore | None = None,
                step_cost_s: float = 0.01, **overrides: object) -> Node:
    """Node `index` of `count` of run "test" (`make_config` with `overrides`; gossip unless told) on the
    in-memory network, not started, as ``node-<index>``; `step_cost_s`: virtual seconds per training step."""
    config = make_config(index, count, **overrides)
    return create_memory_node(config, settings, network=network, registry=registry, peer_id=f"node-{index}",
                              rng=random.Random(index), step_cost_s=step_cost_s, ttl_s=30.0, checkpoints=checkpoints)
