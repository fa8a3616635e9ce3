"""`TrafficStats.sent_by_method`: every sent byte counted under its method, requests and answers apart."""

from __future__ import annotations

import pytest
import torch

from p2pnode.errors import RemoteError
from p2pnode.proto import peer_pb2
from p2pnode.transport import Message, codec
from p2pnode.transport.base import REPLY_SUFFIX
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.compression import parse_compression
from p2pnode.transport.memory import LinkModel, MemoryNetwork, NetworkModel


def test_bytes_by_method_add_up_to_the_bytes_sent() -> None:
    async def main() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]], int, int, int]:
        net = MemoryNetwork(NetworkModel(LinkModel(latency_s=0.001, bandwidth_bytes_per_s=1e7)))
        a, b = net.transport("a"), net.transport("b")

        async def push(sender: str, req: Message[peer_pb2.Ping]) -> Message[peer_pb2.Pong]:
            return Message(peer_pb2.Pong(), {"y": torch.ones(10)})

        async def ping(sender: str, req: Message[peer_pb2.Ping]) -> Message[peer_pb2.Pong]:
            return Message(peer_pb2.Pong())

        b.register("push", peer_pb2.Ping, push)
        b.register("ping", peer_pb2.Ping, ping)
        x = torch.randn(1000)
        for fmt in ("none", "int8"):
            await a.call("b", "push", Message(peer_pb2.Ping(), {"x": x}, compression=parse_compression(fmt)),
                         peer_pb2.Pong, timeout=10)
        for _ in range(3):
            await a.call("b", "ping", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
        # A method b does not serve: the refusal b sends is counted under "?", not under the peer's name.
        with pytest.raises(RemoteError):
            await a.call("b", "made.up", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=10)
        return (a.stats.method_dict(), b.stats.method_dict(), a.stats.bytes_sent, b.stats.bytes_sent,
                a.stats.tensor_wire_bytes_sent)

    sent_a, sent_b, bytes_a, bytes_b, tensor_a = run_virtual(main())
    assert set(sent_a) == {"push", "ping", "made.up"}
    assert set(sent_b) == {"push" + REPLY_SUFFIX, "ping" + REPLY_SUFFIX, "?" + REPLY_SUFFIX}
    assert [sent_a[m]["messages"] for m in ("push", "ping", "made.up")] == [2, 3, 1]
    assert sent_b["push" + REPLY_SUFFIX]["messages"] == 2 and sent_b["?" + REPLY_SUFFIX]["messages"] == 1
    assert sum(r["bytes"] for r in sent_a.values()) == bytes_a
    assert sum(r["bytes"] for r in sent_b.values()) == bytes_b
    assert sent_a["push"]["tensor_bytes"] == tensor_a
    # 1000 float32 raw, then int8 with its scales: the tensor bytes; the rest is the two envelopes.
    assert 4000 + 1000 < sent_a["push"]["tensor_bytes"] < 4000 + 1100
    assert sent_a["ping"]["tensor_bytes"] == 0 and sent_a["ping"]["envelope_bytes"] == sent_a["ping"]["bytes"]
    assert sent_b["push" + REPLY_SUFFIX]["tensor_bytes"] == 2 * 40
    ping_size = codec.encoded_size(codec.encode("ping", peer_pb2.Ping(), sent_at=0.0))
    assert sent_a["ping"]["bytes"] == 3 * ping_size
