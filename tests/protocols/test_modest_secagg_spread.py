"""Secure groups spread over MoDeST's aggregators (``--secagg-groups G`` with ``--aggregators a > 1``).

Group ``g`` of a sample goes to the aggregator at position ``g mod a`` of the trainers' list; each trainer
uploads once; the aggregators exchange their group sums (`ModestGroupSums`) and each combines all of
them with the run's rule, so a lying aggregator is one bad group among G for a robust rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from p2pnode.config import NodeConfig
from p2pnode.errors import BadMessage, ConfigError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.modest import AggregationEvent, ModestProtocol
from p2pnode.secagg.state import SecAggResult, UserReport
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.codec import Message
from simulator import SimConfig, run_simulation
from simutil import (
    SECAGG_TOLERANCE,
    make_group,
    max_state_diff,
    run_until,
    running_group,
)

TOLERANCE = SECAGG_TOLERANCE


def _events(cfg: SimConfig) -> tuple[dict[str, Any], dict[int, list[AggregationEvent]]]:
    events: dict[int, list[AggregationEvent]] = {}
    result = run_simulation(cfg, on_event=lambda ev: events.setdefault(ev.index, []).append(ev))
    return result, events


_max_diff = max_state_diff


BASE: dict[str, Any] = {"nodes": 20, "topology": "modest", "sample_size": 10, "aggregators": 2, "seed": 3}


@pytest.mark.parametrize("rule", ["mean", "vca"])
def test_spread_groups_give_every_aggregator_the_same_model_and_the_plain_result(rule: str) -> None:
    plain, plain_events = _events(SimConfig.of(rounds=3, rule=rule, **BASE))
    secure, events = _events(SimConfig.of(rounds=3, secagg=True, secagg_groups=2, rule=rule, **BASE))
    assert secure["config"]["secagg_groups"] == 2
    for index in (1, 2):
        evs = events[index]
        assert len(evs) == 2 and len({ev.aggregator for ev in evs}) == 2  # both aggregators completed it
        first, second = evs
        assert first.secure and first.aborted is None and first.contributors == second.contributors
        assert len(first.contributors) == 10 and first.dropped == [] and second.dropped == []
        # Bit for bit the same model (hence the same digest: the next samples' keys agree).
        assert _max_diff(first.state, second.state) == 0.0
    # The combination is the mean of the 10 updates (vca: rescaled to their layers' mean variance, which
    # travels as extra coordinates), as in the plain run with the same seed.
    assert events[1][0].contributors == plain_events[1][0].contributors
    assert _max_diff(events[1][0].state, plain_events[1][0].state) <= TOLERANCE
    counters = secure["protocol_events"]
    assert "secagg_groups_left_out" not in counters and "secagg_aborted" not in counters
    assert abs(float(secure["final_accuracy"]) - float(plain["final_accuracy"])) < 0.02


def test_each_trainer_uploads_once_to_the_aggregator_of_its_group() -> None:
    async def main() -> None:
        group = await make_group(12, topology="modest", sample_size=10, aggregators=2, secagg=True,
                                 secagg_groups=2)
        reports: list[tuple[str, UserReport]] = []
        aggregators: set[str] = set()
        done = asyncio.Event()
        for node in group.nodes:
            p = node.protocol
            assert isinstance(p, ModestProtocol) and p.core.spread

            def on_report(k: int, report: UserReport, me: str = p.me) -> None:
                if k == 0:
                    reports.append((me, report))

            def on_aggregate(ev: AggregationEvent) -> None:
                if ev.index == 1 and ev.aborted is None and len(ev.contributors) == 10:
                    aggregators.add(ev.aggregator)
                    if len(aggregators) == 2:
                        done.set()

            p.hooks.on_secagg_report = on_report
            p.hooks.on_aggregate = on_aggregate
            await p._start()
        await run_until(group, done)
        assert len(aggregators) == 2  # both completed version 1 with all 10 updates
        trainers = [me for me, _ in reports]
        # One secure instance per trainer (not one per aggregator), all completed.
        assert len(trainers) == len(set(trainers)) == 10
        assert all(r.status.name == "DONE" for _, r in reports)

    run_virtual(main())


def _forge_group_sums(bad: str, scale: float) -> Any:
    """A `ModestProtocol._send_group_sums` replacement for node `bad`: it sends its groups' sums scaled."""
    real = ModestProtocol._send_group_sums

    async def send(self: ModestProtocol, peer: str, index: int, base_digest: bytes,
                   results: Mapping[int, SecAggResult], left_out: Sequence[int]) -> None:
        if self.me == bad:
            results = {g: SecAggResult(weighted_sum=r.weighted_sum * scale, extras_sum=r.extras_sum,
                                       weight_sum=r.weight_sum, survivors=r.survivors, dropped=r.dropped,
                                       users=r.users, neighbours=r.neighbours, threshold=r.threshold,
                                       word_bits=r.word_bits) for g, r in results.items()}
        await real(self, peer, index, base_digest, results, left_out)

    return send


@pytest.mark.parametrize(("rule", "robust"), [("median", True), ("mean", False)])
def test_an_aggregator_that_lies_about_its_group_is_one_bad_group_for_a_robust_rule(
        rule: str, robust: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"nodes": 20, "topology": "modest", "sample_size": 15, "aggregators": 3, "seed": 3, "rounds": 2,
            "secagg": True, "secagg_groups": 3, "rule": rule}
    _, clean = _events(SimConfig.of(**base))
    assert len(clean[1]) == 3
    liar = clean[1][0].aggregator
    monkeypatch.setattr(ModestProtocol, "_send_group_sums", _forge_group_sums(liar, -50.0))
    _, attacked = _events(SimConfig.of(**base))
    honest = [ev for ev in attacked[1] if ev.aggregator != liar]
    assert len(honest) == 2 and all(ev.aborted is None and ev.rule == rule for ev in honest)
    reference = next(ev for ev in clean[1] if ev.aggregator == honest[0].aggregator)
    drift = max(_max_diff(ev.state, reference.state) for ev in honest)
    if robust:
        assert drift < 0.2  # the median across three group means leaves the forged one out
    else:
        assert drift > 1.0  # the mean takes it in


def test_an_aggregator_that_never_sends_its_groups_leaves_them_out_after_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = {**BASE, "rounds": 2, "secagg": True, "secagg_groups": 2, "aggregation_timeout_s": 5.0}
    _, clean = _events(SimConfig.of(**base))
    silent = clean[1][0].aggregator

    real = ModestProtocol._send_group_sums

    async def send(self: ModestProtocol, *args: Any) -> None:
        if self.me != silent:
            await real(self, *args)

    monkeypatch.setattr(ModestProtocol, "_send_group_sums", send)
    run, events = _events(SimConfig.of(**base))
    other = next(ev for ev in events[1] if ev.aggregator != silent)
    assert other.aborted is None and other.rule == "mean"
    assert len(other.contributors) == 5  # its own group only
    assert run["protocol_events"]["secagg_groups_left_out"] >= 1


def test_config_spreads_groups_only_over_enough_of_them() -> None:
    with pytest.raises(ConfigError, match=r"secagg_groups=2 with aggregators=3.*secagg_groups >= 3"):
        NodeConfig(topology="modest", secagg=True, secagg_groups=2, aggregators=3, sample_size=10).validate()
    NodeConfig(topology="modest", secagg=True, secagg_groups=4, aggregators=2, sample_size=20).validate()


def _sums(p: ModestProtocol, groups: Sequence[int], *, index: int = 5, dim: int | None = None,
          value: float = 0.5, left_out: Sequence[int] = ()) -> Message[Any]:
    body = peer_pb2.ModestGroupSums(run_id=p.settings.run_id, config_hash=p.settings.config_hash, index=index,
                                    base_digest=b"\x01" * 32, left_out=left_out)
    tensors = {}
    for g in groups:
        body.groups.add(group=g, weight_sum=5.0, survivors=[f"node-{i}" for i in range(5)], users=5)
        tensors[f"mean.{g}"] = torch.full((dim if dim is not None else p.core.layout.dim,), value)
    return Message(body, tensors)


def test_group_sums_that_are_malformed_are_refused_with_a_clear_reason() -> None:
    async def main() -> None:
        async with running_group(4, topology="modest", sample_size=10, aggregators=2, secagg=True,
                                 secagg_groups=2) as group:
            p = group.nodes[0].protocol
            assert isinstance(p, ModestProtocol)
            cases = [
                (_sums(p, [0], dim=3), "bad_shape", "expected"),
                (_sums(p, [0], value=float("nan")), "non_finite", "NaN"),
                (_sums(p, [2]), "malformed", "beyond secagg_groups=2"),
                (_sums(p, [0], left_out=[0]), "malformed", "duplicates"),
            ]
            for msg, code, needle in cases:
                with pytest.raises(BadMessage, match=needle) as info:
                    await p._on_group_sums("node-1", msg)
                assert info.value.code == code
            ack = await p._on_group_sums("node-1", _sums(p, [0]))
            assert ack.body.accepted and (0, "node-1") in p.spreader.remote_groups[5]

    run_virtual(main())
