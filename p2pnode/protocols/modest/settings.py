"""`ModestSettings`: the settings of MoDeST and of `fl` (MoDeST with a fixed aggregator)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from p2pnode.protocols.suspicion import DEFAULT_DECAY, DEFAULT_THRESHOLD
from p2pnode.secagg import SecAggSettings
from p2pnode.secagg.groups import DEFAULT_MIN_GROUP
from p2pnode.training.round_schedule import RoundSchedule


@dataclass
class ModestSettings:
    """Settings of MoDeST (and of `fl`, which is MoDeST with a fixed aggregator).

    The authors' defaults are given in brackets where ours differ (``algorithms.md`` 3.5).

    :param run_id: the run; requests from other runs are refused (``wrong_run``).
    :param config_hash: hash of the run-wide config; requests with another hash are refused.
    :param local_steps: minibatch steps per training (the authors: one local epoch, batch 20).
    :param sync_warmup_steps: local steps of the run trained in warm-up rounds of `sync_warmup_local_steps`
        each (default 0: none; `RoundSchedule`).
    :param sync_warmup_local_steps: local steps of a warm-up round (default None: no warm-up).
    :param sync_warmup_outer: what the aggregator's outer step does for a version trained in a warm-up round
        (`p2pnode.aggregation.WARMUP_OUTER`; default ``plain``: the plain merge for warm-up versions, the
        outer step after them).
    :param sample_size: ``s``, trainers per round (default 10).
    :param aggregators: ``a``, aggregators per round (default 1).
    :param success_fraction: ``sf``; an aggregator completes with ``floor(sf * s)`` models (default 1.0).
    :param aggregation_timeout_s: seconds from an aggregation's first model to its deadline (default 60
        [5 s in the code's defaults, 2 s in the MW'23 simulations, 300 s in the latest code]).
    :param liveness_min: models needed at the deadline to aggregate (default 3); with fewer, top-up.
    :param max_topups: top-ups before an aggregator uses what it has (default 2; ours).
    :param ping_timeout_s: seconds before a silent candidate counts as unavailable (default 5).
    :param ping_interval_s: a ping is re-sent every this many seconds until the timeout (default 1).
    :param inactivity_threshold: rounds without activity before a peer leaves the active set (default 50).
    :param join_fanout: peers told about a join or leave (default None: ``min(10 * s, view size)``).
    :param sample_key: ``"model"`` (default: key round ``k``'s order by the digest of model ``k-2``, against
        grinding) or ``"round"`` (the reference: round number only).
    :param rule: aggregation rule (default ``mean``); rules that need updates get ``model - base``.
    :param rule_params: extra parameters of the rule.
    :param outer_lr: outer optimizer's learning rate, or None (default) for no outer optimizer.
    :param outer_momentum: outer optimizer's momentum (default 0.9).
    :param outer_nesterov: Nesterov momentum for the outer optimizer (default True).
    :param fixed_aggregator: a server's peer id (the ``fl`` baseline); None for MoDeST.
    :param fixed_aggregator_auto: with ``fixed_aggregator`` None, use the lowest peer id of the initial
        view as the server (``fl``; default False).
    :param idle_timeout_s: longest wait of `ModestProtocol.run_round` for a model (default 20).
    :param exchange_timeout_s: time allowed for one model transfer, in seconds (default 30).
    :param max_resends: resends of one update to the next aggregator after a failure (default 3).
    :param ack_timeout_s: longest wait for an aggregator's acknowledgement, in seconds (default 600). An
        aggregator that stops answering pings is given up on long before: this bounds one that answers
        pings but never completes (its deadlines, top-ups and the pings of its next sample take time).
    :param eval_every: aggregators evaluate every this many versions (0: never; default 1).
    :param step_cost_s: modelled seconds per training step on the simulator's virtual clock (default 0).
    :param leave_on_close: announce a graceful LEAVE when the protocol closes (default True).
    :param secagg: secure aggregation inside each sample (`p2pnode.secagg`), or None (default) for none.
        With it, trainers send their update ``model - base`` masked, the aggregator learns only the mean
        of the survivors (rules ``mean`` and ``vca`` only), and an aggregation below the threshold is
        aborted: the model goes on unchanged and ``secagg_aborted`` counts it (see docs/secagg.md).
    :param secagg_groups: with `secagg`, split each sample into this many secure instances (member ``i``
        of the sample in group ``i mod G``, `p2pnode.secagg.groups`) and combine the group means with
        `rule` (default 1: one instance per sample). A group below its threshold is left out (counter
        ``secagg_groups_left_out``); with fewer groups left than the rule needs the round aborts.
    :param secagg_min_group: with ``secagg_groups > 1``, fewest members of a group (default 5): a trainer
        whose group of a sample came out smaller does not train it (``secagg_small_group``), and an
        aggregator refuses a group claim naming fewer.
    :param suspicion_decay: weight of the old suspicion score in each update, in [0, 1) (default 0.8).
    :param exclude_suspects: as an aggregator, leave out the models of peers whose suspicion exceeds
        `suspect_threshold` (they stay in the samples, which must be the same on every node).
    :param suspect_threshold: suspicion score above which a peer is a suspect (default 1.0).
    :param compression: the run's wire format (`p2pnode.transport.compression`; default ``none``). Lossy:
        trainers upload their update ``model - base`` with error feedback (any format, topk included) and
        aggregators send each new version compressed (in `model_compression`), every holder keeping the
        version as decoded so that digests agree. Not with `secagg`.
    :param model_compression: the wire format of the versions aggregators send (and of top-ups and base
        pulls), `p2pnode.transport.compression.model_format`: ``auto`` (default: `compression`, int8 under
        topk), ``none``, ``fp16``, ``bf16`` or ``int8[:<block>]``.
    """

    run_id: str
    config_hash: str
    local_steps: int
    sync_warmup_steps: int = 0
    sync_warmup_local_steps: int | None = None
    sync_warmup_outer: str = "plain"
    sample_size: int = 10
    aggregators: int = 1
    success_fraction: float = 1.0
    aggregation_timeout_s: float = 60.0
    liveness_min: int = 3
    max_topups: int = 2
    ping_timeout_s: float = 5.0
    ping_interval_s: float = 1.0
    inactivity_threshold: int = 50
    join_fanout: int | None = None
    sample_key: str = "model"
    rule: str = "mean"
    rule_params: dict[str, Any] = field(default_factory=dict)
    outer_lr: float | None = None
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    fixed_aggregator: str | None = None
    fixed_aggregator_auto: bool = False
    idle_timeout_s: float = 20.0
    exchange_timeout_s: float = 30.0
    max_resends: int = 3
    ack_timeout_s: float = 600.0
    eval_every: int = 1
    step_cost_s: float = 0.0
    leave_on_close: bool = True
    secagg: SecAggSettings | None = None
    secagg_groups: int = 1
    secagg_min_group: int = DEFAULT_MIN_GROUP
    suspicion_decay: float = DEFAULT_DECAY
    exclude_suspects: bool = False
    suspect_threshold: float = DEFAULT_THRESHOLD
    compression: str = "none"
    model_compression: str = "auto"

    @property
    def threshold(self) -> int:
        """Models an aggregator waits for: ``max(1, floor(sf * s))``."""
        return max(1, math.floor(self.success_fraction * self.sample_size + 1e-9))

    @property
    def schedule(self) -> RoundSchedule:
        """Local steps of the training of each version: the warm-up's, then `local_steps` (`RoundSchedule`)."""
        return RoundSchedule(self.local_steps, self.sync_warmup_steps, self.sync_warmup_local_steps)


def fl_settings(settings: ModestSettings) -> ModestSettings:
    """`settings` as the ``fl`` baseline runs them: one aggregator, the server.

    The server is ``fixed_aggregator`` or, when that is None, the lowest peer id of the initial view
    (``fixed_aggregator_auto``).
    """
    return dataclasses.replace(settings, aggregators=1, fixed_aggregator_auto=settings.fixed_aggregator is None)
