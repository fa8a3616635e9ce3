"""D-PSGD (Lian et al. 2017) with Metropolis-Hastings weights, as a baseline.

Spec: ``algorithms.md`` section 1.3. Every round every node trains ``local_steps`` steps, pushes its
model to its out-neighbours, waits (at most ``exchange_timeout_s``) for the models of its in-neighbours
for the same round, and averages:

    x_i <- W_ii x_i + sum_j W_ij x_j,   W_ij = 1 / (1 + max(d_i, d_j)),   W_ii = 1 - sum_j W_ij

where the sum runs over the neighbours whose model arrived (a missing neighbour's weight stays with the
node, so the weights always sum to 1). Two communication graphs over the sorted peer ids, fixed at the
first round:

- ``exponential`` (default; the authors' D-PSGD baseline): the time-varying one-peer exponential graph.
  In round ``k``, node ``i`` sends to ``i + 2^j`` and receives from ``i - 2^j`` (mod ``n``), with
  ``j = k mod ceil(log2 n)``. Every node has one in- and one out-neighbour, so ``W_ij = W_ii = 1/2``.
- ``regular``: a random ``degree``-regular undirected graph drawn from the run's seed (the same on every
  node); neighbours exchange both ways, ``W_ij = 1 / (degree + 1)``.

Traffic per round: ``n`` model transfers on the exponential graph, ``n * degree`` on a regular one.
A neighbour that misses a round is skipped for 1, 2, 4, ... rounds (at most 16), neither sent to nor
waited for, so a crashed neighbour costs one timeout, not one per round.

DiLoCo (docs/protocols.md, "DiLoCo on each topology"): with ``outer_lr`` set, the average above is
``merged``; the node's round-start model ``theta0`` then takes the outer step on the pseudo-gradient
``theta0 - merged`` (the weighted mean of ``theta0 - x_j`` over itself and the neighbours, the weights
summing to 1): ``x_i <- theta0 - outer_lr * nesterov(theta0 - merged)``, momentum buffers local to the
node (not checkpointed). A round without neighbours' models steps on the own pseudo-gradient. With
``outer_lr = 1, outer_momentum = 0`` that is the plain average, bit for bit. Neighbours still receive the
trained model ``x_j`` (each forms the pseudo-gradient against its own ``theta0``).

The merge is `merge_states`, the step gossip and MoDeST use: a rule that works on updates (``flag``,
``krum``, ``geomed``, ...) combines ``x_j - theta0`` and its result is added to ``theta0``; a rule that
refuses its inputs (e.g. ``multikrum`` with fewer than 3) leaves the node with its own trained model
for the round (``combined = 1``), as in gossip.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pnode.aggregation import (
    OuterOptimizer,
    load_outer_state,
    merge_states,
    outer_optimizer,
    rule_info,
    warmup_outer_step,
)
from p2pnode.discovery import PeerDirectory
from p2pnode.errors import AggregationError, BadMessage, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.adversary import Attacker
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
from p2pnode.training.round_schedule import RoundSchedule
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Message, Transport
from p2pnode.transport.codec import check_tensors
from p2pnode.transport.compression import Compression, check_combination, compress_state

logger = logging.getLogger(__name__)

PUSH = "dpsgd.push"
GRAPHS = ("exponential", "regular")
#: Rounds ahead of its own that a node keeps pushed models for (a neighbour may be slightly faster).
_LOOKAHEAD = 2


def exponential_neighbours(n: int, i: int, round_: int) -> tuple[int, int]:
    """(out-neighbour, in-neighbour) of node `i` of `n` in round `round_` of the one-peer exponential graph."""
    if n < 2:
        return i, i
    hops = max(1, math.ceil(math.log2(n)))
    step = 2 ** (round_ % hops)
    return (i + step) % n, (i - step) % n


def random_regular_graph(n: int, degree: int, seed: int) -> list[list[int]]:
    """Neighbour lists of a random simple `degree`-regular graph on `n` nodes, a pure function of `seed`.

    Pairing (configuration) model with restarts. A pairing is simple with probability about
    ``exp(-(degree^2 - 1) / 4)``: 2 % for degree 4, but 1e-7 for degree 8 (the VCA paper's graph), so
    when 1000 pairings fail the graph is drawn by degree-preserving random edge swaps from a circulant
    one instead (`_swapped_regular_graph`). Raises `ValueError` when no such graph exists
    (``degree >= n`` or ``n * degree`` odd).
    """
    if degree < 0 or degree >= max(n, 1) or (n * degree) % 2:
        raise ValueError(f"no {degree}-regular graph on {n} nodes (need degree < n and n * degree even)")
    # Every node of a run draws the same graph: in the simulator that is n draws in one process.
    return [list(nb) for nb in _cached_regular_graph(n, degree, seed)]


@functools.lru_cache(maxsize=16)
def _cached_regular_graph(n: int, degree: int, seed: int) -> tuple[tuple[int, ...], ...]:
    rng = random.Random(f"regular/{n}/{degree}/{seed}")
    for _ in range(1000):
        stubs = [v for v in range(n) for _ in range(degree)]
        rng.shuffle(stubs)
        adj: list[set[int]] = [set() for _ in range(n)]
        ok = True
        for a, b in zip(stubs[::2], stubs[1::2], strict=True):
            if a == b or b in adj[a]:
                ok = False
                break
            adj[a].add(b)
            adj[b].add(a)
        if ok:
            return tuple(tuple(sorted(s)) for s in adj)
    return tuple(tuple(nb) for nb in _swapped_regular_graph(n, degree, rng))


def _swapped_regular_graph(n: int, degree: int, rng: random.Random, swaps_per_edge: int = 10) -> list[list[int]]:
    """A random simple `degree`-regular graph: a circulant graph shuffled by random double-edge swaps.

    Start: node ``v`` is joined to ``v +- 1 .. v +- degree // 2`` (and, for an odd degree, which needs an
    even ``n``, to ``v + n / 2``); simple because ``degree < n``. Each swap picks two edges ``(a, b)``,
    ``(c, d)`` and rewires them to ``(a, d)``, ``(c, b)``, skipped if that would make a loop or a double
    edge, so every node keeps its degree. ``swaps_per_edge`` (default 10) tries per edge mix the graph
    well (the chain mixes in a number of swaps of the order of the number of edges).
    """
    edges: list[tuple[int, int]] = [(v, (v + k) % n) for v in range(n) for k in range(1, degree // 2 + 1)]
    if degree % 2:
        edges += [(v, v + n // 2) for v in range(n // 2)]
    adj: list[set[int]] = [set() for _ in range(n)]
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    for _ in range(swaps_per_edge * len(edges)):
        i, j = rng.randrange(len(edges)), rng.randrange(len(edges))
        (a, b), (c, d) = edges[i], edges[j]
        if rng.random() < 0.5:
            c, d = d, c  # both rewirings of the pair are possible
        if len({a, b, c, d}) < 4 or d in adj[a] or b in adj[c]:
            continue
        for u, v in ((a, b), (c, d)):
            adj[u].discard(v)
            adj[v].discard(u)
        for u, v in ((a, d), (c, b)):
            adj[u].add(v)
            adj[v].add(u)
        edges[i], edges[j] = (a, d), (c, b)
    return [sorted(s) for s in adj]


def metropolis_hastings(own_degree: int, neighbour_degrees: list[int]) -> tuple[float, list[float]]:
    """(self weight, neighbour weights): ``1 / (1 + max(d_i, d_j))`` each, the rest to self."""
    weights = [1.0 / (1 + max(own_degree, d)) for d in neighbour_degrees]
    return 1.0 - sum(weights), weights


@dataclass
class DpsgdSettings:
    """Settings of D-PSGD.

    :param run_id: the run; requests from other runs are refused (``wrong_run``).
    :param config_hash: hash of the run-wide config.
    :param local_steps: minibatch steps per round.
    :param sync_warmup_steps: local steps of the run trained in warm-up rounds of `sync_warmup_local_steps`
        each (default 0: none; `RoundSchedule`).
    :param sync_warmup_local_steps: local steps of a warm-up round (default None: no warm-up).
    :param sync_warmup_outer: what the outer step does in warm-up rounds (`p2pnode.aggregation.WARMUP_OUTER`;
        default ``plain``: the plain merge in warm-up rounds, the outer step after them).
    :param graph: ``exponential`` (default) or ``regular``.
    :param degree: degree of the ``regular`` graph (default 4).
    :param seed: seed of the ``regular`` graph (the run's seed).
    :param rule: ``mean`` (default: the Metropolis-Hastings weighted average) or another rule, which is
        then applied unweighted to the node's model and its neighbours'.
    :param rule_params: extra parameters of the rule.
    :param exchange_timeout_s: longest wait for a push or for the neighbours' models, in seconds (default 30).
    :param eval_every: evaluate on the test split every this many rounds (0: never; default 1).
    :param step_cost_s: modelled seconds per training step on the simulator's virtual clock (default 0).
    :param outer_lr: DiLoCo outer optimizer's learning rate, or None (default) for none (the plain average).
    :param outer_momentum: its momentum, in [0, 1) (default 0.9).
    :param outer_nesterov: Nesterov momentum (default True).
    """

    run_id: str
    config_hash: str
    local_steps: int
    sync_warmup_steps: int = 0
    sync_warmup_local_steps: int | None = None
    sync_warmup_outer: str = "plain"
    graph: str = "exponential"
    degree: int = 4
    seed: int = 0
    rule: str = "mean"
    rule_params: dict[str, Any] = field(default_factory=dict)
    exchange_timeout_s: float = 30.0
    eval_every: int = 1
    step_cost_s: float = 0.0
    outer_lr: float | None = None
    outer_momentum: float = 0.9
    outer_nesterov: bool = True

    @property
    def schedule(self) -> RoundSchedule:
        """Local steps of each round: the warm-up's, then `local_steps` (`RoundSchedule`)."""
        return RoundSchedule(self.local_steps, self.sync_warmup_steps, self.sync_warmup_local_steps)


class DpsgdProtocol:
    """One node's D-PSGD rounds (see the module docstring), a `RoundProtocol`.

    `attacker` (default None: honest) goes into `hooks` (`ProtocolHooks.attacker`).
    """

    #: D-PSGD announces no leave: a neighbour that stops answering is skipped by its back-off.
    leave_on_close = False
    #: No secagg identity: D-PSGD has no secure aggregation.
    secagg_public_key = b""

    def __init__(self, settings: DpsgdSettings, *, transport: Transport, directory: PeerDirectory,
                 trainer: Trainer, compute: Compute, rng: random.Random, attacker: Attacker | None = None,
                 compression: Compression | str | None = None) -> None:
        """See the class; `compression` is the wire format of the pushed models (None: the transport's
        `Transport.compression`; encoded once per round for all out-neighbours, without error feedback:
        whole models). Raises `ConfigError` for a sparse format (topk)."""
        if settings.graph not in GRAPHS:
            raise ValueError(f"graph={settings.graph!r}; allowed: {', '.join(GRAPHS)}")
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
        self.me = transport.peer_id
        self.health = PeerHealth()
        #: The attacker (None for an honest node) and ``on_trained`` (the simulator's omniscient attackers).
        self.hooks = ProtocolHooks(attacker=attacker)
        self.keep_pre_merge = False
        self._spec = trainer.spec
        self._weighted = rule_info(settings.rule).weighted and settings.rule == "mean"
        self._needs_updates = rule_info(settings.rule).needs_updates
        self._peers: list[str] | None = None
        self._adjacency: list[list[int]] | None = None
        # (round, sender) -> (model, sender's degree)
        self._inbox: dict[tuple[int, str], tuple[dict[str, torch.Tensor], int]] = {}
        self._arrived = asyncio.Event()
        #: DiLoCo's outer optimizer (None without ``outer_lr``): its momentum is this node's own.
        self.outer = outer_optimizer(settings.outer_lr, settings.outer_momentum, settings.outer_nesterov)
        transport.register(PUSH, peer_pb2.DpsgdModel, self._on_push)

    # -- graph ----------------------------------------------------------------------------------------
    async def _membership(self) -> list[str]:
        if self._peers is None:
            try:
                listed = [p.peer_id for p in await self.directory.peers()]
            except Exception as e:
                logger.warning("peer directory unavailable at the first round: %s", e)
                listed = []
            self._peers = sorted({*listed, self.me})
            if self.settings.graph == "regular":
                n = len(self._peers)
                degree = min(self.settings.degree, n - 1)
                if (n * degree) % 2:
                    degree -= 1
                self._adjacency = random_regular_graph(n, degree, self.settings.seed)
        return self._peers

    def _neighbours(self, round_: int) -> tuple[list[str], list[str], int]:
        """(out-neighbours, in-neighbours, own degree) in round `round_`."""
        assert self._peers is not None
        i = self._peers.index(self.me)
        n = len(self._peers)
        if n < 2:
            return [], [], 0
        if self._adjacency is not None:
            nb = [self._peers[j] for j in self._adjacency[i]]
            return nb, nb, len(nb)
        out, in_ = exponential_neighbours(n, i, round_)
        return [self._peers[out]], [self._peers[in_]], 1

    # -- serving --------------------------------------------------------------------------------------
    async def _on_push(self, sender: str, msg: Message[Any]) -> Message[Any]:
        body: peer_pb2.DpsgdModel = msg.body
        if body.run_id != self.settings.run_id or body.config_hash != self.settings.config_hash:
            raise BadMessage(f"{sender} is in run {body.run_id!r} with config {body.config_hash!r}",
                             code="wrong_run")
        check_tensors(msg.tensors, self._spec)
        r = int(body.round)
        if not self.round <= r <= self.round + _LOOKAHEAD or body.degree > 1 << 20:
            return Message(peer_pb2.DpsgdAck(accepted=False))  # stale or far ahead: not for this round
        self._inbox[(r, sender)] = (msg.tensors, int(body.degree))
        self.health.heard_from(sender, self.round)
        self._arrived.set()
        return Message(peer_pb2.DpsgdAck(accepted=True))

    # -- one round ------------------------------------------------------------------------------------
    async def _push(self, peer: str, msg: Message[peer_pb2.DpsgdModel]) -> None:
        try:
            await self.transport.call(peer, PUSH, msg, peer_pb2.DpsgdAck, timeout=self.settings.exchange_timeout_s)
        except TransportError as e:
            logger.info("push to %s failed: %s", peer[-8:], e)
            self.health.failed(peer, self.round)

    async def _collect(self, expected: list[str]) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.exchange_timeout_s
        r = self.round
        while True:
            missing = [p for p in expected if (r, p) not in self._inbox]
            if not missing or loop.time() >= deadline:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except TimeoutError:
                break
        got = {p: self._inbox.pop((r, p)) for p in expected if (r, p) in self._inbox}
        for p in expected:
            if p not in got:
                self.health.failed(p, r)
        return got

    def _outer_step(self, outer: OuterOptimizer, start: State, merged: State) -> State:
        """DiLoCo's step of this round (`self.round`, not yet advanced) from `start` towards `merged`, as the
        warm-up policy has it (`sync_warmup_outer`)."""
        w = self._schedule.warmup_rounds
        return warmup_outer_step(outer, start, merged, policy=self.settings.sync_warmup_outer,
                                 warmup_round=self.round < w, first_after=w > 0 and self.round == w)

    async def run_round(self) -> RoundReport:
        """Train, push to the out-neighbours, average with the in-neighbours' models, evaluate."""
        s = self.settings
        peers = await self._membership()

        attacker, on_trained = self.hooks.attacker, self.hooks.on_trained
        attacking = attacker is not None and attacker.model_attack
        # The round's start: the attacker's reference, DiLoCo's theta0, the base of an update rule.
        keep_start = attacking or on_trained is not None or self.outer is not None or self._needs_updates
        # For an undone merge (the quorum): the outer momentum before this round (a copy).
        pre_outer = self.outer.state_dict() if self.outer is not None and self.keep_pre_merge else None

        # This round's local steps: the warm-up's short rounds first (a function of the round number, which
        # a checkpoint or a state sync restores), then local_steps.
        steps = self._schedule.steps(self.round)

        def train() -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
            start = self.trainer.state() if keep_start else None
            return self.trainer.train(steps), self.trainer.state(), start

        train_loss, own, start = await self.compute.run(train, cost_s=s.step_cost_s * steps)
        sent = own
        if start is not None:
            if on_trained is not None:
                on_trained(self.round, start, own)
            if attacking:
                assert attacker is not None
                sent = await attacker.forge(self.round, start, own)
        out, in_, degree = self._neighbours(self.round)
        body = peer_pb2.DpsgdModel(run_id=s.run_id, config_hash=s.config_hash, round=self.round, degree=degree)
        msg = (Message(body, compressed=compress_state(sent, self.compression)) if self.compression.lossy
               else Message(body, sent))
        targets = [p for p in out if self.health.usable(p, self.round)]
        expected = [p for p in in_ if self.health.usable(p, self.round)]
        _, got = await asyncio.gather(asyncio.gather(*(self._push(p, msg) for p in targets)),
                                      self._collect(expected))
        received = [got[p] for p in in_ if p in got]
        pre_merge: State | None = None
        outer = self.outer
        merged_with = 0  # neighbours' models in the merge
        if received:
            states = [own, *(st for st, _ in received)]
            w_self, w = metropolis_hastings(degree, [d for _, d in received])
            params = {"weights": [w_self, *w]} if self._weighted else s.rule_params

            def merge() -> bool:
                try:
                    merged = merge_states(s.rule, states, start, params)
                except AggregationError as e:
                    # Too few inputs for the rule (e.g. multikrum needs 3): keep the own model this round.
                    logger.debug("merge skipped: %s", e)
                    return False
                if outer is not None:
                    # DiLoCo: pseudo-gradient theta0 - merged (the same weights over theta0 - x_j), outer step.
                    assert start is not None
                    merged = self._outer_step(outer, start, merged)
                self.trainer.load_state(merged)
                return True

            if self.keep_pre_merge:
                pre_merge = own  # a copy (Trainer.state), not changed by the load

            if await self.compute.run(merge):
                merged_with = len(received)
            else:
                pre_merge = None
        if outer is not None and not merged_with:
            assert start is not None
            theta0 = start
            # DiLoCo without a merge: the outer step on the own pseudo-gradient.
            await self.compute.run(lambda: self.trainer.load_state(self._outer_step(outer, theta0, own)))
        # Drop what can no longer be used (older rounds), keep models pushed early for later rounds.
        for key in [k for k in self._inbox if k[0] <= self.round]:
            del self._inbox[key]
        self.round += 1
        test_loss: float | None = None
        accuracy: float | None = None
        if s.eval_every and self.round % s.eval_every == 0:
            test_loss, accuracy = await self.compute.run(self.trainer.evaluate)
        return RoundReport(round=self.round, train_loss=float(train_loss), test_loss=test_loss, accuracy=accuracy,
                           peers=len(peers) - 1, combined=1 + merged_with, fraction=merged_fraction(bool(merged_with)),
                           partner=out[0] if out else None, failures=len(in_) - len(received),
                           extra=RoundExtra(role="trainer"), pre_merge=pre_merge,
                           pre_outer=pre_outer if pre_merge is not None else None)

    # -- the rest of RoundProtocol ----------------------------------------------------------------------
    def snapshot(self) -> ProtocolSnapshot:
        """No event counters and no suspicion scores (D-PSGD scores nobody)."""
        return ProtocolSnapshot()

    def outer_state(self) -> State:
        """`LocalOuterState`: a copy of this node's outer optimizer state (empty without DiLoCo)."""
        return self.outer.state_dict() if self.outer is not None else {}

    def load_outer_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """`LocalOuterState`: load a saved outer optimizer state (empty: no momentum yet)."""
        load_outer_state(self.outer, state)

    def state_loaded(self) -> None:
        """Nothing to refresh: every round pushes the model the trainer holds then."""

    async def rejoin(self) -> None:
        """Nothing to forget or announce: the graph is fixed, and the neighbours' back-off lets it back in."""

    async def close(self) -> None:
        self._inbox.clear()
