"""Compressed exchange between two P2PTransports over real p2pd daemons on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from netutil import NetworkGuard, start_p2p
from p2pnode.proto import peer_pb2
from p2pnode.transport.codec import Message
from p2pnode.transport.compression import decompress
from p2pnode.transport.feedback import ErrorFeedback
from p2pnode.transport.p2p import P2PTransport

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


async def test_int8_state_travels_between_real_transports() -> None:
    with NetworkGuard() as guard:
        a = await P2PTransport.create(await start_p2p(), owns_p2p=True, compression="int8")
        b = None
        try:
            b = await P2PTransport.create(await start_p2p(a.addresses()), owns_p2p=True)
            got: dict[str, torch.Tensor] = {}

            async def keep(sender: str, req: Message[Any]) -> Message[Any]:
                got.update(req.tensors)
                # Answer in the compression of the request's sender: b itself has none set.
                return Message(peer_pb2.Pong(round=req.body.round), {"w": req.tensors["w"] * 2},
                               compression=a.compression)

            b.register("push", peer_pb2.Ping, keep)
            g = torch.Generator().manual_seed(0)
            state = {"w": torch.randn(512, 1024, generator=g), "b": torch.randn(1024, generator=g),
                     "steps": torch.tensor([7])}
            ef = ErrorFeedback(a.compression)
            sent = ef.compress(state, stream=b.peer_id)
            resp = await a.call(b.peer_id, "push", Message(peer_pb2.Ping(round=3), compressed=sent),
                                peer_pb2.Pong, timeout=30)
            assert resp.body.round == 3
            for k in ("w", "b"):
                assert torch.equal(got[k], decompress(sent[k]))  # exactly what the sender computed
                assert float((got[k] - state[k]).abs().max()) <= float(sent[k].parts[0].max()) / 2 * 1.0001
            assert torch.equal(got["steps"], state["steps"])
            assert float((resp.tensors["w"] - 2 * got["w"]).abs().max()) < 0.05
            raw = sum(t.numel() * t.element_size() for t in state.values())
            st = a.stats
            assert st.tensor_raw_bytes_sent == raw == b.stats.tensor_raw_bytes_received
            assert st.tensor_wire_bytes_sent == b.stats.tensor_wire_bytes_received
            assert raw / st.tensor_wire_bytes_sent > 3.9
            assert st.bytes_sent == b.stats.bytes_received and st.bytes_sent < raw / 3.9
            assert b.stats.rejected == {} and a.stats.rejected == {}
        finally:
            if b is not None:
                await b.shutdown()
            await a.shutdown()
    assert not guard.leaked_processes and not guard.leaked_sockets, guard
