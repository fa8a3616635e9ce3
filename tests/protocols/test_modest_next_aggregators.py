"""The aggregators of version k + 1 are in version k's sample where they need it as their base.

Under a lossy format trainers upload ``model - base``, so an aggregator of k + 1 needs version k; one that
was not sent it pulls it (``modest.base``, a whole model). The aggregator of k puts the aggregators of
k + 1 (the first responsive peers of round k + 1's order, as the trainers find them) first in k's sample,
so they hold it and no pull is needed; version 0, the common initial model, an aggregator of version 1
forms itself when its digest is the trainers'. Uncompressed plain averaging needs no base and samples as
before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from p2pnode.daemon.node import Node
from p2pnode.protocols.modest import ModestProtocol
from p2pnode.protocols.modest.state import AggregationEvent
from p2pnode.transport.clock import run_virtual
from simutil import run_rounds_until, running_group

SETTINGS: dict[str, Any] = {"topology": "modest", "sample_size": 3, "aggregation_timeout_s": 5.0,
                            "idle_timeout_s": 5.0, "ping_timeout_s": 2.0, "local_steps": 2}


def _p(node: Node) -> ModestProtocol:
    assert isinstance(node.protocol, ModestProtocol)
    return node.protocol


def _run(compression: str, versions: int = 8) -> tuple[list[AggregationEvent], int, int]:
    """Run 10 nodes until `versions` aggregations; return the events, base pulls and bases formed locally."""
    out: dict[str, Any] = {}

    async def main() -> None:
        async with running_group(10, compression=compression, **SETTINGS) as group:
            events: list[AggregationEvent] = []
            done = asyncio.Event()

            def on_aggregate(event: AggregationEvent) -> None:
                events.append(event)
                if len(events) >= versions:
                    done.set()

            for n in group.nodes:
                _p(n).hooks.on_aggregate = on_aggregate

            await run_rounds_until(group.nodes, done, timeout_s=300.0)
            out["events"] = events
            out["pulls"] = sum(_p(n).core.counters["base_pulls"] for n in group.nodes)
            out["formed"] = sum(_p(n).core.counters["base_formed"] for n in group.nodes)

    run_virtual(main())
    return out["events"], out["pulls"], out["formed"]


def _held_by_next_aggregator(events: list[AggregationEvent]) -> list[bool]:
    """For each version k + 1: whether its aggregator was in version k's sample (or built k)."""
    by_index = {e.index: e for e in events}
    return [by_index[i + 1].aggregator in {*by_index[i].sample, by_index[i].aggregator}
            for i in sorted(by_index) if i + 1 in by_index]


def test_int8_aggregators_hold_their_base_and_pull_none() -> None:
    events, pulls, formed = _run("int8")
    held = _held_by_next_aggregator(events)
    assert len(events) >= 8 and len(held) >= 7
    assert all(held), held
    # Version 0's sample is the bootstrap's (the first of round 0's order, no pings): the aggregator of
    # version 1 was not in it here, and formed version 0 from the common initial model instead of pulling.
    assert pulls == 0 and formed == 1
    # The sample keeps its size: the aggregator of k + 1 takes one of the sample's places.
    assert all(len(e.sample) == SETTINGS["sample_size"] for e in events), [len(e.sample) for e in events]


def test_uncompressed_mean_samples_by_the_order_alone() -> None:
    # 3 of 10 in a sample: with the order alone the next aggregator is often outside it (no base is needed).
    events, pulls, formed = _run("none")
    held = _held_by_next_aggregator(events)
    assert len(held) >= 7 and not all(held), held
    assert pulls == 0 and formed == 0


def test_the_next_aggregators_cost_no_extra_ping_round_trip() -> None:
    # Looking up the aggregators of k + 1 and the rest of k's sample ping at once: choosing the sample
    # takes one ping round trip (as without the next aggregators), not two in a row.
    out: dict[str, float] = {}

    async def main() -> None:
        async with running_group(10, compression="int8", **SETTINGS) as group:
            done = asyncio.Event()
            for n in group.nodes:
                _p(n).hooks.on_aggregate = lambda e: done.set()
            await run_rounds_until(group.nodes, done, timeout_s=300.0)
            role = _p(group.nodes[0]).aggregator_role
            core = role.core
            loop = asyncio.get_running_loop()
            index, parent = core.completed_index + 1, b"p" * 32
            key = core.key(index, b"g" * 32)
            t0 = loop.time()
            alone = await role.sampler.available(index, SETTINGS["sample_size"], key)
            out["alone"] = loop.time() - t0
            t0 = loop.time()
            sample = await role.sample_with_next_aggregators(index, parent, key)
            out["both"] = loop.time() - t0
            holders = await role.next_aggregators(index, parent)
            assert len(alone) == len(sample) == SETTINGS["sample_size"]
            assert holders and sample[:len(holders)] == holders
            assert len(set(sample)) == len(sample)

    run_virtual(main())
    assert out["alone"] > 0.0
    assert out["both"] < 1.5 * out["alone"], out
