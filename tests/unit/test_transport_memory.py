"""The in-memory network: framing and dispatch shared with the real transport, timing by the network
model on the virtual clock, loss, partitions, crashes, bad input and byte accounting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import torch

from p2pnode.errors import BadMessage, PeerUnreachable, RemoteError
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.codec import Message
from p2pnode.transport.memory import LinkModel, MemoryNetwork, MemoryTransport, NetworkModel

RUN = "run-1"
SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "w": ((4, 3), torch.float32),
    "b": ((3,), torch.bfloat16),
    "steps": ((2,), torch.int64),
}


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "steps": torch.tensor([3, 5]),
    }


def exchange(round_: int = 1, tensors: dict[str, torch.Tensor] | None = None
             ) -> Message[peer_pb2.ModelExchange]:
    return Message(peer_pb2.ModelExchange(run_id=RUN, config_hash="h", round=round_, weight=1.0),
                   model_tensors() if tensors is None else tensors)


def serve_ping(t: MemoryTransport, arrivals: list[tuple[float, str]] | None = None) -> None:
    async def ping(sender: str, req: Message[Any]) -> Message[Any]:
        if arrivals is not None:
            arrivals.append((asyncio.get_running_loop().time(), sender))
        return Message(peer_pb2.Pong(round=req.body.round + 1))

    t.register("ping", peer_pb2.Ping, ping)


async def ping(a: MemoryTransport, b: str, timeout: float = 5.0, round_: int = 1) -> int:
    resp = await a.call(b, "ping", Message(peer_pb2.Ping(run_id=RUN, round=round_)), peer_pb2.Pong, timeout)
    return resp.body.round


def sim(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run the coroutine function `main` on a fresh virtual-clock loop."""
    return run_virtual(main())


def now() -> float:
    return asyncio.get_running_loop().time()


# -- round trip ------------------------------------------------------------------------------------

def test_round_trip_with_tensors_intact_and_not_aliased() -> None:
    sent = model_tensors(1)
    seen: dict[str, torch.Tensor] = {}
    replied: dict[str, torch.Tensor] = {}

    async def main() -> Message[peer_pb2.ModelExchange]:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b")

        async def handle(sender: str, req: Message[Any]) -> Message[Any]:
            assert sender == "a"
            assert req.body.run_id == RUN and req.body.round == 4
            codec.check_tensors(req.tensors, SHAPES)
            seen.update(req.tensors)
            out = {k: v.clone() for k, v in req.tensors.items()}
            out["w"] += 1
            replied.update(out)
            return Message(peer_pb2.ModelExchange(run_id=RUN, round=req.body.round + 1, weight=0.5), out)

        b.register("exchange", peer_pb2.ModelExchange, handle)
        return await a.call("b", "exchange", exchange(4, sent), peer_pb2.ModelExchange, timeout=10)

    resp = sim(main)
    assert resp.body.round == 5 and resp.body.weight == 0.5
    for name, t in sent.items():
        assert torch.equal(seen[name], t) and seen[name].dtype == t.dtype
        assert seen[name].data_ptr() != t.data_ptr()
    assert torch.equal(resp.tensors["w"], sent["w"] + 1)
    assert torch.equal(resp.tensors["b"], sent["b"]) and resp.tensors["b"].dtype == torch.bfloat16
    assert torch.equal(resp.tensors["steps"], sent["steps"])
    for name in sent:
        assert resp.tensors[name].data_ptr() != replied[name].data_ptr()
    # Writing into what the receiver got changes nothing on the sender's side, and vice versa.
    before = sent["w"].clone()
    seen["w"].zero_()
    resp.tensors["w"].fill_(9.0)
    assert torch.equal(sent["w"], before)
    assert not torch.equal(replied["w"], resp.tensors["w"])


def test_delay_follows_latency_and_bandwidth_exactly() -> None:
    link = LinkModel(latency_s=0.02, bandwidth_bytes_per_s=1e6)
    req = exchange(tensors={"w": torch.zeros(1000, 50)})
    req_size = codec.encoded_size(codec.encode("exchange", req.body, req.tensors))
    resp_tensors = {"w": torch.zeros(10)}
    resp_size = codec.encoded_size(codec.encode("exchange", peer_pb2.ModelExchange(round=2), resp_tensors))
    arrived: list[float] = []

    async def main() -> float:
        net = MemoryNetwork(NetworkModel(link))
        a, b = net.transport("a"), net.transport("b")

        async def handle(sender: str, r: Message[Any]) -> Message[Any]:
            arrived.append(now())
            return Message(peer_pb2.ModelExchange(round=2), resp_tensors)

        b.register("exchange", peer_pb2.ModelExchange, handle)
        await a.call("b", "exchange", req, peer_pb2.ModelExchange, timeout=60)
        return now()

    done = sim(main)
    assert req_size > 200_000
    assert arrived == [pytest.approx(0.02 + req_size / 1e6, rel=1e-12)]
    assert done == pytest.approx(0.04 + (req_size + resp_size) / 1e6, rel=1e-12)


def test_asymmetric_link_override() -> None:
    model = NetworkModel(LinkModel(latency_s=0.01, bandwidth_bytes_per_s=float("inf")))
    model.set_link("a", "b", LinkModel(latency_s=0.5, bandwidth_bytes_per_s=float("inf")), symmetric=False)

    async def main() -> tuple[list[tuple[float, str]], float]:
        net = MemoryNetwork(model)
        a, b = net.transport("a"), net.transport("b")
        arrivals: list[tuple[float, str]] = []
        serve_ping(b, arrivals)
        await ping(a, "b")
        return arrivals, now()

    arrivals, done = sim(main)
    assert arrivals == [(0.5, "a")]
    assert done == pytest.approx(0.51)
    assert model.link("b", "a").latency_s == 0.01


def test_concurrent_sends_queue_in_the_senders_uplink() -> None:
    link = LinkModel(latency_s=0.1, bandwidth_bytes_per_s=1e6)
    big = exchange(tensors={"w": torch.zeros(250_000)})  # about 1 MB: 1 s on the link
    size = codec.encoded_size(codec.encode("exchange", big.body, big.tensors))

    def run(uplink_fifo: bool) -> list[float]:
        async def main() -> list[float]:
            net = MemoryNetwork(NetworkModel(link), uplink_fifo=uplink_fifo)
            a = net.transport("a")
            arrived: list[float] = []

            async def handle(sender: str, r: Message[Any]) -> Message[Any]:
                arrived.append(now())
                return Message(peer_pb2.ModelExchange())

            for name in ("b", "c"):
                net.transport(name).register("exchange", peer_pb2.ModelExchange, handle)
            await asyncio.gather(*(a.call(p, "exchange", big, peer_pb2.ModelExchange, 60)
                                   for p in ("b", "c")))
            return arrived

        return sim(main)

    tx = size / 1e6
    assert run(True) == [pytest.approx(0.1 + tx), pytest.approx(0.1 + 2 * tx)]
    assert run(False) == [pytest.approx(0.1 + tx), pytest.approx(0.1 + tx)]


# -- failures: loss, crashes, partitions, departures -----------------------------------------------

def test_lost_messages_time_out_in_virtual_time() -> None:
    async def main() -> tuple[float, int, int]:
        net = MemoryNetwork(NetworkModel(LinkModel(loss=1.0)))
        a, b = net.transport("a"), net.transport("b")
        serve_ping(b)
        with pytest.raises(PeerUnreachable):
            await ping(a, "b", timeout=30.0)
        return now(), a.stats.failed_calls, net.messages_dropped_total

    assert sim(main) == (30.0, 1, 1)


def test_loss_is_reproducible_by_seed() -> None:
    def outcomes(seed: int) -> list[bool]:
        async def main() -> list[bool]:
            net = MemoryNetwork(NetworkModel(LinkModel(loss=0.4)), seed=seed)
            a, b = net.transport("a"), net.transport("b")
            serve_ping(b)
            out = []
            for i in range(40):
                try:
                    await ping(a, "b", timeout=1.0, round_=i)
                    out.append(True)
                except PeerUnreachable:
                    out.append(False)
            return out

        return sim(main)

    first = outcomes(3)
    assert first == outcomes(3)
    assert 5 < first.count(False) < 35
    assert first != outcomes(4)


def test_crashed_peer_never_answers_and_cannot_call() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b")
        serve_ping(a)
        serve_ping(b)
        assert await ping(a, "b") == 2
        net.crash("b")
        assert not net.is_alive("b") and net.is_alive("a")
        t0 = now()
        with pytest.raises(PeerUnreachable):
            await ping(a, "b", timeout=8.0)
        assert now() - t0 == pytest.approx(8.0)
        t0 = now()
        with pytest.raises(PeerUnreachable, match="crashed"):
            await ping(b, "a", timeout=8.0)
        assert now() == t0  # at once
        net.revive("b")
        assert await ping(a, "b") == 2
        assert await ping(b, "a") == 2

    sim(main)


def _slow_pair(delay_s: float, finished: list[float] | None = None) -> tuple[MemoryNetwork, MemoryTransport,
                                                                               MemoryTransport]:
    """Transports ``a`` and ``b`` on a new network; ``b`` answers "ping" after `delay_s` virtual seconds
    (appending the time it finished to `finished`)."""
    net = MemoryNetwork()
    a, b = net.transport("a"), net.transport("b")

    async def slow(sender: str, req: Message[Any]) -> Message[Any]:
        await asyncio.sleep(delay_s)
        if finished is not None:
            finished.append(now())
        return Message(peer_pb2.Pong())

    b.register("ping", peer_pb2.Ping, slow)
    return net, a, b


def test_crash_during_handling_gives_no_answer_even_after_revival() -> None:
    finished: list[float] = []

    async def main() -> None:
        net, a, _ = _slow_pair(2.0, finished)
        call = asyncio.ensure_future(ping(a, "b", timeout=10.0))
        await asyncio.sleep(1.0)
        net.crash("b")
        net.revive("b")
        with pytest.raises(PeerUnreachable):
            await call
        assert now() == pytest.approx(10.0)

    sim(main)
    assert len(finished) == 1


def test_caller_crashing_while_waiting_gets_no_answer() -> None:
    async def main() -> None:
        net, a, _ = _slow_pair(2.0)
        call = asyncio.ensure_future(ping(a, "b", timeout=10.0))
        await asyncio.sleep(1.0)
        net.crash("a")
        with pytest.raises(PeerUnreachable, match="crashed"):
            await call
        assert now() < 3.0

    sim(main)


def test_handler_outlives_a_caller_that_timed_out() -> None:
    finished: list[float] = []

    async def main() -> int:
        _, a, b = _slow_pair(5.0, finished)
        with pytest.raises(PeerUnreachable):
            await ping(a, "b", timeout=1.0)
        assert now() == pytest.approx(1.0)
        await asyncio.sleep(10.0)
        return b.stats.bytes_sent

    assert sim(main) > 0
    assert finished == [pytest.approx(5.005, abs=1e-3)]


def test_unknown_peer_fails_at_once() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a = net.transport("a")
        with pytest.raises(PeerUnreachable, match="unknown peer"):
            await ping(a, "nobody", timeout=30.0)
        assert now() == 0.0
        assert a.stats.failed_calls == 1
        assert net.bytes_sent_total == 0

    sim(main)


def test_partitions_and_heal() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        ts = {p: net.transport(p) for p in "abcd"}
        for t in ts.values():
            serve_ping(t)

        async def reaches(src: str, dst: str) -> bool:
            try:
                await ping(ts[src], dst, timeout=1.0)
                return True
            except PeerUnreachable:
                return False

        net.model.partition([{"a", "b"}])  # c and d form the rest of the world together
        assert net.model.partitioned
        assert await reaches("a", "b") and await reaches("b", "a")
        assert await reaches("c", "d")
        assert not await reaches("a", "c") and not await reaches("d", "b")
        net.model.partition([{"a"}, {"b"}])
        assert not await reaches("a", "b")
        assert await reaches("c", "d")
        net.model.heal()
        assert not net.model.partitioned
        assert all([await reaches(s, d) for s in "abcd" for d in "abcd" if s != d])

    sim(main)


def test_partition_cuts_messages_in_flight() -> None:
    async def main() -> None:
        net = MemoryNetwork(NetworkModel(LinkModel(latency_s=1.0)))
        a, b = net.transport("a"), net.transport("b")
        arrivals: list[tuple[float, str]] = []
        serve_ping(b, arrivals)
        call = asyncio.ensure_future(ping(a, "b", timeout=5.0))
        await asyncio.sleep(0.5)
        net.model.partition([{"a"}, {"b"}])
        with pytest.raises(PeerUnreachable):
            await call
        assert arrivals == []

    sim(main)


def test_partition_rejects_a_peer_in_two_groups() -> None:
    with pytest.raises(ValueError, match="two partition groups"):
        NetworkModel().partition([{"a", "b"}, {"b"}])


def test_registration_shutdown_and_reuse_of_an_id() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b")
        serve_ping(b)
        with pytest.raises(ValueError, match="already registered"):
            net.transport("a")
        assert net.peer_ids() == ["a", "b"]
        await b.shutdown()
        assert not net.is_alive("b") and net.peer_ids() == ["a"]
        with pytest.raises(PeerUnreachable):
            await ping(a, "b", timeout=3.0)
        assert now() == pytest.approx(3.0)  # a departed peer is silent, not refused
        with pytest.raises(PeerUnreachable, match="left"):
            await ping(b, "a")
        b2 = net.transport("b")
        serve_ping(b2)
        assert await ping(a, "b") == 2
        with pytest.raises(ValueError, match="not registered"):
            net.crash("zzz")

    sim(main)


def test_link_model_validation() -> None:
    with pytest.raises(ValueError, match="latency_s"):
        LinkModel(latency_s=-1)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkModel(bandwidth_bytes_per_s=0)
    with pytest.raises(ValueError, match="loss"):
        LinkModel(loss=1.5)


# -- refusals and bad input ------------------------------------------------------------------------

def test_unknown_method_is_refused() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b")
        with pytest.raises(RemoteError) as err:
            await a.call("b", "no_such_method", Message(peer_pb2.Ping()), peer_pb2.Pong, timeout=5)
        assert err.value.code == "unknown_method"
        assert b.stats.rejected["unknown_method"] == 1
        assert a.stats.failed_calls == 1

    sim(main)


def test_handler_refusal_reaches_the_caller_and_is_counted() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b")
        refused: list[tuple[str, str]] = []
        b.on_reject = lambda peer, reason, msg: refused.append((peer, reason))

        async def handle(sender: str, req: Message[Any]) -> Message[Any]:
            if req.body.run_id != RUN:
                raise BadMessage(f"run {req.body.run_id!r} is not {RUN!r}", code="wrong_run")
            return Message(peer_pb2.ModelExchange())

        b.register("exchange", peer_pb2.ModelExchange, handle)
        bad = Message(peer_pb2.ModelExchange(run_id="other-run"))
        with pytest.raises(RemoteError) as err:
            await a.call("b", "exchange", bad, peer_pb2.ModelExchange, timeout=5)
        assert err.value.code == "wrong_run"
        assert "other-run" in str(err.value)
        assert b.stats.rejected["wrong_run"] == 1 and refused == [("a", "wrong_run")]
        await a.call("b", "exchange", exchange(), peer_pb2.ModelExchange, timeout=5)

    sim(main)


def _frame(env: peer_pb2.Envelope, payload: bytes = b"") -> bytes:
    head = env.SerializeToString()
    return codec.HEADER.pack(len(head)) + head + payload


def _valid_frame() -> bytes:
    m = exchange()
    return codec.join(codec.encode("exchange", m.body, m.tensors))


def _nan_frame() -> bytes:
    tensors = model_tensors()
    tensors["w"][1, 2] = float("nan")
    return codec.join(codec.encode("exchange", exchange().body, tensors))


BAD_FRAMES: dict[str, tuple[Callable[[], bytes], str]] = {
    "shorter than a header": (lambda: b"\x01\x02", "malformed"),
    "garbage envelope": (lambda: codec.HEADER.pack(6) + b"\xff\xfe\xfd\xfc\xfb\xfa", "malformed"),
    "truncated payload": (lambda: _valid_frame()[:-7], "malformed"),
    "envelope length past the end": (lambda: codec.HEADER.pack(500) + b"\x0a\x01", "malformed"),
    "huge envelope length": (lambda: b"\xff\xff\xff\xff" + b"\x00" * 64, "oversized"),
    "oversized message": (lambda: _frame(peer_pb2.Envelope(method="exchange")) + b"\x00" * 5000, "oversized"),
    "unknown dtype name": (
        lambda: _frame(peer_pb2.Envelope(
            method="exchange", payload_bytes=16,
            tensors=[peer_pb2.TensorSpec(name="w", dtype="float128", shape=[1])]), b"\x00" * 16),
        "bad_shape"),
    "wrong shape for the model": (
        lambda: codec.join(codec.encode("exchange", exchange().body,
                                        {**model_tensors(), "w": torch.zeros(3, 4)})),
        "bad_shape"),
    "NaN in a tensor": (_nan_frame, "non_finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_malformed_frames_are_rejected_and_the_node_keeps_serving(case: str) -> None:
    make, reason = BAD_FRAMES[case]

    async def main() -> None:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b", max_message_bytes=4096)
        served: list[int] = []

        async def handle(sender: str, req: Message[Any]) -> Message[Any]:
            codec.check_tensors(req.tensors, SHAPES)
            served.append(req.body.round)
            return Message(peer_pb2.ModelExchange(round=req.body.round))

        b.register("exchange", peer_pb2.ModelExchange, handle)
        data = make()
        parts = await b._dispatch("attacker", data)
        env, _ = codec.decode(codec.join(parts))
        assert env.error == peer_pb2.ErrorCode.Value(reason.upper()), env.error_message
        assert b.stats.rejected == {reason: 1}
        assert b.stats.bytes_received == len(data)
        assert served == []
        # Still serving good requests.
        resp = await a.call("b", "exchange", exchange(7), peer_pb2.ModelExchange, timeout=5)
        assert resp.body.round == 7 and served == [7]

    sim(main)


def test_oversized_response_is_rejected_by_the_caller() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        a, b = net.transport("a", max_message_bytes=2048), net.transport("b")

        async def handle(sender: str, req: Message[Any]) -> Message[Any]:
            return Message(peer_pb2.ModelExchange(), {"w": torch.zeros(10_000)})

        b.register("exchange", peer_pb2.ModelExchange, handle)
        with pytest.raises(BadMessage) as err:
            await a.call("b", "exchange", Message(peer_pb2.ModelExchange()), peer_pb2.ModelExchange, 5)
        assert err.value.code == "oversized"
        assert a.stats.rejected == {"oversized": 1}

    sim(main)


# -- accounting and determinism ----------------------------------------------------------------------

def test_byte_counters_are_exact() -> None:
    req = exchange(2)
    req_size = codec.encoded_size(codec.encode("exchange", req.body, req.tensors))
    resp_tensors = {"w": torch.ones(5, 5)}
    resp_body = peer_pb2.ModelExchange(round=3)
    resp_size = codec.encoded_size(codec.encode("exchange", resp_body, resp_tensors))

    async def main() -> tuple[MemoryNetwork, MemoryTransport, MemoryTransport]:
        net = MemoryNetwork()
        a, b = net.transport("a"), net.transport("b")

        async def handle(sender: str, r: Message[Any]) -> Message[Any]:
            return Message(resp_body, resp_tensors)

        b.register("exchange", peer_pb2.ModelExchange, handle)
        for _ in range(3):
            await a.call("b", "exchange", req, peer_pb2.ModelExchange, timeout=5)
        return net, a, b

    net, a, b = sim(main)
    assert a.stats.as_dict() == {"bytes_sent": 3 * req_size, "bytes_received": 3 * resp_size, "calls": 3,
                                 "failed_calls": 0, "rejected": {}}
    assert b.stats.as_dict() == {"bytes_sent": 3 * resp_size, "bytes_received": 3 * req_size, "calls": 0,
                                 "failed_calls": 0, "rejected": {}}
    assert net.bytes_sent_total == net.bytes_delivered_total == 3 * (req_size + resp_size)
    assert net.messages_sent_total == net.messages_delivered_total == 6
    assert net.messages_dropped_total == 0


def test_lost_bytes_count_as_sent_not_delivered() -> None:
    async def main() -> MemoryNetwork:
        net = MemoryNetwork(NetworkModel(LinkModel(loss=1.0)))
        a, b = net.transport("a"), net.transport("b")
        serve_ping(b)
        with pytest.raises(PeerUnreachable):
            await ping(a, "b", timeout=1.0)
        assert b.stats.bytes_received == 0
        assert a.stats.bytes_sent == net.bytes_sent_total > 0
        return net

    net = sim(main)
    assert net.bytes_delivered_total == 0 and net.messages_dropped_total == 1


def test_many_nodes_run_deterministically() -> None:
    def trace() -> list[tuple[float, str, str]]:
        async def main() -> list[tuple[float, str, str]]:
            model = NetworkModel(LinkModel(latency_s=0.01, loss=0.1))
            model.set_link("n0", "n1", LinkModel(latency_s=0.2))
            net = MemoryNetwork(model, seed=11)
            nodes = [net.transport(f"n{i}") for i in range(30)]
            log: list[tuple[float, str, str]] = []
            for t in nodes:
                async def handle(sender: str, req: Message[Any], me: str = t.peer_id) -> Message[Any]:
                    log.append((now(), sender, me))
                    return Message(peer_pb2.Pong(round=req.body.round))
                t.register("ping", peer_pb2.Ping, handle)

            async def gossip(i: int) -> None:
                for r in range(5):
                    try:
                        await ping(nodes[i], f"n{(i * 7 + r) % 30}", timeout=0.5, round_=r)
                    except PeerUnreachable:
                        log.append((now(), f"n{i}", "timeout"))

            await asyncio.gather(*(gossip(i) for i in range(30)))
            return log

        return sim(main)

    first = trace()
    assert first == trace()
    assert any(dst == "timeout" for _, _, dst in first)
