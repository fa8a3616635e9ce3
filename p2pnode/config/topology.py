"""The settings of the topologies that have their own: modest and fl (`ModestSettings`), dpsgd
(`DpsgdSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode.config.choices import DPSGD_GRAPHS, SAMPLE_KEYS
from p2pnode.config.schema import setting


@dataclass
class ModestSettings:
    """Section ``modest``: samples, aggregation deadlines, pings and membership of modest and fl
    (algorithms.md 3.5; the authors' values in brackets where ours differ)."""

    #: ``s``: trainers per round (default 10).
    sample_size: int = setting(
        default=10, section="modest", help="modest/fl: trainers per round (s).", hashed=True,
        topologies=("modest", "fl"))
    #: ``a``: aggregators per round (default 1; fl always uses its one server).
    aggregators: int = setting(
        default=1, section="modest", help="modest: aggregators per round (a).", hashed=True, topologies=("modest",))
    #: ``sf``: an aggregator completes with ``floor(sf * s)`` trained models, in (0, 1] (default 1.0).
    success_fraction: float = setting(
        default=1.0, section="modest", help="modest/fl: an aggregator completes with floor(F * s) trained models.",
        hashed=True, topologies=("modest", "fl"))
    #: Seconds from an aggregation's first model to its deadline (default 60 [5 s code default, 2 s in the
    #: MW'23 simulations, 300 s in the latest code]).
    aggregation_timeout_s: float = setting(
        default=60.0, section="modest",
        help="modest/fl: seconds from an aggregation's first model to its deadline [60].",
        topologies=("modest", "fl"), flag_default=None)
    #: Models an aggregator needs at its deadline (default 3, the latest code's liveness rule); with fewer
    #: it sends the base model to more peers (top-up).
    liveness_min: int = setting(
        default=3, section="modest",
        help="modest/fl: models an aggregator needs at its deadline; with fewer it tops up.",
        topologies=("modest", "fl"))
    #: Top-ups before an aggregator combines what it has (default 2).
    max_topups: int = setting(
        default=2, section="modest", help="modest/fl: top-ups before an aggregator combines what it has.",
        topologies=("modest", "fl"))
    #: Seconds before a candidate that does not answer pings counts as unavailable (default 5).
    ping_timeout_s: float = setting(
        default=5.0, section="modest",
        help="modest/fl: seconds before a candidate that does not answer pings is unavailable.",
        topologies=("modest", "fl"))
    #: A ping is re-sent every this many seconds until `ping_timeout_s` (default 1).
    ping_interval_s: float = setting(
        default=1.0, section="modest", help="modest/fl: seconds between pings of a candidate.",
        topologies=("modest", "fl"))
    #: Rounds without activity after which a peer leaves the active set (default 50 [1000 in the sims]).
    inactivity_threshold: int = setting(
        default=50, section="modest", help="modest/fl: rounds without activity before a peer leaves the active set.",
        topologies=("modest", "fl"))
    #: Peers told about a join or leave (default None: ``min(10 * sample_size, view size)``).
    join_fanout: int | None = setting(
        default=None, section="modest", help="modest/fl: peers told about a join or leave [min(10 * s, view size)].",
        topologies=("modest", "fl"))
    #: ``model``: the order of round k is keyed by the digest of model k-2, against sample grinding
    #: (default); ``round``: by the round number only (the reference).
    sample_key: str = setting(
        default="model", section="modest",
        help="modest: key the sample order of round k by the digest of model k-2 (model, against sample grinding) or "
             "by the round number only (round, the reference).",
        hashed=True, topologies=("modest",), choices=SAMPLE_KEYS)
    #: Longest wait of a round for a model, in seconds; an idle node then refreshes its view (default 20).
    idle_timeout_s: float = setting(
        default=20.0, section="modest",
        help="modest/fl: longest wait of a round for a model, in seconds; an idle node then refreshes its view.",
        topologies=("modest", "fl"))
    #: fl: peer id of the server (default None: the lowest peer id of the initial view).
    fl_server: str | None = setting(
        default=None, section="modest", help="fl: peer id of the server [lowest peer id at start].", hashed=True,
        topologies=("fl",))


@dataclass
class DpsgdSettings:
    """Section ``dpsgd``: the communication graph of dpsgd."""

    #: Communication graph: ``exponential`` (one-peer exponential, default) or ``regular`` (random regular).
    dpsgd_graph: str = setting(
        default="exponential", section="dpsgd", help="dpsgd: one-peer exponential graph, or a random regular graph.",
        hashed=True, topologies=("dpsgd",), choices=DPSGD_GRAPHS)
    #: Degree of the ``regular`` graph (default 4).
    dpsgd_degree: int = setting(
        default=4, section="dpsgd", help="dpsgd: degree of the regular graph.", hashed=True, topologies=("dpsgd",))
