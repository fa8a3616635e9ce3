"""Error feedback for lossy compression: what one message left out is added to the next one (docs/compression.md)."""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from p2pnode.transport.compression import (
    _FLOAT_NAMES,
    DEFAULT_MAX_STREAMS,
    CompressedTensor,
    Compression,
    compress,
    compress_state,
    decompress,
    parse_compression,
)

__all__ = ["ErrorFeedback"]


@dataclass
class _Residual:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class ErrorFeedback:
    """Error feedback for lossy compression: what one message left out is added to the next one.

    For each stream (a destination peer id, or ``""`` for one stream shared by all destinations) it keeps
    the residual ``e = (x + e_prev) - decoded(x + e_prev)`` of the last message and sends ``x + e`` next
    time, so the running sum of what the receiver decodes stays within one residual of the running sum
    of the inputs. A protocol holds one per kind of message it compresses.

    Use it for values the receiver accumulates (updates, DiLoCo pseudo-gradients): there the residual
    arrives one message later and nothing is lost. A whole model is not accumulated, so feedback would
    only add last round's residual to this round's error: compress models without it.

    Args:
        compression: the format (``none``: `compress` only wraps the tensors; no residual is kept).
        max_streams: most streams with a residual (default 16); the least recently used is dropped
            (its next message starts without feedback). Each residual is one model's floating tensors
            in float32 or their own dtype, so memory is at most ``max_streams`` models.
    """

    def __init__(self, compression: Compression | str, *, max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.compression = parse_compression(compression)
        self.max_streams = max_streams
        self._streams: collections.OrderedDict[str, _Residual] = collections.OrderedDict()

    def compress(self, state: Mapping[str, torch.Tensor], stream: str = "") -> dict[str, CompressedTensor]:
        """Compress `state` for `stream`, with that stream's residual added; keep the new residual.

        A residual whose tensor names or shapes no longer match `state` is dropped (a new model).
        """
        c = self.compression
        if not c.lossy:
            return compress_state(state, c)
        res = self._streams.pop(stream, None) or _Residual()
        while len(self._streams) >= self.max_streams:
            self._streams.popitem(last=False)
        out: dict[str, CompressedTensor] = {}
        new = _Residual()
        for name, t in state.items():
            t = t.detach().cpu()
            if t.dtype not in _FLOAT_NAMES:
                out[name] = compress(t, c)
                continue
            prev = res.tensors.get(name)
            x = t + prev if prev is not None and prev.shape == t.shape and prev.dtype == t.dtype else t
            sent = compress(x, c)
            out[name] = sent
            new.tensors[name] = x - decompress(sent)
        self._streams[stream] = new
        return out

    def residual(self, stream: str = "") -> dict[str, torch.Tensor]:
        """The residual kept for `stream` (empty when none)."""
        res = self._streams.get(stream)
        return dict(res.tensors) if res is not None else {}

    def reset(self, stream: str | None = None) -> None:
        """Forget the residual of `stream`, or of every stream (None)."""
        if stream is None:
            self._streams.clear()
        else:
            self._streams.pop(stream, None)

    @property
    def streams(self) -> list[str]:
        """Streams with a residual, least recently used first."""
        return list(self._streams)
