"""`p2pnode status`, `peers`, `leave`, `watch` and `health`: clients of a running daemon's control API.

They find the daemon through ``<state dir>/control.json`` (its address and bearer token, written by
the daemon at start, see `p2pnode.daemon.statedir`) and call it over gRPC on 127.0.0.1.

Exit codes (besides click's 2 for bad usage):

====  ==========================================================================================
0     done
1     the daemon answered with an error
4     no daemon found: the state dir holds no ``control.json``
5     the daemon does not answer at the address in ``control.json`` (stale file, or it is stuck)
6     the daemon refused the token in ``control.json``
====  ==========================================================================================

`health` follows Docker's HEALTHCHECK convention instead: 0 serving, 1 anything else.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf.message import Message

from p2pnode.daemon.statedir import (
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    ControlFileError,
    ControlInfo,
    control_file_path,
    read_control_file,
)
from p2pnode.proto import control_pb2, control_pb2_grpc

EXIT_ERROR = 1
EXIT_NO_DAEMON = 4
EXIT_UNREACHABLE = 5
EXIT_UNAUTHORIZED = 6
#: Default time allowed to connect and for one call, in seconds.
DEFAULT_TIMEOUT_S = 5.0

R = TypeVar("R", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])


class ControlError(click.ClickException):
    """A failure that ends the command with exit code 1 and a one-line message on stderr."""

    exit_code = EXIT_ERROR


class NoDaemonError(ControlError):
    """The state dir holds no control file: no node was started there (exit code 4)."""

    exit_code = EXIT_NO_DAEMON


class UnreachableError(ControlError):
    """The node named by the control file does not answer, or the file is unreadable (exit code 5)."""

    exit_code = EXIT_UNREACHABLE


class UnauthorizedError(ControlError):
    """The node refused the control file's token (exit code 6)."""

    exit_code = EXIT_UNAUTHORIZED


def _state_dir(value: Path | None) -> Path:
    return Path(value or DEFAULT_STATE_DIR).expanduser()


def control_options(f: F) -> F:
    """``--state-dir`` and ``--timeout``, shared by every control command."""
    f = click.option("--timeout", default=DEFAULT_TIMEOUT_S, show_default=True,
                     type=click.FloatRange(min=0.1), help="Seconds allowed to connect and for each call.")(f)
    f = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar=STATE_DIR_ENV,
                     default=None, show_default=DEFAULT_STATE_DIR, show_envvar=True,
                     help="State directory of the node (where it wrote control.json).")(f)
    return f


def _pid_hint(pid: int) -> str:
    """Whether process `pid` still exists, in words (in this process's pid namespace)."""
    if pid <= 0:
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"; its process {pid} is gone"
    except PermissionError:
        pass
    return f"; its process {pid} still exists"


class ControlClient:
    """A connection to the control API of the daemon that wrote ``control.json`` in `state_dir`.

    :param state_dir: the node's state directory (``~`` is expanded).
    :param timeout_s: time allowed to connect and for each unary call, in seconds (default 5).
    :raises ControlError: exit code 4 when there is no control file, 5 when it is unreadable.
    """

    def __init__(self, state_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.state_dir = state_dir
        self.timeout_s = timeout_s
        self.file = control_file_path(state_dir)
        try:
            info = read_control_file(state_dir)
        except ControlFileError as e:
            raise UnreachableError(str(e)) from e
        if info is None:
            raise NoDaemonError(f"no running node found in {state_dir}; start one with "
                                f"`p2pnode run --state-dir {state_dir}`")
        self.info: ControlInfo = info
        self.channel = grpc.insecure_channel(info.address)
        self.stub = control_pb2_grpc.ControlStub(self.channel)
        self.metadata = (("authorization", f"Bearer {info.token}"),)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unreachable(self, detail: str) -> NoReturn:
        raise UnreachableError(
            f"the node in {self.state_dir} does not answer at {self.info.address} ({detail})"
            f"{_pid_hint(self.info.pid)}. If it no longer runs, {self.file} is stale: remove it or start "
            "a node with this state dir")

    def fail(self, e: grpc.RpcError) -> NoReturn:
        """Turn a failed call into the matching exit code and message."""
        code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise UnauthorizedError(
                f"the node at {self.info.address} refused the token in {self.file}: {details}. The file may "
                "have been written by another node; restart the node to write a fresh one")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.unreachable(f"{code.name.lower()}: {details}")
        raise ControlError(f"the node at {self.info.address} answered {code.name}: {details}")

    def call(self, method: Callable[..., R], request: Message) -> R:
        """Make one unary call with the token and the timeout.

        A refused connection fails at once (UNAVAILABLE, exit 5); a daemon that accepts but does not
        answer fails after `timeout_s` (DEADLINE_EXCEEDED, also exit 5).
        """
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            self.fail(e)

    def watch(self) -> Iterator[control_pb2.RoundEvent]:
        """Round events until the node stops (no deadline: a watch runs as long as the node)."""
        # The stream has no deadline, so first check with a bounded call that the node answers and
        # accepts the token; otherwise a stuck daemon would leave `watch` hanging silently.
        self.call(self.stub.Status, control_pb2.StatusRequest())
        stream = self.stub.Watch(control_pb2.WatchRequest(), metadata=self.metadata)
        try:
            yield from stream
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                return
            self.fail(e)
        finally:
            stream.cancel()


# ------------------------------------------------------------------------------------------ formatting

def _opt(msg: Message, field: str) -> float | None:
    return getattr(msg, field) if msg.HasField(field) else None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


def _rejected(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + ")"


def key_values(rows: list[tuple[str, str | list[str]]]) -> str:
    """Rows of ``key  value`` with the values aligned; a list value continues on the following lines."""
    width = max(len(k) for k, _ in rows)
    lines = []
    for key, value in rows:
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values or ["-"]):
            lines.append(f"{key if i == 0 else '':<{width}}  {v}")
    return "\n".join(lines)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table (no box drawing, so it reads well in pipes and logs)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [headers, *rows])


def node_state(reply: control_pb2.StatusReply) -> str:
    """The node's lifecycle state in one lower-case word: created, starting, syncing, training, stopping or
    stopped (from `node_state`; a daemon too old to send it gives its `state` word instead)."""
    if reply.node_state == control_pb2.NODE_STATE_UNSPECIFIED:
        return reply.state or "unknown"
    return control_pb2.NodeState.Name(reply.node_state).removeprefix("NODE_STATE_").lower()


def dht_line(reply: control_pb2.StatusReply) -> str:
    """The state of the node's DHT process and the supervisor's non-zero events, in one line."""
    if not reply.dht_state:
        return "-"
    text = reply.dht_state
    if reply.dht_state != "ok":
        text += " (off the network: no rounds until the DHT process and p2pd are restarted)"
    events = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(reply.dht_events.items()) if v)
    return f"{text}; {events}" if events else text


def _metric_value(msg: Any) -> float | None:
    """The metric's value of a reply or event; a daemon of an older version sets only ``accuracy``."""
    value = _opt(msg, "metric_value")
    return _opt(msg, "accuracy") if value is None and not msg.metric else value


def _metric_label(msg: Any) -> str:
    return "accuracy" if not msg.metric else str(msg.metric)


def _metric_num(msg: Any) -> str:
    return _num(_metric_value(msg), 3 if _metric_label(msg) == "accuracy" else 4)


def partial_line(reply: control_pb2.StatusReply) -> str:
    """The partial rounds of `reply` with their reasons, e.g. ``3 (quorum 2, fraction 1)``."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(reply.partial_by_reason.items()) if v)
    return f"{reply.partial_rounds} ({reasons})" if reasons else str(reply.partial_rounds)


def status_dict(reply: control_pb2.StatusReply, address: str) -> dict[str, Any]:
    """`StatusReply` as the JSON object `p2pnode status --json` prints (None for unset values)."""
    return {
        "peer_id": reply.peer_id, "run_id": reply.run_id, "task": reply.task, "topology": reply.topology,
        "rule": reply.rule, "state": node_state(reply), "round": reply.round, "peers": reply.peers,
        "partial_rounds": reply.partial_rounds,
        "partial_by_reason": dict(sorted(reply.partial_by_reason.items())),
        "last_checkpoint_round": _opt(reply, "last_checkpoint_round"),
        "resumed_from": reply.resumed_from or None,
        "accuracy": _opt(reply, "accuracy"), "metric": reply.metric or "accuracy",
        "metric_value": _metric_value(reply), "loss": _opt(reply, "loss"), "bytes_sent": reply.bytes_sent,
        "bytes_received": reply.bytes_received, "rejected": dict(sorted(reply.rejected.items())),
        "maddrs": list(reply.maddrs), "pid": reply.pid, "uptime_s": round(reply.uptime_s, 3),
        "version": reply.version, "control_address": address,
        "dht_state": reply.dht_state or None, "dht_events": dict(sorted(reply.dht_events.items())),
    }


def peer_dict(p: control_pb2.PeerEntry) -> dict[str, Any]:
    return {"peer_id": p.peer_id, "maddrs": list(p.maddrs), "round": p.round, "last_seen": p.last_seen,
            "age_s": round(p.age_s, 3), "task": p.task, "capabilities": list(p.capabilities)}


def event_dict(e: control_pb2.RoundEvent) -> dict[str, Any]:
    """`RoundEvent` as the JSON object of one `p2pnode watch --json` line."""
    try:
        extra = json.loads(e.extra_json) if e.extra_json else {}
    except json.JSONDecodeError:
        extra = {"raw": e.extra_json}
    return {"round": e.round, "train_loss": e.train_loss, "test_loss": _opt(e, "test_loss"),
            "accuracy": _opt(e, "accuracy"), "metric": _metric_label(e), "metric_value": _metric_value(e),
            "peers": e.peers, "combined": e.combined, "fraction": e.fraction,
            "partner": e.partner if e.HasField("partner") else None, "failures": e.failures, "extra": extra,
            "peer_id": e.peer_id, "time": e.time, "bytes_sent": e.bytes_sent,
            "bytes_received": e.bytes_received}


def _event_line(e: control_pb2.RoundEvent) -> str:
    partner = e.partner[-12:] if e.HasField("partner") else "-"
    label = "acc" if _metric_label(e) == "accuracy" else _metric_label(e)
    return (f"round {e.round:<5d} loss {_num(e.train_loss)}  {label} {_metric_num(e)}  "
            f"peers {e.peers:<3d} merged {e.combined:<3d} failures {e.failures:<3d} partner {partner}  "
            f"sent {_mb(e.bytes_sent)}  received {_mb(e.bytes_received)}")


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


# ------------------------------------------------------------------------------------------ commands

@click.command()
@control_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def status(state_dir: Path | None, timeout: float, as_json: bool) -> None:
    """Show the running node's identity, round, peers, evaluation metric (accuracy, perplexity) and traffic."""
    with ControlClient(_state_dir(state_dir), timeout) as client:
        reply = client.call(client.stub.Status, control_pb2.StatusRequest())
    if as_json:
        _echo_json(status_dict(reply, client.info.address))
        return
    click.echo(key_values([
        ("peer id", reply.peer_id),
        ("run", f"{reply.run_id} (task {reply.task}, {reply.topology}/{reply.rule})"),
        ("state", node_state(reply)),
        ("dht", dht_line(reply)),
        ("round", str(reply.round)),
        ("partial rounds", partial_line(reply)),
        ("last checkpoint", "-" if not reply.HasField("last_checkpoint_round")
         else f"round {reply.last_checkpoint_round}"),
        ("resumed from", reply.resumed_from or "-"),
        ("peers", str(reply.peers)),
        (_metric_label(reply), _metric_num(reply)),
        ("loss", _num(_opt(reply, "loss"))),
        ("sent", _mb(reply.bytes_sent)),
        ("received", _mb(reply.bytes_received)),
        ("rejected", _rejected(dict(reply.rejected))),
        ("addresses", list(reply.maddrs)),
        ("uptime", _duration(reply.uptime_s)),
        ("pid", str(reply.pid)),
        ("control", client.info.address),
    ]))


@click.command()
@control_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def peers(state_dir: Path | None, timeout: float, as_json: bool) -> None:
    """List the peers of the run that the running node knows (its directory's live records)."""
    with ControlClient(_state_dir(state_dir), timeout) as client:
        reply = client.call(client.stub.ListPeers, control_pb2.ListPeersRequest())
    if as_json:
        _echo_json([peer_dict(p) for p in reply.peers])
        return
    if not reply.peers:
        click.echo("no peers known yet")
        return
    rows = []
    for p in reply.peers:
        addrs = p.maddrs[0] + (f" (+{len(p.maddrs) - 1})" if len(p.maddrs) > 1 else "") if p.maddrs else "-"
        rows.append([p.peer_id, str(p.round), f"{_duration(p.age_s)} ago", addrs])
    click.echo(table(["PEER ID", "ROUND", "LAST SEEN", "ADDRESS"], rows))


@click.command()
@control_options
@click.option("--reason", default="", help="Why; written to the node's log.")
def leave(state_dir: Path | None, timeout: float, reason: str) -> None:
    """Ask the running node to leave the run: it finishes its round, withdraws and stops."""
    with ControlClient(_state_dir(state_dir), timeout) as client:
        reply = client.call(client.stub.Leave, control_pb2.LeaveRequest(reason=reason))
    if not reply.accepted:
        raise ControlError(f"the node refused to leave: {reply.message}")
    click.echo(reply.message)


@click.command()
@control_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per round (JSON lines).")
@click.option("--count", default=0, show_default=True, type=click.IntRange(min=0),
              help="Stop after this many rounds (0: until the node stops or Ctrl-C).")
def watch(state_dir: Path | None, timeout: float, as_json: bool, count: int) -> None:
    """Print one line per round as the running node completes it, until it stops (or Ctrl-C)."""
    seen = 0
    with ControlClient(_state_dir(state_dir), timeout) as client:
        try:
            for event in client.watch():
                if as_json:
                    _echo_json(event_dict(event))
                else:
                    click.echo(_event_line(event))
                seen += 1
                if count and seen >= count:
                    return
        except KeyboardInterrupt:
            return
    if not as_json:
        click.echo("the node stopped", err=True)


@click.command()
@control_options
@click.option("--address", default=None, help="Control address to probe instead of the one in control.json.")
def health(state_dir: Path | None, timeout: float, address: str | None) -> None:
    """Probe the node's gRPC health service (no token needed): exit 0 when SERVING, else 1.

    Meant for a Docker HEALTHCHECK (`HEALTHCHECK CMD p2pnode health`).
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if address is None:
        directory = _state_dir(state_dir)
        try:
            info = read_control_file(directory)
        except ControlFileError as e:
            raise ControlError(str(e)) from e
        if info is None:
            raise ControlError(f"no running node found in {directory}")
        address = info.address
    t0 = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise ControlError(f"no health answer from {address}: {e.code().name}") from e  # type: ignore[attr-defined]
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(f"{name} ({address}, {(time.monotonic() - t0) * 1000:.0f} ms)")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(1)


COMMANDS: tuple[click.Command, ...] = (status, peers, leave, watch, health)


def register(group: click.Group) -> None:
    """Add the control commands (`status`, `peers`, `leave`, `watch`, `health`) to `group`."""
    for command in COMMANDS:
        group.add_command(command)
