"""The project's error types. Every error a user or a peer can cause derives from `P2PNodeError`."""

from __future__ import annotations


class P2PNodeError(Exception):
    """Base class of all p2pnode errors."""


class ConfigError(P2PNodeError, ValueError):
    """A configuration value or combination is invalid; the message names the key and the allowed values."""


class AggregationError(P2PNodeError, ValueError):
    """Inputs to an aggregation rule or attack are invalid (unknown name, shapes, NaN, too many attackers)."""


class TransportError(P2PNodeError):
    """A call to a peer failed. `code` is a stable reason (see `p2pnode.transport.base.Reason`)."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class PeerUnreachable(TransportError):
    """The peer did not answer in time, refused the connection, or is gone."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unreachable")


class RemoteError(TransportError):
    """The peer answered with an error envelope (it refused our request)."""


class BadMessage(TransportError):
    """A message from a peer is malformed, oversized, of the wrong shape or dtype, or holds NaN/Inf.

    `code` is one of the reason codes counted in the node's `rejected` metrics:
    ``malformed``, ``oversized``, ``bad_shape``, ``non_finite``, ``wrong_run``, ``stale``; for compressed
    tensors (`p2pnode.transport.compression`) also ``bad_compression``, ``bad_blocks``, ``bad_scale`` and
    ``bad_index``.
    """
