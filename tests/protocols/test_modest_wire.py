"""MoDeST under a lossy wire format: held versions (base pulls, top-ups, relaunches) travel in the run's format.

Every version of a lossy run is held as decoded, so it re-encodes to the same codes: a base pull or a
resend carries int8 and the receiver holds the sender's tensors bit for bit (same digest, same outer
momentum). A base pull whose response does not decode or is not this version is refused under its reason
and the puller goes on to the next contributor (docs/compression.md, "What travels").
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch

from p2pnode.daemon.node import Node
from p2pnode.proto import peer_pb2
from p2pnode.protocols.modest import BASE, OUTER_PREFIX, ModestProtocol, model_digest
from p2pnode.protocols.modest.state import Aggregation, Base, Upload
from p2pnode.protocols.modest.wire import outer_tensors
from p2pnode.transport import Message
from p2pnode.transport.base import TrafficStats
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.compression import (
    CompressedTensor,
    compress,
    compress_exact,
    compress_state_exact,
    decompress,
    parse_compression,
)
from simutil import Group, run_rounds_until, running_group

SETTINGS: dict[str, Any] = {"topology": "modest", "sample_size": 4, "aggregation_timeout_s": 5.0,
                            "idle_timeout_s": 5.0, "ping_timeout_s": 2.0, "local_steps": 5, "outer_lr": 0.7,
                            "outer_momentum": 0.9}


def _p(node: Node) -> ModestProtocol:
    assert isinstance(node.protocol, ModestProtocol)
    return node.protocol


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


async def _rounds(group: Group, versions: int) -> None:
    """Run every node's round loop until `versions` aggregations completed, then stop the loops (nodes stay up)."""
    done = asyncio.Event()
    count = [0]

    def on_aggregate(_: object) -> None:
        count[0] += 1
        if count[0] >= versions:
            done.set()

    for n in group.nodes:
        _p(n).hooks.on_aggregate = on_aggregate

    await run_rounds_until(group.nodes, done, timeout_s=120.0)


def _int8_bytes(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(wire, raw) tensor bytes of `state` in int8 with 1024-element blocks and float16 scales (a model's and its
    momentum's scales all fit float16's range once shifted); integer tensors raw."""
    wire = raw = 0
    for t in state.values():
        n = t.numel()
        raw += n * t.element_size()
        wire += n + 2 * max(1, math.ceil(n / 1024)) if t.is_floating_point() else n * t.element_size()
    return wire, raw


def _received(stats: TrafficStats, before: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Tensor bytes received (wire, raw) since `before`."""
    return stats.tensor_wire_bytes_received - before[0], stats.tensor_raw_bytes_received - before[1]


def _newest_held(group: Group) -> tuple[Node, Base]:
    """The node that holds the newest version with an outer momentum, and that version."""
    held = [(b.round, n.peer_id, n, b) for n in group.nodes for b in _p(n).core.bases.values() if b.outer]
    assert held
    _, _, node, base = max(held, key=lambda h: (h[0], h[1]))
    return node, base


@pytest.mark.parametrize("topology", ["modest", "fl"])
def test_held_versions_travel_int8_and_arrive_bit_for_bit(topology: str) -> None:
    async def main() -> None:
        async with running_group(8, compression="int8", **{**SETTINGS, "topology": topology}) as group:
            await _rounds(group, 4)
            cores = [_p(n).core for n in group.nodes]
            if topology == "modest":  # the outer step needs the base (fl's server holds every version)
                # The aggregators of k + 1 were in k's sample and hold its model; its momentum they pull.
                assert sum(c.counters["base_pulls"] for c in cores) == 0
                assert sum(c.counters["outer_pulls"] for c in cores) > 0
            assert sum(c.counters["stale_updates"] for c in cores) == 0
            # Every version any node holds re-encodes to int8 exactly (no tensor falls back to raw), every holder
            # of one version has the same model, and every holder of its outer momentum (its aggregators and those
            # that pulled it; not the trainers) the same momentum, bit for bit.
            by_digest: dict[bytes, Base] = {}
            with_outer: dict[bytes, Base] = {}
            held = without = 0
            for c in cores:
                for b in c.bases.values():
                    tensors = {**b.state, **outer_tensors(b.outer)}
                    kinds = {k: compress_exact(v, c.model_compression).kind for k, v in tensors.items()}
                    assert all(kind == ("int8" if tensors[k].is_floating_point() else "none")
                               for k, kind in kinds.items()), kinds
                    first = by_digest.setdefault(b.digest, b)
                    assert _same(first.state, b.state)
                    if b.outer:
                        assert _same(with_outer.setdefault(b.digest, b).outer, b.outer)
                    elif b.round >= 1:
                        without += 1
                    held += 1
            assert held >= 8 and len(by_digest) >= 2 and len(with_outer) >= 2 and without >= 1

            holder, base = _newest_held(group)
            other = next(n for n in group.nodes if n is not holder)
            tensors = {**base.state, **outer_tensors(base.outer)}
            wire, raw = _int8_bytes(tensors)
            assert 3.9 < raw / wire < 4.0

            # A base pull: int8 on the wire, the holder's version and momentum on arrival.
            stats = other.transport.stats
            before = _received(stats)
            s = _p(other).core.settings
            req = peer_pb2.ModestBaseRequest(run_id=s.run_id, config_hash=s.config_hash, round=base.round,
                                             digest=base.digest)
            resp = await other.transport.call(holder.peer_id, BASE, Message(req), peer_pb2.ModestBaseResponse,
                                              timeout=5)
            assert resp.body.found
            assert _received(stats, before) == (wire, raw)
            model = {k: v for k, v in resp.tensors.items() if not k.startswith(OUTER_PREFIX)}
            assert model_digest(model) == base.digest and _same(model, base.state)
            assert _same({k: v for k, v in resp.tensors.items() if k.startswith(OUTER_PREFIX)},
                         outer_tensors(base.outer))

            # A momentum pull (the puller holds the model): the momentum alone, int8, bit for bit.
            before = _received(stats)
            req.outer_only = True
            resp = await other.transport.call(holder.peer_id, BASE, Message(req), peer_pb2.ModestBaseResponse,
                                              timeout=5)
            assert resp.body.found and _same(resp.tensors, outer_tensors(base.outer))
            assert _received(stats, before) == _int8_bytes(outer_tensors(base.outer))

            # A resend of a held version (top-up, relaunch: `push_model` without a fresh encoding): the same model,
            # without the momentum (trainers do not need it).
            inbox = _p(other).trainer_role
            before = _received(stats)
            accepted = await _p(holder).aggregator_role.push_model([other.peer_id], base.round + 10, base.state,
                                                                   base.outer, parent=base.parent, combined=1)
            assert accepted == [other.peer_id] and inbox.inbox is not None
            assert _received(stats, before) == _int8_bytes(base.state)
            assert _same(inbox.inbox.state, base.state) and inbox.inbox.outer == {}

    run_virtual(main())


@pytest.mark.parametrize("fmt", ["int8", "int8:256", "int8:0", "fp16", "bf16"])
def test_a_tensor_off_the_format_grid_travels_raw_and_a_decoded_one_reencodes_exactly(fmt: str) -> None:
    """A tensor the format does not carry exactly travels raw (its digest holds); its decoding re-encodes exactly."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(4)) * 3.7
    c = parse_compression(fmt)
    assert compress_exact(x, c).kind == "none"
    decoded = decompress(compress(x, c))
    again = compress_exact(decoded, c)
    assert again.kind == c.kind and torch.equal(_bits(decompress(again)), _bits(decoded))
    assert again.wire_bytes == compress(x, c).wire_bytes < x.numel() * 4


def _forge(case: str, wire: dict[str, CompressedTensor], name: str) -> dict[str, CompressedTensor]:
    """The honest response's tensors with the int8 tensor `name` broken as `case` says."""
    c = wire[name]
    scale, codes = c.parts
    out = dict(wire)
    if case == "scale_nan":
        bad = scale.clone()
        bad[0] = float("nan")
        out[name] = CompressedTensor("int8", c.dtype, c.shape, (bad, codes), block_size=c.block_size, blocks=c.blocks)
    elif case == "wrong_block_count":
        more = torch.cat([scale, scale[:1]])
        out[name] = CompressedTensor("int8", c.dtype, c.shape, (more, codes), block_size=c.block_size,
                                     blocks=c.blocks + 1)
    elif case == "payload_short":  # the header's wire_bytes (from the parts) disagrees with the int8 layout
        out[name] = CompressedTensor("int8", c.dtype, c.shape, (scale, codes[:-1]), block_size=c.block_size,
                                     blocks=c.blocks)
    elif case == "wrong_shape":
        out[name] = compress(torch.zeros(3, 3), parse_compression("int8"))
    elif case == "not_this_version":  # well formed, the right shapes, another model: the digest check refuses it
        t = decompress(c).clone()
        t.reshape(-1)[0] += 1.0
        out[name] = compress(t, parse_compression("int8"))
    return out


@pytest.mark.parametrize(("case", "reason"), [
    ("scale_nan", "bad_scale"),
    ("wrong_block_count", "bad_blocks"),
    ("payload_short", "bad_compression"),
    ("wrong_shape", "bad_shape"),
    ("not_this_version", "bad_shape"),
])
def test_a_bad_base_pull_is_refused_counted_once_and_the_next_contributor_serves(case: str, reason: str) -> None:
    async def main() -> None:
        async with running_group(8, compression="int8", **SETTINGS) as group:
            await _rounds(group, 3)
            holder, base = _newest_held(group)
            puller = next(n for n in group.nodes if n is not holder)
            core = _p(puller).core
            core.bases.pop(base.round, None)
            honest = compress_state_exact({**base.state, **outer_tensors(base.outer)}, core.model_compression)
            name = max((k for k in base.state if base.state[k].is_floating_point()),
                       key=lambda k: base.state[k].numel())
            assert honest[name].kind == "int8" and honest[name].blocks > 1

            # A peer that claims to hold the version ("a-rogue" sorts before the honest holder, so it is asked first).
            rogue = group.network.transport("a-rogue")

            async def serve(sender: str, msg: Message[Any]) -> Message[Any]:
                return Message(peer_pb2.ModestBaseResponse(found=True, round=msg.body.round),
                               compressed=_forge(case, honest, name))

            rogue.register(BASE, peer_pb2.ModestBaseRequest, serve)
            agg = Aggregation(base.round + 1)
            for peer in ("a-rogue", holder.peer_id):
                agg.models[peer] = Upload({}, base.digest, base.parent, 1.0)
            pulls = core.counters["base_pulls"]
            rejected = dict(puller.transport.stats.rejected)
            got = await _p(puller).aggregator_role.versions.get_base(agg)
            counted = {k: v - rejected.get(k, 0) for k, v in puller.transport.stats.rejected.items()
                       if v != rejected.get(k, 0)}
            assert counted == {reason: 1}
            assert got is not None and got.digest == base.digest and core.counters["base_pulls"] == pulls + 1
            assert _same(got.state, base.state) and _same(got.outer, base.outer)
        await rogue.shutdown()

    run_virtual(main())
