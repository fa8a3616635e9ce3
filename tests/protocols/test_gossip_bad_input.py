"""A peer that sends garbage, wrong shapes, NaN, oversized or foreign-run models is refused and counted;
the receiver keeps its last good model and keeps running."""

from __future__ import annotations

import struct

import pytest
import torch

from p2pnode.errors import RemoteError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.gossip import EXCHANGE
from p2pnode.transport import Message, codec
from p2pnode.transport.clock import run_virtual
from simutil import make_group


def _body(node, **kw):  # a well-formed exchange header for `node`'s run
    args = {"run_id": node.config.run_id, "config_hash": node.config.config_hash, "round": 1, "weight": 1.0}
    args.update(kw)
    return peer_pb2.ModelExchange(**args)


def _forged(state, name, value):
    out = dict(state)
    out[name] = value
    return out


CASES = {
    "bad_shape": lambda st, n: (_body(n), _forged(st, next(iter(st)), torch.zeros(3, 3))),
    "bad_dtype": lambda st, n: (_body(n), {k: v.double() for k, v in st.items()}),
    "missing": lambda st, n: (_body(n), dict(list(st.items())[1:])),
    "nan": lambda st, n: (_body(n), _forged(st, next(iter(st)), torch.full_like(next(iter(st.values())),
                                                                                 float("nan")))),
    "inf": lambda st, n: (_body(n), _forged(st, next(iter(st)), torch.full_like(next(iter(st.values())),
                                                                                 float("inf")))),
    "wrong_run": lambda st, n: (_body(n, run_id="other"), st),
    "wrong_config": lambda st, n: (_body(n, config_hash="0" * 16), st),
}
REASONS = {"bad_shape": "bad_shape", "bad_dtype": "bad_shape", "missing": "bad_shape", "nan": "non_finite",
           "inf": "non_finite", "wrong_run": "wrong_run", "wrong_config": "wrong_run"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_is_refused_and_counted(case: str) -> None:
    async def main() -> None:
        group = await make_group(2)
        victim, _ = group.nodes
        rogue = group.network.transport("rogue")
        await victim.run_round()
        before = victim.trainer.state()
        body, tensors = CASES[case](victim.trainer.state(), victim)
        with pytest.raises(RemoteError) as err:
            await rogue.call(victim.peer_id, EXCHANGE, Message(body, tensors), peer_pb2.ModelExchange, timeout=5)
        assert err.value.code == REASONS[case]
        assert victim.transport.stats.rejected[REASONS[case]] == 1
        # Nothing from the rogue reached the model, and the node keeps running rounds.
        after = victim.trainer.state()
        assert all(torch.equal(before[k], after[k]) for k in before)
        report = await victim.run_round()
        assert report.round == 2 and report.combined == 2  # merged with its honest peer only
        assert all(torch.isfinite(v).all() for v in victim.trainer.state().values())

    run_virtual(main())


@pytest.mark.parametrize("frame,reason", [
    (b"\x01\x02", "malformed"),
    (b"\xff\xff\xff\x7f" + b"x" * 16, "oversized"),
    (struct.pack("<I", 5) + b"garba", "malformed"),
])
def test_garbage_frames_are_refused(frame: bytes, reason: str) -> None:
    async def main() -> None:
        group = await make_group(2)
        victim = group.nodes[0]
        reply = await victim.transport._dispatch("rogue", frame)
        env, _ = codec.decode(codec.join(reply))
        assert env.error != peer_pb2.OK
        assert victim.transport.stats.rejected[reason] == 1
        assert (await victim.run_round()).combined == 2

    run_virtual(main())


def test_truncated_payload_is_refused() -> None:
    async def main() -> None:
        group = await make_group(2)
        victim = group.nodes[0]
        data = codec.join(codec.encode(EXCHANGE, _body(victim), victim.trainer.state()))
        reply = await victim.transport._dispatch("rogue", data[:-10])
        env, _ = codec.decode(codec.join(reply))
        assert env.error == peer_pb2.MALFORMED
        assert victim.transport.stats.rejected["malformed"] == 1

    run_virtual(main())


def test_oversized_model_is_refused_before_use() -> None:
    async def main() -> None:
        group = await make_group(2, max_message_bytes=64 * 1024)
        victim = group.nodes[0]
        rogue = group.network.transport("rogue")
        big = {"w": torch.zeros(100_000)}
        with pytest.raises(RemoteError) as err:
            await rogue.call(victim.peer_id, EXCHANGE, Message(_body(victim), big), peer_pb2.ModelExchange,
                             timeout=5)
        assert err.value.code == "oversized"
        assert victim.transport.stats.rejected["oversized"] == 1

    run_virtual(main())


def test_lying_responder_is_refused_and_backed_off() -> None:
    """A peer that answers an exchange with a NaN model: the caller rejects it and keeps its model."""

    async def main() -> None:
        group = await make_group(1)
        node = group.nodes[0]
        liar = group.network.transport("liar")
        spec = node.trainer.spec

        async def answer(sender: str, msg: Message) -> Message:
            nan = {k: torch.full(shape, float("nan"), dtype=dtype) for k, (shape, dtype) in spec.items()}
            return Message(_body(node), nan)

        liar.register(EXCHANGE, peer_pb2.ModelExchange, answer)
        from p2pnode.discovery.base import PeerInfo
        from p2pnode.discovery.memory import MemoryDirectory

        liar_dir = MemoryDirectory(group.registry, peer_id="liar", run_id=node.config.run_id,
                                   config_hash=node.config.config_hash)
        await liar_dir.announce(PeerInfo(peer_id="liar", config_hash=node.config.config_hash))
        report = await node.run_round()
        assert report.failures == 1 and report.combined == 1
        assert node.transport.stats.rejected["non_finite"] == 1
        assert all(torch.isfinite(v).all() for v in node.trainer.state().values())
        # Backed off: the next round does not ask the liar again.
        report = await node.run_round()
        assert report.failures == 0 and node.transport.stats.rejected["non_finite"] == 1

    run_virtual(main())


def test_dead_peer_costs_a_timeout_not_a_crash() -> None:
    async def main() -> None:
        group = await make_group(3)
        a, b, c = group.nodes
        group.network.crash(c.peer_id)
        import asyncio

        for _ in range(4):
            await asyncio.gather(a.run_round(), b.run_round())
        assert a.round == 4 and b.round == 4
        assert a.transport.stats.failed_calls + b.transport.stats.failed_calls >= 1

    run_virtual(main())
