"""Transport seam: request/response messaging with tensors as raw bytes (see `base.Transport`)."""

from p2pnode.transport.base import Handler, TrafficStats, Transport
from p2pnode.transport.codec import Message
from p2pnode.transport.compression import Compression, parse_compression
from p2pnode.transport.feedback import ErrorFeedback

__all__ = ["Compression", "ErrorFeedback", "Handler", "Message", "TrafficStats", "Transport", "parse_compression"]
