"""Wire codec: every dtype and shape the protocols send survives a round trip, bit for bit."""

from __future__ import annotations

import pytest
import torch

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
