"""Push-pull gossip learning.

Each round a node trains `local_steps` minibatch steps, picks a random live peer, sends it its freshly
trained model and receives the peer's model in the response (push-pull), then merges its own model with
every model it received since its last merge (the pulled one and those pushed to it by other peers) by
the configured aggregation rule. A peer that is slow, gone, or answers with garbage costs one timeout and a counter,
never the node: the round goes on with what arrived, and the node keeps its last good model.

A node with no peers trains alone and keeps looking for peers every round.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pnode.aggregation import aggregate_states
from p2pnode.discovery import PeerDirectory
from p2pnode.errors import BadMessage, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.base import PeerHealth, RoundReport
from p2pnode.protocols.compute import Compute
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Message, Transport
from p2pnode.transport.codec import check_tensors

logger = logging.getLogger(__name__)

EXCHANGE = "gossip.exchange"


@dataclass
class GossipSettings:
    """Settings of the gossip protocol.

    :param run_id: the run; requests from other runs are refused (``wrong_run``).
    :param config_hash: hash of the run-wide config; requests with another hash are refused.
    :param local_steps: minibatch steps per round.
    :param rule: aggregation rule for the merge (default ``mean``).
    :param rule_params: extra parameters of the rule.
    :param exchange_timeout_s: time allowed for one exchange, in seconds (default 30).
    :param eval_every: evaluate on the test split every this many rounds (0: never; default 1).
    :param max_inbox: most pushed models kept between two merges, newest per sender (default 16).
    :param step_cost_s: modelled seconds per training step on the simulator's virtual clock (default 0).
    """

    run_id: str
    config_hash: str
    local_steps: int
    rule: str = "mean"
    rule_params: dict[str, Any] = field(default_factory=dict)
    exchange_timeout_s: float = 30.0
    eval_every: int = 1
    max_inbox: int = 16
    step_cost_s: float = 0.0


class GossipProtocol:
    """One node's gossip rounds over a `Transport` and a `PeerDirectory`."""

    def __init__(self, settings: GossipSettings, *, transport: Transport, directory: PeerDirectory,
                 trainer: Trainer, compute: Compute, rng: random.Random) -> None:
        self.settings = settings
        self.transport = transport
        self.directory = directory
        self.trainer = trainer
        self.compute = compute
        self.rng = rng
        self.round = 0
        self.health = PeerHealth()
        self._spec = trainer.spec
        # What peers receive from us: a complete snapshot (never a half-trained model): the model as
        # of our last merge, replaced by the freshly trained one as soon as a round's training ends.
        self._published: dict[str, torch.Tensor] = trainer.state()
        self._inbox: dict[str, dict[str, torch.Tensor]] = {}
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
        return Message(body, self._published)

    async def _on_exchange(self, sender: str, msg: Message[Any]) -> Message[Any]:
        self._check(sender, msg)  # raises BadMessage: counted and refused by the transport
        if sender not in self._inbox and len(self._inbox) >= self.settings.max_inbox:
            self._inbox.pop(next(iter(self._inbox)))  # drop the oldest sender
        self._inbox.pop(sender, None)
        self._inbox[sender] = msg.tensors
        self.health.heard_from(sender, self.round)
        return self._request()

    # -- one round ----------------------------------------------------------------------------
    async def _candidates(self) -> list[str]:
        try:
            listed = [p.peer_id for p in await self.directory.peers()]
        except Exception as e:  # a slow or broken directory must not stop training
            logger.warning("peer directory unavailable this round: %s", e)
            listed = []
        me = self.transport.peer_id
        return sorted(set(listed) | {p for p in self.health.recently_heard(self.round) if p != me})

    async def _exchange(self, peer: str) -> dict[str, torch.Tensor] | None:
        """Push our model to `peer` and pull its model; None (and a back-off) when that fails."""
        try:
            resp = await self.transport.call(peer, EXCHANGE, self._request(), peer_pb2.ModelExchange,
                                             timeout=self.settings.exchange_timeout_s)
        except TransportError as e:  # timeouts, refusals, malformed responses (already counted)
            logger.info("exchange with %s failed: %s", peer[-8:], e)
            self.health.failed(peer, self.round)
            return None
        try:
            self._check(peer, resp)
        except BadMessage as e:
            self.transport.reject(peer, e.code, str(e))
            self.health.failed(peer, self.round)
            return None
        self.health.succeeded(peer, self.round)
        return resp.tensors

    def _merge(self, received: Sequence[Mapping[str, torch.Tensor]]) -> None:
        if not received:
            return
        own = self.trainer.state()
        params = dict(self.settings.rule_params)
        if self.settings.rule == "vca":
            params.setdefault("self_index", 0)
        merged = aggregate_states(self.settings.rule, [own, *received], **params)
        self.trainer.load_state(merged)

    async def run_round(self) -> RoundReport:
        """Train, exchange with one random live peer, merge, evaluate; return the round's report."""
        s = self.settings
        train_loss = await self.compute.run(lambda: self.trainer.train(s.local_steps),
                                            cost_s=s.step_cost_s * s.local_steps)
        # Peers get the model as just trained (gossip learning sends the updated model). Serving the
        # model of the last merge instead would withhold a round of training from every exchange, and
        # with `vca` it would pin each layer's variance at its initial value: the target is the
        # received models' variance, which would then never include what training added.
        self._published = self.trainer.state()
        candidates = await self._candidates()
        partner = self.health.choose(candidates, self.round, self.rng)
        failures = 0
        pulled = await self._exchange(partner) if partner is not None else None
        if partner is not None and pulled is None:
            failures += 1
        received = list(self._inbox.values())
        self._inbox.clear()
        if pulled is not None:
            received.append(pulled)
        await self.compute.run(lambda: self._merge(received))
        self._published = self.trainer.state()
        self.round += 1
        test_loss: float | None = None
        accuracy: float | None = None
        if s.eval_every and self.round % s.eval_every == 0:
            test_loss, accuracy = await self.compute.run(self.trainer.evaluate)
        return RoundReport(round=self.round, train_loss=float(train_loss), test_loss=test_loss,
                           accuracy=accuracy, peers=len(candidates), combined=1 + len(received),
                           fraction=1.0, partner=partner if pulled is not None else None, failures=failures)

    async def close(self) -> None:
        self._inbox.clear()
