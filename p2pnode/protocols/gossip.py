"""Push-pull gossip learning.

Each round a node trains `local_steps` minibatch steps, picks a random live peer, sends it its freshly
trained model and receives the peer's model in the response (push-pull), then merges its own model with
every model it received since its last merge (the pulled one and those pushed to it by other peers) by
the configured aggregation rule. A peer that is slow, gone, or answers with garbage costs one timeout and a counter,
never the node: the round goes on with what arrived, and the node keeps its last good model.

A node with no peers trains alone and keeps looking for peers every round.

Robust window. A single pairwise average cannot be made robust: with a robust rule (one that
tolerates ``f >= 1``) a node keeps the newest model of each sender over its last ``robust_window``
merges and applies the rule to its own model and all of them, so the rule sees enough inputs for an
honest majority. While they are fewer than the rule needs to tolerate its ``f`` (default 1; flag and
median: 3 inputs, krum: 5) the node keeps its own model rather than merge: a robust rule run on its own
model and one peer's would tolerate nobody. Rules that work on updates (flag, krum, multikrum, geomed,
centered_clip) get ``model - start``, where ``start`` is the node's model at the start of the round.
Each merge also scores the senders of the models that arrived since the last merge
(`p2pnode.protocols.suspicion`); with ``exclude_suspects`` a node neither picks a suspect as partner
nor merges what a suspect sends.
Trade-off (docs/protocols.md): a longer window gives the rule more inputs (robustness) but merges
older models (staleness) and holds up to ``max_inbox`` models in memory.

DiLoCo (docs/protocols.md, "DiLoCo on each topology"). With ``outer_lr`` set, a round is one outer step
of DiLoCo: it starts from ``theta0`` (the model at round start), runs the ``local_steps`` inner steps
(the task's optimizer), and the merge by the rule gives ``merged``; the pseudo-gradient is then
``delta = theta0 - merged`` and the node moves to ``theta0 - outer_lr * nesterov(delta)``
(`p2pnode.aggregation.OuterOptimizer`, momentum buffers local to the node). ``theta0 - merged`` is the
rule applied to the pseudo-gradients ``delta_j = theta0 - theta_j`` of the own trained model and the
received ones: direction rules (flag, krum, ...) get the updates ``theta_j - theta0`` already, and for the
translation-equivariant rules (mean, median, trimmed mean, vca) ``rule(theta0 - theta_j) = theta0 -
rule(theta_j)``. A round that merges nothing (no peer, too few inputs for a robust rule) still steps on
the own pseudo-gradient. With ``outer_lr = 1`` and ``outer_momentum = 0`` the result is the plain merge,
bit for bit. The buffers are not checkpointed: a resumed node starts them afresh. Peers receive the
trained model ``theta_j`` itself (never the pseudo-gradient, which depends on the receiver's ``theta0``).

Compression (docs/compression.md): the exchanged models travel in the protocol's `compression` (default:
the transport's, ``none`` unless set), encoded once per published model. Gossip sends whole models, so
a sparse format (topk) is refused, and no error feedback is kept (a model is not accumulated).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pnode.aggregation import (
    byzantine_target,
    load_outer_state,
    max_byzantine,
    merge_states,
    outer_optimizer,
    warmup_outer_step,
)
from p2pnode.discovery import PeerDirectory
from p2pnode.errors import AggregationError, BadMessage, PeerUnreachable, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.adversary import Attacker
from p2pnode.protocols.backoff import DEFAULT_MAX_S, SilentBackoff
from p2pnode.protocols.base import (
    PeerHealth,
    ProtocolHooks,
    ProtocolSnapshot,
    RoundExtra,
    RoundReport,
    State,
    merged_fraction,
)
from p2pnode.protocols.compute import Compute
from p2pnode.protocols.suspicion import DEFAULT_DECAY, DEFAULT_THRESHOLD, SuspicionTracker
from p2pnode.training.round_schedule import RoundSchedule
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Message, Transport
from p2pnode.transport.codec import check_tensors
from p2pnode.transport.compression import CompressedTensor, Compression, check_combination, compress_state

logger = logging.getLogger(__name__)

EXCHANGE = "gossip.exchange"
#: Default robust window (merges) for rules that tolerate Byzantine inputs; 1 for the others.
ROBUST_WINDOW = 4



def is_robust(rule: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether `rule` tolerates at least one Byzantine input among a handful (mean and vca do not)."""
    return max_byzantine(rule, 9, **{k: v for k, v in (params or {}).items() if k == "trim"}) >= 1


def default_window(rule: str, params: Mapping[str, Any] | None = None) -> int:
    """`ROBUST_WINDOW` for a robust rule, else 1 (merge what arrived since the last merge)."""
    return ROBUST_WINDOW if is_robust(rule, params) else 1


@dataclass
class _Entry:
    epoch: int  # the node's merge count when the model arrived
    state: State


@dataclass
class GossipSettings:
    """Settings of the gossip protocol.

    :param run_id: the run; requests from other runs are refused (``wrong_run``).
    :param config_hash: hash of the run-wide config; requests with another hash are refused.
    :param local_steps: minibatch steps per round.
    :param sync_warmup_steps: local steps of the run trained in warm-up rounds of `sync_warmup_local_steps`
        each (default 0: none; `RoundSchedule`).
    :param sync_warmup_local_steps: local steps of a warm-up round (default None: no warm-up).
    :param sync_warmup_outer: what the outer step does in warm-up rounds (`p2pnode.aggregation.WARMUP_OUTER`;
        default ``plain``: the plain merge in warm-up rounds, the outer step after them).
    :param rule: aggregation rule for the merge (default ``mean``).
    :param rule_params: extra parameters of the rule.
    :param exchange_timeout_s: time allowed for one exchange, in seconds (default 30).
    :param eval_every: evaluate on the test split every this many rounds (0: never; default 1).
    :param max_inbox: most pushed models kept between two merges, newest per sender (default 16).
    :param step_cost_s: modelled seconds per training step on the simulator's virtual clock (default 0).
    :param robust_window: merges over which received models are kept and merged again (None, the default:
        `ROBUST_WINDOW` = 4 for a robust rule, 1 otherwise; 1 merges only what arrived since the last merge).
    :param suspicion_decay: weight of the old suspicion score in each update, in [0, 1) (default 0.8).
    :param exclude_suspects: neither pick nor merge peers whose suspicion exceeds `suspect_threshold`.
    :param suspect_threshold: suspicion score above which a peer is a suspect (default 1.0).
    :param silent_backoff: leave peers whose exchanges time out out of partner choice for
        ``exchange_timeout_s * 2 ** (k - 1)`` seconds after ``k`` consecutive timeouts, at most
        `silent_max_s` (default True; `p2pnode.protocols.backoff`).
    :param silent_max_s: longest such skip, in seconds (default 600).
    :param outer_lr: DiLoCo outer optimizer's learning rate, or None (default) for none (the plain merge).
    :param outer_momentum: its momentum, in [0, 1) (default 0.9).
    :param outer_nesterov: Nesterov momentum (default True).
    """

    run_id: str
    config_hash: str
    local_steps: int
    sync_warmup_steps: int = 0
    sync_warmup_local_steps: int | None = None
    sync_warmup_outer: str = "plain"
    rule: str = "mean"
    rule_params: dict[str, Any] = field(default_factory=dict)
    exchange_timeout_s: float = 30.0
    eval_every: int = 1
    max_inbox: int = 16
    step_cost_s: float = 0.0
    robust_window: int | None = None
    suspicion_decay: float = DEFAULT_DECAY
    exclude_suspects: bool = False
    suspect_threshold: float = DEFAULT_THRESHOLD
    silent_backoff: bool = True
    silent_max_s: float = DEFAULT_MAX_S
    outer_lr: float | None = None
    outer_momentum: float = 0.9
    outer_nesterov: bool = True

    @property
    def window(self) -> int:
        """The robust window in effect (see `robust_window`)."""
        return self.robust_window if self.robust_window is not None else default_window(self.rule, self.rule_params)

    @property
    def schedule(self) -> RoundSchedule:
        """Local steps of each round: the warm-up's, then `local_steps` (`RoundSchedule`)."""
        return RoundSchedule(self.local_steps, self.sync_warmup_steps, self.sync_warmup_local_steps)


class GossipProtocol:
    """One node's gossip rounds over a `Transport` and a `PeerDirectory` (a `RoundProtocol`).

    `attacker` (default None: honest) goes into `hooks` (`ProtocolHooks.attacker`).
    """

    #: Gossip announces no leave: peers find out from the directory and from failed exchanges.
    leave_on_close = False
    #: No secagg identity: gossip has no secure aggregation.
    secagg_public_key = b""

    def __init__(self, settings: GossipSettings, *, transport: Transport, directory: PeerDirectory,
                 trainer: Trainer, compute: Compute, rng: random.Random, attacker: Attacker | None = None,
                 compression: Compression | str | None = None) -> None:
        """See the class; `compression` is the wire format of the exchanged models (None: the transport's
        `Transport.compression`). Raises `ConfigError` for a sparse format (topk)."""
        if settings.window < 1:
            raise ValueError(f"robust_window must be >= 1, got {settings.window}")
        # Whole models: a sparse format (topk) is refused (ConfigError, a ValueError).
        self.compression = check_combination(compression if compression is not None else transport.compression,
                                             payload="models")
        self.settings = settings
        self._schedule = settings.schedule  # raises ValueError for counts out of range
        self.transport = transport
        self.directory = directory
        self.trainer = trainer
        self.compute = compute
        self.rng = rng
        self.round = 0
        self.health = PeerHealth()
        #: Peers whose exchanges time out, skipped for longer and longer (None: off).
        self.backoff: SilentBackoff | None = (
            SilentBackoff(settings.exchange_timeout_s, max(settings.silent_max_s, settings.exchange_timeout_s))
            if settings.silent_backoff else None)
        self._spec = trainer.spec
        # What peers receive from us: a complete snapshot (never a half-trained model): the model as
        # of our last merge, replaced by the freshly trained one as soon as a round's training ends.
        self._published: dict[str, torch.Tensor] = trainer.state()
        # The published model as it goes on the wire, encoded once per published model.
        self._wire: tuple[dict[str, torch.Tensor], dict[str, CompressedTensor]] | None = None
        # Newest model of each sender with the merge count at its arrival, oldest first.
        self._window: dict[str, _Entry] = {}
        self._epoch = 0
        self._robust = is_robust(settings.rule, settings.rule_params) or settings.window > 1
        # A merge must keep the rule's guarantee: f = the rule's `f`, or 1 for a robust rule (0 for mean, vca).
        self._target_f = byzantine_target(settings.rule, settings.rule_params)
        #: The attacker (None for an honest node) and ``on_trained`` (the simulator's omniscient attackers).
        self.hooks = ProtocolHooks(attacker=attacker)
        self.keep_pre_merge = False
        self._pre_merge: State | None = None
        self._pre_outer: State | None = None
        self.suspicion = SuspicionTracker(settings.suspicion_decay)
        #: Senders whose models the last merge ignored as suspects, and models it combined (own included).
        self.last_ignored: list[str] = []
        self.last_combined = 1
        #: DiLoCo's outer optimizer (None without ``outer_lr``): its momentum is this node's own.
        self.outer = outer_optimizer(settings.outer_lr, settings.outer_momentum, settings.outer_nesterov)
        transport.register(EXCHANGE, peer_pb2.ModelExchange, self._on_exchange)

    # -- serving ------------------------------------------------------------------------------
    def _check(self, sender: str, msg: Message[peer_pb2.ModelExchange]) -> None:
        body = msg.body
        if body.run_id != self.settings.run_id or body.config_hash != self.settings.config_hash:
            raise BadMessage(f"{sender} is in run {body.run_id!r} with config {body.config_hash!r}; this node is "
                             f"in run {self.settings.run_id!r} with config {self.settings.config_hash!r}",
                             code="wrong_run")
        check_tensors(msg.tensors, self._spec)

    def _request(self) -> Message[peer_pb2.ModelExchange]:
        body = peer_pb2.ModelExchange(run_id=self.settings.run_id, config_hash=self.settings.config_hash,
                                      round=self.round, weight=1.0)
        if not self.compression.lossy:
            return Message(body, self._published)
        if self._wire is None or self._wire[0] is not self._published:
            self._wire = (self._published, compress_state(self._published, self.compression))
        return Message(body, compressed=self._wire[1])

    async def _on_exchange(self, sender: str, msg: Message[Any]) -> Message[Any]:
        self._check(sender, msg)  # raises BadMessage: counted and refused by the transport
        self._keep(sender, msg.tensors)
        self.health.heard_from(sender, self.round)
        return self._request()

    def _keep(self, sender: str, state: State) -> None:
        """Put `sender`'s newest model in the window (one entry per sender; the oldest sender goes first)."""
        self._window.pop(sender, None)
        while len(self._window) >= self.settings.max_inbox:
            self._window.pop(next(iter(self._window)))
        self._window[sender] = _Entry(self._epoch, state)

    def _take_window(self) -> tuple[dict[str, State], set[str]]:
        """The models to merge now (sender -> model) and the senders whose model is new since the last merge;
        advances the merge count and drops entries that fall out of the window."""
        first = self._epoch - self.settings.window + 1
        inputs = {p: e.state for p, e in self._window.items() if e.epoch >= first}
        fresh = {p for p, e in self._window.items() if e.epoch >= self._epoch}
        self._epoch += 1
        keep_from = self._epoch - self.settings.window + 1
        self._window = {p: e for p, e in self._window.items() if e.epoch >= keep_from}
        return inputs, fresh

    # -- one round ----------------------------------------------------------------------------
    async def _candidates(self) -> list[str]:
        try:
            listed = [p.peer_id for p in await self.directory.peers()]
        except Exception as e:  # a slow or broken directory must not stop training
            logger.warning("peer directory unavailable this round: %s", e)
            listed = []
        me = self.transport.peer_id
        found = set(listed) | {p for p in self.health.recently_heard(self.round) if p != me}
        if self.settings.exclude_suspects:
            found -= self.suspicion.suspects(self.settings.suspect_threshold)
        return sorted(found)

    def _choose(self, candidates: list[str]) -> str | None:
        """A random usable candidate, silent peers in back-off left out."""
        if self.backoff is not None:
            candidates = self.backoff.filter(candidates)
        return self.health.choose(candidates, self.round, self.rng)

    async def _exchange(self, peer: str) -> dict[str, torch.Tensor] | None:
        """Push our model to `peer` and pull its model; None (and a back-off) when that fails."""
        try:
            resp = await self.transport.call(peer, EXCHANGE, self._request(), peer_pb2.ModelExchange,
                                             timeout=self.settings.exchange_timeout_s)
        except TransportError as e:  # timeouts, refusals, malformed responses (already counted)
            logger.info("exchange with %s failed: %s", peer[-8:], e)
            self.health.failed(peer, self.round)
            if self.backoff is not None and isinstance(e, PeerUnreachable):
                skip = self.backoff.timed_out(peer)
                logger.info("%s is silent: not picked for %.0f s", peer[-8:], skip)
            return None
        if self.backoff is not None:
            self.backoff.succeeded(peer)
        try:
            self._check(peer, resp)
        except BadMessage as e:
            self.transport.reject(peer, e.code, str(e))
            self.health.failed(peer, self.round)
            return None
        self.health.succeeded(peer, self.round)
        return resp.tensors

    def _merge(self, start: State, received: Mapping[str, State], fresh: set[str]) -> None:
        """Merge the own model with `received` (sender -> model) by the rule; score the `fresh` senders."""
        self.last_ignored = []
        self.last_combined = 1
        self._pre_merge = self._pre_outer = None
        if not received:
            if self.outer is not None:  # DiLoCo: the own pseudo-gradient alone
                self.trainer.load_state(self._outer_step(start, self.trainer.state()))
            return
        s = self.settings
        if s.exclude_suspects:
            suspects = self.suspicion.suspects(s.suspect_threshold)
            self.last_ignored = sorted(p for p in received if p in suspects)
        senders = [p for p in received if p not in self.last_ignored]
        own = self.trainer.state()
        merged = own
        if senders:
            params = dict(s.rule_params)
            if s.rule == "vca":
                params.setdefault("self_index", 0)
            states = [own, *(received[p] for p in senders)]
            try:
                # Direction-based rules get every model relative to this round's start; too few inputs for
                # the rule's guarantee refuse the merge, though the rule itself would run with f = 0.
                merged = merge_states(s.rule, states, start, params, require_f=self._target_f)
            except AggregationError as e:
                # Too few inputs for the rule (e.g. multikrum needs 3) or for its guarantee: keep the own
                # model rather than merge models that no rule vetted; the window fills up within a few rounds.
                logger.debug("merge skipped: %s", e)
                senders = []
                merged = own
            else:
                if self.keep_pre_merge:
                    self._pre_merge = own  # a copy (Trainer.state), not changed by the load
                    # The momentum before this round's outer step (a copy), for an undone merge.
                    self._pre_outer = self.outer.state_dict() if self.outer is not None else None
                if self.outer is None:
                    self.trainer.load_state(merged)
        if self.outer is not None:
            # DiLoCo: pseudo-gradient theta0 - merged (the rule over theta0 - theta_j), then the outer step.
            self.trainer.load_state(self._outer_step(start, merged))
        self.last_combined = 1 + len(senders)
        # Suspicion: the fresh models (suspects' included, so that a reformed peer can recover).
        scored = {p: received[p] for p in received if p in fresh}
        if scored:
            others = [own] + [received[p] for p in senders if p not in fresh]
            self.suspicion.observe_states(scored, merged, others=others, reference=start)

    def _outer_step(self, start: State, merged: State) -> State:
        """DiLoCo's step of this round (`self.round`, not yet advanced) from `start` towards `merged`, as the
        warm-up policy has it (`sync_warmup_outer`)."""
        assert self.outer is not None
        w = self._schedule.warmup_rounds
        return warmup_outer_step(self.outer, start, merged, policy=self.settings.sync_warmup_outer,
                                 warmup_round=self.round < w, first_after=w > 0 and self.round == w)

    async def run_round(self) -> RoundReport:
        """Train, exchange with one random live peer, merge, evaluate; return the round's report."""
        s = self.settings
        attacker = self.hooks.attacker
        attacking = attacker is not None and attacker.model_attack

        # This round's local steps: the warm-up's short rounds first (a function of the round number, which
        # a checkpoint or a state sync restores), then local_steps.
        steps = self._schedule.steps(self.round)

        def train() -> tuple[float, State]:
            # The start model: reference of the updates (direction rules, forging, the suspicion's direction term).
            start = self.trainer.state()
            return self.trainer.train(steps), start

        train_loss, start = await self.compute.run(train, cost_s=s.step_cost_s * steps)
        trained = self.trainer.state()
        if not attacking:
            # Peers get the model as just trained (gossip learning sends the updated model). Serving the model
            # of the last merge instead would withhold a round of training from every exchange: with `vca` it
            # pins each layer's variance at its initial value (the target is the received models' variance),
            # and with a robust rule every input but the own one lags a round behind, so the vote keeps the
            # old model.
            self._published = trained
        if self.hooks.on_trained is not None:
            self.hooks.on_trained(self.round, start, trained)
        if attacking:
            assert attacker is not None
            seen = [e.state for e in self._window.values()]
            self._published = await attacker.forge(self.round, start, trained, seen)
            logger.debug("%s: round %d sends a forged model (%s)", self.transport.peer_id[-8:], self.round,
                         attacker.attack)
        candidates = await self._candidates()
        partner = self._choose(candidates)
        failures = 0
        pulled = await self._exchange(partner) if partner is not None else None
        if partner is not None and pulled is None:
            failures += 1
        if partner is not None and pulled is not None:
            self._keep(partner, pulled)
        received, fresh = self._take_window()
        await self.compute.run(lambda: self._merge(start, received, fresh))
        if not attacking:  # an attacker keeps sending its forged model
            self._published = self.trainer.state()
        self.round += 1
        test_loss: float | None = None
        accuracy: float | None = None
        if s.eval_every and self.round % s.eval_every == 0:
            test_loss, accuracy = await self.compute.run(self.trainer.evaluate)
        combined = self.last_combined
        extra = RoundExtra(ignored=list(self.last_ignored)) if self.last_ignored else RoundExtra()
        return RoundReport(round=self.round, train_loss=float(train_loss), test_loss=test_loss,
                           accuracy=accuracy, peers=len(candidates), combined=combined,
                           fraction=merged_fraction(combined > 1), partner=partner if pulled is not None else None,
                           failures=failures, extra=extra, pre_merge=self._pre_merge,
                           pre_outer=self._pre_outer)

    # -- the rest of RoundProtocol ------------------------------------------------------------
    def snapshot(self) -> ProtocolSnapshot:
        """No event counters yet; the suspicion scores of the senders this node merged."""
        return ProtocolSnapshot(counters={}, suspicion=self.suspicion.scores())

    def outer_state(self) -> State:
        """`LocalOuterState`: a copy of this node's outer optimizer state (empty without DiLoCo)."""
        return self.outer.state_dict() if self.outer is not None else {}

    def load_outer_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """`LocalOuterState`: load a saved outer optimizer state (empty: no momentum yet)."""
        load_outer_state(self.outer, state)

    def state_loaded(self) -> None:
        """Serve the model now in the trainer: what peers pull must be the model this node keeps (after a
        resume, a sync or an undone merge), not the one it had before."""
        self._published = self.trainer.state()

    async def rejoin(self) -> None:
        """Nothing to forget or announce: the next round picks a live peer from the directory."""

    async def close(self) -> None:
        self._window.clear()
