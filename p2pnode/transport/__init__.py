"""Transport seam: request/response messaging with tensors as raw bytes (see `base.Transport`)."""

from p2pnode.transport.base import Handler, TrafficStats, Transport
from p2pnode.transport.codec import Message

__all__ = ["Handler", "Message", "TrafficStats", "Transport"]
