"""The local control API of a running daemon, over gRPC (``p2pnode.proto.Control``).

`ControlServer` answers `p2pnode status`, `peers`, `leave` and `watch`, and serves the standard gRPC
health service (``grpc.health.v1.Health``) that a Docker HEALTHCHECK probes. It listens on 127.0.0.1
(or a unix socket) only: peers never reach it, they talk to the node over libp2p.

Authentication: every Control call must carry the metadata ``authorization: Bearer <token>``. The
token is a random secret that only the daemon's user can read (``control.json`` in the state dir,
mode 0600, see `p2pnode.daemon.statedir`), so another local user who can connect to the port still
cannot steer the node. The health service needs no token: it reveals nothing but "serving or not",
and the health probe should not have to read a secret. The check is `control_auth.TokenInterceptor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from p2pnode import __version__
from p2pnode.daemon.control_auth import TokenInterceptor
from p2pnode.daemon.statedir import (
    ControlFileError,
    StateDirError,
    control_file_path,
    ensure_state_dir,
    new_token,
    read_control_file,
    remove_control_file,
    write_control_file,
)
from p2pnode.proto import control_pb2, control_pb2_grpc

if TYPE_CHECKING:
    from p2pnode.daemon.node import Node
    from p2pnode.protocols import RoundReport

logger = logging.getLogger(__name__)

#: Full name of the Control service, as health checks name it.
SERVICE_NAME = "p2pnode.proto.Control"
#: How often the health status is refreshed from the node's state for Health.Watch subscribers, in
#: seconds. Health.Check refreshes it on every call, so a probe never sees a stale answer.
HEALTH_POLL_S = 1.0
#: How long `start_control` waits for an answer from the node named by an existing control file, in seconds.
PROBE_TIMEOUT_S = 1.0
#: Longest wait for the directory's peer list in ListPeers, in seconds (the real DHT may be slow).
LIST_PEERS_TIMEOUT_S = 10.0
#: How long `stop()` lets calls in flight finish before cancelling them, in seconds.
STOP_GRACE_S = 1.0
#: Node states in which the node no longer runs rounds.
_ENDED_STATES = frozenset({"stopping", "stopped"})
#: `Node.state` words -> `NodeState` values of the Status reply ("running" is reported as TRAINING).
NODE_STATES: dict[str, control_pb2.NodeState] = {
    "created": control_pb2.NODE_STATE_CREATED, "starting": control_pb2.NODE_STATE_STARTING,
    "syncing": control_pb2.NODE_STATE_SYNCING, "running": control_pb2.NODE_STATE_TRAINING,
    "stopping": control_pb2.NODE_STATE_STOPPING, "stopped": control_pb2.NODE_STATE_STOPPED,
}


def _opt(value: float | None) -> dict[str, float]:
    """Keyword for an ``optional double`` field: absent when None, so the reply leaves it unset."""
    return {} if value is None else {"value": value}


def round_event(report: RoundReport, *, peer_id: str, bytes_sent: int, bytes_received: int,
                now: float | None = None, metric: str = "accuracy") -> control_pb2.RoundEvent:
    """The `RoundEvent` of one round report; `now` is the send time in seconds since the epoch.

    `metric` names the task's metric, whose value is ``report.accuracy``; ``accuracy`` is set only
    when that metric is accuracy.
    """
    event = control_pb2.RoundEvent(
        round=report.round, train_loss=report.train_loss, peers=report.peers, combined=report.combined,
        fraction=report.fraction, failures=report.failures,
        extra_json=json.dumps(report.extra, default=str, sort_keys=True), peer_id=peer_id,
        time=time.time() if now is None else now, bytes_sent=bytes_sent, bytes_received=bytes_received,
        metric=metric)
    # proto3 optional fields: leave unset (HasField false) rather than writing a fake 0.
    if report.test_loss is not None:
        event.test_loss = report.test_loss
    if report.accuracy is not None:
        event.metric_value = report.accuracy
        if metric == "accuracy":
            event.accuracy = report.accuracy
    if report.partner is not None:
        event.partner = report.partner
    return event


class _ControlServicer(control_pb2_grpc.ControlServicer):
    """The Control methods over one `Node`. Authentication happens before, in `TokenInterceptor`."""

    def __init__(self, server: ControlServer) -> None:
        self._server = server
        self._node = server.node

    async def Status(self, request: control_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> control_pb2.StatusReply:
        node = self._node
        st = node.status()
        # Messages refused by the transport, and (prefixed) what the peer directory refused.
        rejected = {**st.rejected, **{f"directory.{reason}": count
                                      for reason, count in node.directory.rejected.items() if count}}
        reply = control_pb2.StatusReply(
            peer_id=st.peer_id, run_id=st.run_id, task=st.task, round=st.round, peers=st.peers,
            bytes_sent=st.bytes_sent, bytes_received=st.bytes_received, rejected=rejected,
            maddrs=st.maddrs, state=st.state, topology=node.config.topology, rule=node.config.rule,
            pid=os.getpid(), uptime_s=self._server.uptime_s(), version=__version__,
            partial_rounds=st.partial_rounds, resumed_from=st.resumed_from,
            node_state=NODE_STATES.get(st.state, control_pb2.NODE_STATE_UNSPECIFIED),
            dht_state=st.dht_state or "", dht_events=st.dht_events,
            round_bytes_sent=st.round_bytes_sent, round_bytes_received=st.round_bytes_received,
            metric=st.metric, partial_by_reason=st.partial_by_reason, **st.tensor_bytes)
        if st.last_checkpoint_round is not None:
            reply.last_checkpoint_round = st.last_checkpoint_round
        if st.accuracy is not None:
            reply.accuracy = st.accuracy
        if st.metric_value is not None:
            reply.metric_value = st.metric_value
        if st.loss is not None:
            reply.loss = st.loss
        return reply

    async def ListPeers(self, request: control_pb2.ListPeersRequest,
                        context: grpc.aio.ServicerContext) -> control_pb2.ListPeersReply:
        try:
            peers = await asyncio.wait_for(self._node.directory.peers(), LIST_PEERS_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the peer directory did not answer within {LIST_PEERS_TIMEOUT_S:g} s")
        now = time.time()
        return control_pb2.ListPeersReply(peers=[
            control_pb2.PeerEntry(peer_id=p.peer_id, maddrs=list(p.maddrs), round=p.round,
                                  last_seen=p.timestamp, age_s=now - p.timestamp, task=p.task,
                                  capabilities=list(p.capabilities))
            for p in peers])

    async def Metrics(self, request: control_pb2.MetricsRequest,
                      context: grpc.aio.ServicerContext) -> control_pb2.MetricsReply:
        node = self._node
        st = node.transport.stats
        reply = control_pb2.MetricsReply(
            round=node.round, calls=st.calls, failed_calls=st.failed_calls, bytes_sent=st.bytes_sent,
            bytes_received=st.bytes_received, rejected=dict(st.rejected),
            directory_mismatched=node.directory.mismatched, directory_invalid=node.directory.invalid,
            round_bytes_sent=node.round_bytes_sent, round_bytes_received=node.round_bytes_received,
            tensor_wire_bytes_sent=st.tensor_wire_bytes_sent, tensor_raw_bytes_sent=st.tensor_raw_bytes_sent,
            metric=node.trainer.metric)
        r = node.last_report
        if r is not None:
            reply.loss = r.train_loss
            reply.peers, reply.combined, reply.failures = r.peers, r.combined, r.failures
            reply.fraction = r.fraction
            if r.test_loss is not None:
                reply.test_loss = r.test_loss
            if r.accuracy is not None:
                reply.metric_value = r.accuracy
                if node.trainer.metric == "accuracy":
                    reply.accuracy = r.accuracy
        return reply

    async def Leave(self, request: control_pb2.LeaveRequest,
                    context: grpc.aio.ServicerContext) -> control_pb2.LeaveReply:
        node = self._node
        logger.info("leave requested through the control API%s",
                    f": {request.reason}" if request.reason else "")
        if node.state in _ENDED_STATES:
            return control_pb2.LeaveReply(accepted=True,
                                          message=f"node {node.peer_id} is already {node.state}")
        try:
            self._server.on_leave()
        except Exception as e:  # the caller must learn that nothing happened
            logger.exception("the leave callback failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"the node could not start leaving: {e}")
        return control_pb2.LeaveReply(
            accepted=True, message=f"node {node.peer_id} is leaving: it finishes the round in progress, "
                                   "withdraws from the directory and stops")

    async def Watch(self, request: control_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[control_pb2.RoundEvent]:
        node = self._node
        if node.state in _ENDED_STATES:
            return  # node.watch() would wait forever: the end-of-stream marker was sent already
        reports = node.watch()
        closing = asyncio.ensure_future(self._server.closing.wait())
        pending: asyncio.Future[RoundReport] | None = asyncio.ensure_future(anext(reports))
        try:
            # One loop turn lets `pending` subscribe to the node; then send the headers now rather than
            # with the first event (a round away): a client that sees them knows its token was accepted
            # and that no later round will be missed.
            await asyncio.sleep(0)
            await context.send_initial_metadata(())
            while pending is not None:
                waiters: set[asyncio.Future[Any]] = {pending, closing}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if not pending.done():  # the control server stops: end the stream cleanly
                    break
                try:
                    report = pending.result()
                except StopAsyncIteration:  # the node shut down
                    break
                pending = None
                st = node.transport.stats
                yield round_event(report, peer_id=node.peer_id, bytes_sent=st.bytes_sent,
                                  bytes_received=st.bytes_received, metric=node.trainer.metric)
                pending = asyncio.ensure_future(anext(reports))
        finally:
            # Runs also when the client goes away (the call is cancelled): unregister from the node.
            closing.cancel()
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            aclose = getattr(reports, "aclose", None)  # Node.watch is an async generator
            if aclose is not None:
                await aclose()


class _NodeHealth(HealthServicer):
    """The standard health service, whose status follows the node's state on every Check."""

    def __init__(self, server: ControlServer) -> None:
        super().__init__()
        self._control = server
        self._last: int | None = None

    async def sync(self) -> None:
        """Set SERVING while the node runs rounds, NOT_SERVING before it starts, once it stops, and while it
        is off the network (its DHT process or p2pd died and is being restarted)."""
        node = self._control.node
        serving = node.state == "running" and node.network_ok and not self._control.closing.is_set()
        codes = health_pb2.HealthCheckResponse
        status = codes.SERVING if serving else codes.NOT_SERVING
        if status != self._last:
            self._last = status
            for service in ("", SERVICE_NAME):
                await self.set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        await self.sync()
        return await super().Check(request, context)


class ControlServer:
    """Serves the Control API and the health service of one node on a local address.

    :param node: the node to report on and control.
    :param token: the secret every Control call must present as ``authorization: Bearer <token>``.
    :param on_leave: called (on the event loop, without arguments) when a client asks the node to leave;
        it should make the daemon stop the node gracefully, typically ``node.stop`` (the node finishes
        the round in progress, then `Node.run` returns and the daemon shuts down).
    :param host: ``"127.0.0.1"`` (default) or another local interface, or ``"unix:PATH"`` for a unix
        socket (then `port` is ignored). Do not bind a public interface: calls travel in clear text.
    :param port: TCP port; 0 (default) picks a free one.
    """

    def __init__(self, node: Node, *, token: str, on_leave: Callable[[], None], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        if not token:
            raise ValueError("the control token must not be empty")
        self.node = node
        self.on_leave = on_leave
        self.host = host
        self.port = port
        self.address: str | None = None
        #: Set when `stop()` begins: open Watch streams end and the health status turns NOT_SERVING.
        self.closing = asyncio.Event()
        self._token = token
        self._server: grpc.aio.Server | None = None
        self._health: _NodeHealth | None = None
        self._poller: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._stop_callbacks: list[Callable[[], None]] = []

    def uptime_s(self) -> float:
        """Seconds since `start()` (0.0 before)."""
        return time.monotonic() - self._started_at if self._started_at else 0.0

    def add_stop_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback` at the start of `stop()`, before the server closes (errors are logged)."""
        self._stop_callbacks.append(callback)

    async def start(self) -> str:
        """Bind and start serving; return the bound address (``"127.0.0.1:PORT"`` or ``"unix:PATH"``)."""
        if self._server is not None:
            raise RuntimeError("the control server is already started")
        server = grpc.aio.server(interceptors=[TokenInterceptor(self._token)],
                                 # One local user and a few CLI calls: no need for large messages.
                                 options=[("grpc.max_receive_message_length", 1 << 20)])
        control_pb2_grpc.add_ControlServicer_to_server(_ControlServicer(self), server)
        self._health = _NodeHealth(self)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.host.startswith("unix:"):
            target = address = self.host
        else:
            host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
            target = f"{host}:{self.port}"
        try:
            bound = server.add_insecure_port(target)
        except RuntimeError as e:  # grpc reports a failed bind this way (port in use, bad socket path)
            raise OSError(f"the control API could not listen on {target}: {e}") from e
        if bound == 0:
            raise OSError(f"the control API could not listen on {target}")
        if not self.host.startswith("unix:"):
            address = f"{host}:{bound}"
        await server.start()
        if self.host.startswith("unix:"):
            # The token already guards every call; this keeps other users from even connecting.
            with contextlib.suppress(OSError):
                os.chmod(self.host.removeprefix("unix:").removeprefix("//"), 0o600)
        self._server, self.address = server, address
        self._started_at = time.monotonic()
        await self._health.sync()
        self._poller = asyncio.create_task(self._poll_health(), name="control-health")
        logger.info("control API listening on %s", address)
        return address

    async def _poll_health(self) -> None:
        assert self._health is not None
        while not self.closing.is_set():
            await self._health.sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), HEALTH_POLL_S)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop serving: run the stop callbacks, report NOT_SERVING, end Watch streams, and close.

        :param grace_s: time calls in flight get to finish before they are cancelled, in seconds (default 1).
        """
        if self._server is None or self.closing.is_set():
            return
        self.closing.set()
        for callback in self._stop_callbacks:
            try:
                callback()
            except Exception:
                logger.exception("a control server stop callback failed")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self._server.stop(grace_s)
        logger.info("control API on %s stopped", self.address)


async def _answers(address: str, timeout_s: float) -> bool:
    """Whether a health service answers at `address` within `timeout_s` seconds (any status counts)."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
    return True


async def start_control(node: Node, state_dir: str | os.PathLike[str], on_leave: Callable[[], None], *,
                        host: str = "127.0.0.1", port: int = 0) -> ControlServer:
    """Start the control API of `node` and publish it in ``<state_dir>/control.json``.

    Creates the state dir (0700) and a fresh token, starts a `ControlServer`, then writes the control
    file (0600). The server's ``stop()`` removes the file again (only if it is still this server's).

    :param on_leave: called when a client asks the node to leave (see `ControlServer`).
    :param host: ``"127.0.0.1"`` (default) or ``"unix:PATH"``.
    :param port: TCP port; 0 (default) picks a free one.
    :raises StateDirError: when another node that still answers already uses `state_dir`.
    """
    directory = ensure_state_dir(state_dir)
    try:
        existing = read_control_file(directory)
    except ControlFileError as e:
        logger.warning("replacing an unreadable control file: %s", e)
        existing = None
    # Two daemons on one state dir would fight over control.json, and the CLI would find only one of them.
    if existing is not None and await _answers(existing.address, PROBE_TIMEOUT_S):
        raise StateDirError(f"another node (peer {existing.peer_id}, pid {existing.pid}) is running with "
                            f"state dir {directory}; stop it first or pass a different --state-dir")
    if existing is not None:
        logger.info("replacing a stale control file of pid %d in %s", existing.pid, directory)
    token = new_token()
    server = ControlServer(node, token=token, on_leave=on_leave, host=host, port=port)
    address = await server.start()
    try:
        write_control_file(directory, address, token, node.peer_id)
    except BaseException:
        await server.stop(grace_s=0)
        raise
    server.add_stop_callback(lambda: _remove_quietly(directory, token))
    return server


def _remove_quietly(directory: Path, token: str) -> None:
    try:
        remove_control_file(directory, token)
    except OSError as e:  # a read-only or vanished state dir must not break shutdown
        logger.warning("could not remove %s: %s", control_file_path(directory), e)
