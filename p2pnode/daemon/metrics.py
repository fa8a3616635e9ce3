"""Prometheus metrics of one node, and the HTTP endpoint that serves them (``--metrics-port``).

Each node has a `CollectorRegistry` of its own (never prometheus-client's global one), so that many
nodes in one process (the simulator, tests) do not collide. Two kinds of metrics:

- read from the node at scrape time (`_NodeCollector`): round, loss, accuracy, peers, the last merge,
  and the transport's counters (bytes, calls, rejected messages by reason). They are the very numbers
  that ``p2pnode status`` shows, read at the moment of the scrape.
- events counted by the node as they happen (`NodeMetrics` attributes): rounds, partial rounds by
  reason, round durations, checkpoints, state syncs.

Names (all prefixed ``p2pnode_``; units in the name or the help text):

=========================================  =========  ==================================================
name                                       type       meaning
=========================================  =========  ==================================================
``info{peer_id,run_id,task,topology,...}``  gauge      always 1; identifies the node
``round``                                  gauge      rounds completed (resumed ones included)
``rounds_total``                           counter    rounds run by this process
``partial_rounds_total{reason}``           counter    rounds that combined less than asked
                                                      (``quorum``: fewer models than ``--min-merge``,
                                                      merge not applied; ``fraction``: part of the model)
``round_duration_seconds``                 histogram  wall time of one round, in seconds
``train_loss``, ``test_loss``              gauge      last round's losses
``accuracy``                               gauge      last evaluated test accuracy, in [0, 1] (tasks whose
                                                      metric is accuracy)
``eval_metric{metric}``                    gauge      the task's metric after the last evaluation
                                                      (``metric="accuracy"``, ``"perplexity"``, ...)
``peers``                                  gauge      peers known at the start of the last round
``merge_combined``, ``merge_fraction``     gauge      models merged in the last round (own included),
                                                      share of the model they covered (0: no merge
                                                      applied; `RoundReport.fraction`)
``bytes_sent_total``, ``bytes_received_total`` counter bytes to / from peers (whole messages)
``round_bytes_sent``, ``round_bytes_received`` gauge bytes to / from peers during the last round
``tensor_bytes_total{direction,size}``     counter    tensor bytes ``sent``/``received``, ``wire`` (as they
                                                      travelled, compressed) and ``raw`` (uncompressed);
                                                      raw / wire is the compression ratio
``calls_total``, ``failed_calls_total``    counter    requests to peers, and failed ones
``rejected_messages_total{reason}``        counter    messages refused, by reason code
``directory_rejected_total{reason}``       counter    directory records and reads refused, by reason
                                                      (`p2pnode.discovery.base.PeerDirectory`; each
                                                      record once); ``directory_invalid_total`` and
                                                      ``directory_mismatched_total`` are its sums
``protocol_events_total{event}``           counter    events counted by the round protocol
                                                      (`RoundProtocol.snapshot`; modest, fl:
                                                      aggregations, topups, relaunches, ...; with secagg
                                                      secagg_rounds, secagg_aborted, secagg_refused)
``checkpoints_written_total``              counter    checkpoints written
``checkpoint_failures_total``              counter    checkpoints that could not be written
``last_checkpoint_round``                  gauge      round of the newest checkpoint written or resumed
``state_syncs_total{result}``              counter    state syncs at start (``ok``, ``failed``)
``state_sync_bytes_total``                 counter    chunk bytes fetched by state syncs
``peer_suspicion{peer}``                   gauge      suspicion score of a peer (the `MAX_SUSPICION_PEERS`
                                                      highest; docs/protocols.md, "Byzantine peers")
``attacker``                               gauge      1 when this node itself runs an attack (tests only)
``dht_up``                                 gauge      1 while the DHT process and its p2pd run, 0 while
                                                      they are down or restarting (daemon only)
``dht_events_total{event}``                counter    events of the DHT supervisor: ``dht_died``,
                                                      ``p2pd_died``, ``restarted``, ``restart_failed``
=========================================  =========  ==================================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pnode import __version__
from p2pnode.errors import P2PNodeError

if TYPE_CHECKING:
    from p2pnode.daemon.node import Node
    from p2pnode.protocols import RoundReport

logger = logging.getLogger(__name__)

PREFIX = "p2pnode_"
#: Peers exported by ``peer_suspicion`` (the highest scores): caps the metric's label cardinality.
MAX_SUSPICION_PEERS = 20
#: Buckets of the round duration histogram, in seconds.
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _NodeCollector(Collector):
    """Reads the node's status and counters at scrape time (see the module doc)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> list[Metric]:
        return []  # described by collect(); values are produced only at scrape time

    def collect(self) -> Iterator[Metric]:
        node = self.node
        st = node.status()
        ts = node.transport.stats
        info = GaugeMetricFamily(PREFIX + "info", "Identity of this node (always 1)",
                                 labels=["peer_id", "run_id", "task", "topology", "rule", "version", "state"])
        info.add_metric([st.peer_id, st.run_id, st.task, node.config.topology, node.config.rule, __version__,
                         st.state], 1.0)
        yield info
        yield GaugeMetricFamily(PREFIX + "round", "Rounds completed (resumed rounds included)", value=st.round)
        yield GaugeMetricFamily(PREFIX + "peers", "Peers known at the start of the last round", value=st.peers)
        if st.loss is not None:
            yield GaugeMetricFamily(PREFIX + "train_loss", "Mean training loss of the last round", value=st.loss)
        r = node.last_report
        if r is not None and r.test_loss is not None:
            yield GaugeMetricFamily(PREFIX + "test_loss", "Test loss after the last evaluated round",
                                    value=r.test_loss)
        if st.accuracy is not None:
            yield GaugeMetricFamily(PREFIX + "accuracy", "Test accuracy after the last evaluated round, in [0, 1]",
                                    value=st.accuracy)
        if st.metric_value is not None:
            metric = GaugeMetricFamily(PREFIX + "eval_metric", "The task's evaluation metric after the last "
                                       "evaluated round (its name in the metric label)", labels=["metric"])
            metric.add_metric([st.metric], st.metric_value)
            yield metric
        if r is not None:
            yield GaugeMetricFamily(PREFIX + "merge_combined", "Models merged in the last round, own included",
                                    value=r.combined)
            yield GaugeMetricFamily(PREFIX + "merge_fraction",
                                    "Share of the model the last round's merge really combined, in [0, 1] (0: no merge "
                                    "applied)", value=r.fraction)
        yield CounterMetricFamily(PREFIX + "bytes_sent", "Bytes sent to peers (whole messages)", value=st.bytes_sent)
        yield CounterMetricFamily(PREFIX + "bytes_received", "Bytes received from peers (whole messages)",
                                  value=st.bytes_received)
        yield GaugeMetricFamily(PREFIX + "round_bytes_sent", "Bytes sent to peers during the last round",
                                value=st.round_bytes_sent)
        yield GaugeMetricFamily(PREFIX + "round_bytes_received", "Bytes received from peers during the last round",
                                value=st.round_bytes_received)
        tensor = CounterMetricFamily(PREFIX + "tensor_bytes",
                                     "Tensor bytes to and from peers: on the wire, and uncompressed",
                                     labels=["direction", "size"])
        for direction in ("sent", "received"):
            for size in ("wire", "raw"):
                tensor.add_metric([direction, size], st.tensor_bytes.get(f"tensor_{size}_bytes_{direction}", 0))
        yield tensor
        yield CounterMetricFamily(PREFIX + "calls", "Requests made to peers", value=ts.calls)
        yield CounterMetricFamily(PREFIX + "failed_calls", "Requests to peers that failed", value=ts.failed_calls)
        rejected = CounterMetricFamily(PREFIX + "rejected_messages", "Messages refused, by reason",
                                       labels=["reason"])
        for reason, count in sorted(st.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        snapshot = node.protocol.snapshot()
        events = CounterMetricFamily(PREFIX + "protocol_events", "Events counted by the round protocol, by event",
                                     labels=["event"])
        for event, count in sorted(snapshot.counters.items()):
            events.add_metric([event], count)
        yield events
        suspicion = GaugeMetricFamily(PREFIX + "peer_suspicion",
                                      f"Suspicion score of a peer (distance from the robust aggregate, normalised and "
                                      f"decayed; the {MAX_SUSPICION_PEERS} highest)", labels=["peer"])
        scores = snapshot.suspicion
        for peer, score in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SUSPICION_PEERS]:
            suspicion.add_metric([peer], score)
        yield suspicion
        yield GaugeMetricFamily(PREFIX + "attacker", "1 when this node runs an attack (testing only), else 0",
                                value=1.0 if node.config.attack is not None else 0.0)
        if st.dht_state is not None:  # a daemon: its DHT process is supervised
            yield GaugeMetricFamily(PREFIX + "dht_up", "1 while the DHT process and its p2pd run, else 0",
                                    value=1.0 if st.dht_state == "ok" else 0.0)
            dht_events = CounterMetricFamily(PREFIX + "dht_events", "Events of the DHT supervisor, by event",
                                             labels=["event"])
            for event, count in sorted(st.dht_events.items()):
                dht_events.add_metric([event], count)
            yield dht_events
        yield CounterMetricFamily(PREFIX + "directory_mismatched", "Directory records of another config skipped",
                                  value=node.directory.mismatched)
        yield CounterMetricFamily(PREFIX + "directory_invalid", "Directory records failing the schema skipped",
                                  value=node.directory.invalid)
        directory_rejected = CounterMetricFamily(PREFIX + "directory_rejected",
                                                 "Directory records and reads refused, by reason", labels=["reason"])
        for reason, count in sorted(node.directory.rejected.items()):
            directory_rejected.add_metric([reason], count)
        yield directory_rejected


class NodeMetrics:
    """The metrics of one node (see the module doc). `Node` creates one and updates it each round."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter(PREFIX + "rounds", "Rounds run by this process", registry=r)
        self.partial_rounds = Counter(PREFIX + "partial_rounds", "Rounds that combined less than asked, by reason",
                                      ["reason"], registry=r)
        self.round_duration = Histogram(PREFIX + "round_duration_seconds", "Wall time of one round, in seconds",
                                        buckets=ROUND_BUCKETS, registry=r)
        self.checkpoints = Counter(PREFIX + "checkpoints_written", "Checkpoints written", registry=r)
        self.checkpoint_failures = Counter(PREFIX + "checkpoint_failures", "Checkpoints that could not be written",
                                           registry=r)
        self.last_checkpoint_round = Gauge(PREFIX + "last_checkpoint_round",
                                           "Round of the newest checkpoint written or resumed", registry=r)
        self.syncs = Counter(PREFIX + "state_syncs", "State syncs at start, by result", ["result"], registry=r)
        self.sync_bytes = Counter(PREFIX + "state_sync_bytes", "Chunk bytes fetched by state syncs", registry=r)
        r.register(_NodeCollector(node))
        self._partial_by_reason: dict[str, int] = {}

    def observe_round(self, report: RoundReport, duration_s: float, partial: str | None) -> None:
        """Count one completed round; `partial` is the reason it was partial (`p2pnode.daemon.quorum.partial_reason`),
        or None."""
        self.rounds.inc()
        self.round_duration.observe(duration_s)
        if partial is not None:
            self.partial_rounds.labels(reason=partial).inc()
            self._partial_by_reason[partial] = self._partial_by_reason.get(partial, 0) + 1

    @property
    def partial_by_reason(self) -> dict[str, int]:
        """Partial rounds run by this process, by reason (the ``partial_rounds_total{reason}`` counter's values):
        `Node.partial_rounds` and `NodeStatus.partial_by_reason` are read from here."""
        return dict(self._partial_by_reason)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format, as a scrape would return them."""
        return generate_latest(self.registry)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
        """Serve ``/metrics`` over HTTP on a background thread; return the running server.

        :param port: TCP port; 0 picks a free one (see `MetricsServer.port`).
        :raises P2PNodeError: the address cannot be bound (port in use, not an address of this machine).
        """
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise P2PNodeError(f"the metrics endpoint could not listen on {host}:{port}: {e.strerror or e}; "
                               "pick another --metrics-port (0: any free port)") from e
        out = MetricsServer(host=host, port=int(server.server_port), _server=server, _thread=thread)
        logger.info("metrics endpoint on http://%s/metrics", out.address,
                    extra={"event": {"event": "metrics", "address": out.address}})
        return out


@dataclass
class MetricsServer:
    """A running metrics endpoint; `close` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def parse_exposition(text: str) -> dict[str, float]:
    """``{"name{label="v"}": value}`` of a text exposition (for tests and ``p2pnode doctor``)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


__all__ = ["MetricsServer", "NodeMetrics", "parse_exposition"]
