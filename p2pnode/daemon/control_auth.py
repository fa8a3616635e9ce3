"""Token authentication of the control API: `TokenInterceptor` refuses calls without the right bearer token.

Every call to the Control service must carry the metadata ``authorization: Bearer <token>``, where the
token is the secret in ``control.json`` of the state dir (`p2pnode.daemon.statedir`). A call without it,
or with another token, is answered UNAUTHENTICATED (and logged) before its method runs; the token is
compared in constant time. Calls to the health service (`HEALTH_PREFIX`) need no token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

logger = logging.getLogger(__name__)

#: Method-path prefix of the health service; calls under it need no token.
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call outside the health service unless it carries the right bearer token.

    Checking here rather than in each method means a method added later is protected by default.
    """

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        given = bearer_token(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        # compare_digest takes the same time wherever the first difference is, so the answer's timing
        # does not leak how much of a guessed token was right.
        if given is not None and hmac.compare_digest(given.encode(), self._token):
            return handler
        reason = "missing" if given is None else "wrong"
        logger.warning("control call %s refused: %s token", method, reason)
        return _refusal(handler, f"{reason} control token: send the metadata 'authorization: Bearer <token>' "
                                 "with the token from control.json in the node's state directory")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator; abort() always raises

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    # The Control service has no client-streaming methods; refuse those shapes without reading input.
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream, **kw)
    return grpc.stream_unary_rpc_method_handler(unary, **kw)
