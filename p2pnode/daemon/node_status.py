"""What a node reports of itself: the `NodeStatus` snapshot (``p2pnode status``, the control API) and the
names and text under which a round's metric (accuracy, perplexity, ...) is logged and recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class NodeStatus:
    """A snapshot of a node, as `p2pnode status` shows it. Byte counts are whole messages.

    :param partial_rounds: rounds that combined less than asked (quorum not met, or part of the model).
    :param partial_by_reason: the same rounds by reason (``quorum``, ``fraction``; see `partial_reason`).
    :param last_checkpoint_round: round of the newest checkpoint written or resumed; None if none.
    :param resumed_from: where the model of the first round came from: ``fresh`` (the task's initial
        model), ``checkpoint`` or ``peers`` (state sync).
    :param accuracy: test accuracy after the last evaluated round; None before it and when the task's
        metric is not accuracy.
    :param metric: name of the task's metric (``accuracy``, ``perplexity``, ...), and `metric_value` its
        value after the last evaluated round (None before it).
    """

    peer_id: str
    run_id: str
    task: str
    round: int
    peers: int
    accuracy: float | None
    loss: float | None
    bytes_sent: int
    bytes_received: int
    rejected: dict[str, int]
    maddrs: list[str]
    state: str
    partial_rounds: int = 0
    last_checkpoint_round: int | None = None
    resumed_from: str = "fresh"
    #: State of the supervised DHT process (``ok``, ``down``, ``restarting``); None without supervision.
    dht_state: str | None = None
    #: Events of the DHT supervisor (``dht_died``, ``p2pd_died``, ``restarted``, ``restart_failed``).
    dht_events: dict[str, int] = field(default_factory=dict)
    #: Bytes sent and received during the last completed round (0 before the first one).
    round_bytes_sent: int = 0
    round_bytes_received: int = 0
    #: Tensor bytes since start: on the wire, and their uncompressed size (`TrafficStats.tensor_dict`).
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    partial_by_reason: dict[str, int] = field(default_factory=dict)
    metric: str = "accuracy"
    metric_value: float | None = None


def metric_fields(metric: str, value: float | None) -> dict[str, Any]:
    """The metric of a round under the names that logs and results use: ``metric``, ``metric_value``,
    and ``accuracy`` (the value for an accuracy metric, else None, so that readers of accuracy never
    mistake a perplexity for one)."""
    return {"accuracy": value if metric == "accuracy" else None, "metric": metric, "metric_value": value}


def metric_text(metric: str, value: float | None) -> str:
    """``acc=0.912`` / ``perplexity=14.09`` / ``acc=-`` for a log line."""
    label = "acc" if metric == "accuracy" else metric
    if value is None:
        return f"{label}=-"
    return f"{label}={value:.3f}" if metric == "accuracy" else f"{label}={value:.4g}"
