"""Wire codec: every dtype and shape the protocols send survives a round trip, bit for bit."""

from __future__ import annotations

import pytest
import torch

from p2pnode.errors import BadMessage
from p2pnode.proto import peer_pb2
from p2pnode.transport import codec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (1, 4, 1)])
def test_round_trip_of_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if dtype not in codec.DTYPE_NAMES:
        pytest.skip(f"{dtype} is not a wire dtype")
    gen = torch.Generator().manual_seed(7)
    t = (torch.randn(shape, generator=gen) * 100).to(dtype)
    data = codec.join(codec.encode("m", peer_pb2.Ping(), {"t": t}))
    out = codec.decode(data)[1]["t"]
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert torch.equal(out, t)


def test_scalar_float_tensor_is_sent_with_its_four_bytes() -> None:
    t = torch.tensor(3.5)
    parts = codec.encode("m", peer_pb2.Ping(), {"x": t})
    assert sum(p.nbytes for p in parts[1:]) == 4
    assert codec.decode(codec.join(parts))[1]["x"].item() == 3.5


@pytest.mark.parametrize("method", ["", "a", "gossip.exchange", "m" * 127, "m" * 128, "m" * codec.MAX_METHOD_BYTES])
def test_method_prefix_finds_the_name_of_every_envelope_we_encode(method: str) -> None:
    env = codec.join(codec.encode(method, peer_pb2.Ping(round=1)))[codec.HEADER.size:]
    where = codec.method_prefix(env[:3])
    if not method:
        assert where is None  # an empty method is not written at all
        return
    assert where is not None
    start, length = where
    assert env[start:start + length].decode() == method


@pytest.mark.parametrize("length", [codec.MAX_METHOD_BYTES + 1, 16383, 16384, 2_000_000])
def test_method_prefix_refuses_a_long_name_from_its_length(length: int) -> None:
    env = codec.join(codec.encode("m" * length, peer_pb2.Ping()))[codec.HEADER.size:]
    with pytest.raises(BadMessage) as e:
        codec.method_prefix(env[:3])
    assert e.value.code == "unknown_method"


def test_method_prefix_leaves_other_first_fields_to_the_parser() -> None:
    assert codec.method_prefix(b"\x12\x05abc") is None  # field 2 (body) first
    assert codec.method_prefix(b"\x0a") is None  # too short to tell
