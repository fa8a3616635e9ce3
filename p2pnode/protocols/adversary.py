"""A Byzantine participant: what an attacking node sends instead of its honestly trained model.

An attacker runs the same protocol code as every other node (it trains, exchanges, aggregates when
sampled as an aggregator), but where it sends its own trained model or update it sends a forged one
(`Attacker.forge`), built with `p2pnode.attacks.forge` in *update space*:

    forged model = reference + forge(attack, honest updates)[0]

where `reference` is the model the attacker's round started from (gossip and dpsgd: its model at the
start of the round; modest and fl: the base model version it was asked to train) and the honest
updates are what the attacker knows:

- in the daemon, the updates it has itself: its own honestly trained update ``trained - reference``
  and, in gossip, the models it received in its robust window (``received - reference``);
- in the simulator, an *oracle* (`HonestOracle`, provided by the simulator, never by a peer) returns
  the honest nodes' updates of the same round: the omniscient threat model of the attack papers.

``label_flip`` is a data attack: the attacker trains on flipped labels (`Attacker.label_map`) and sends
its trained model as it is.

Attackers aggregate honestly when sampled as MoDeST aggregators: a Byzantine aggregator of a one-
aggregator sample controls the next model version outright, which no aggregation rule can prevent
(see docs/protocols.md, "Byzantine peers").
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import torch

from p2pnode.attacks import alie_z, attack_info, flip_labels, forge
from p2pnode.errors import AggregationError
from p2pnode.protocols.base import State, TrainedHook

logger = logging.getLogger(__name__)

#: ``oracle(round, attacker_peer_id)`` -> the honest nodes' flat updates of that round (possibly empty).
HonestOracle = Callable[[int, str], Awaitable[list[torch.Tensor]]]


def flatten(state: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> torch.Tensor:
    """The state's entries (in `keys` order, default: the state's order) as one float32 CPU vector."""
    names = list(state) if keys is None else list(keys)
    return torch.cat([state[k].detach().reshape(-1).to("cpu", torch.float32) for k in names])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> State:
    """Split `vector` back into entries shaped and typed like `like` (its order)."""
    out: State = {}
    offset = 0
    for name, t in like.items():
        n = t.numel()
        out[name] = vector[offset:offset + n].reshape(t.shape).to(t.dtype)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the state {offset}")
    return out


def _round_seed(seed: int, peer_id: str, round_: int) -> int:
    digest = hashlib.sha256(f"attack/{seed}/{peer_id}/{round_}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class Attacker:
    """One attacking node's forging (see the module docstring).

    :param attack: a name from `p2pnode.attacks.available_attacks()`.
    :param params: the attack's parameters (``attack_info(attack).params``); unknown names are refused.
    :param seed: seed of the random attacks (``gaussian``, ``random``), mixed with the peer id and round.
    :param peer_id: this node's peer id (logs, oracle, seeds).
    :param population: total nodes of the run, for ALIE's default ``z`` (default None: the number of
        updates the attacker knows plus itself).
    :param colluders: attackers that collude, for ALIE's default ``z`` (default 1).
    :param oracle: the simulator's view of the honest updates of a round (None in the daemon).
    :raises AggregationError: unknown attack or parameter.
    """

    def __init__(self, attack: str, params: Mapping[str, Any] | None = None, *, seed: int = 0, peer_id: str = "",
                 population: int | None = None, colluders: int = 1, oracle: HonestOracle | None = None) -> None:
        info = attack_info(attack)
        self.attack = attack
        self.kind = info.kind
        self.params = dict(params or {})
        unknown = sorted(set(self.params) - set(info.params))
        if unknown:
            raise AggregationError(f"{attack}: unknown parameter(s) {unknown}; allowed: "
                                   f"{', '.join(info.params) or 'none'}")
        self.seed = seed
        self.peer_id = peer_id
        self.population = population
        self.colluders = max(1, colluders)
        self.oracle = oracle
        #: Forged sends so far (for logs and tests).
        self.forged = 0

    @property
    def model_attack(self) -> bool:
        """Whether this attack forges what the node sends (False for the data attack ``label_flip``)."""
        return self.kind == "model"

    def label_map(self, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The training-label transform of a data attack, or None."""
        if self.attack != "label_flip":
            return None
        return lambda labels: flip_labels(labels, num_classes)

    async def forge(self, round_: int, reference: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                    seen: Sequence[Mapping[str, torch.Tensor]] = ()) -> State:
        """The model to send instead of `trained` (see the module docstring).

        :param round_: the round (gossip, dpsgd) or model version trained (modest, fl).
        :param reference: the model this round's training started from.
        :param trained: the attacker's honestly trained model.
        :param seen: other models the attacker holds this round (gossip: its window), as honest estimates.
        """
        if not self.model_attack:
            return dict(trained)
        keys = list(reference)
        ref = flatten(reference, keys)
        honest: list[torch.Tensor] = []
        if self.oracle is not None:
            honest = [u for u in await self.oracle(round_, self.peer_id) if u.numel() == ref.numel()]
        if not honest:
            honest = [flatten(trained, keys) - ref]
            honest += [flatten(s, keys) - ref for s in seen if set(s) == set(keys)]
        params = dict(self.params)
        if self.attack == "alie" and params.get("z") is None:
            population = self.population if self.population is not None else len(honest) + self.colluders
            params["z"] = alie_z(population, self.colluders)
        update = forge(self.attack, honest, 1, seed=_round_seed(self.seed, self.peer_id, round_), **params)[0]
        self.forged += 1
        return unflatten(ref + update, {k: reference[k] for k in keys})


class HonestBoard:
    """The simulator's record of the honest nodes' updates per round, and the oracle built on it.

    Honest protocols report each local training through `record` (their ``on_trained`` hook); an
    attacker asks `updates` after its own training and gets the honest updates of that round reported
    so far, after waiting `settle_s` (virtual) seconds so that trainings of the same instant are in.

    :param settle_s: wait before answering, in (virtual) seconds (default 1e-6: same-instant trainings).
    :param keep_rounds: rounds kept (older ones are dropped; default 4).
    """

    def __init__(self, settle_s: float = 1e-6, keep_rounds: int = 4) -> None:
        self.settle_s = settle_s
        self.keep_rounds = keep_rounds
        self._rounds: dict[int, dict[str, torch.Tensor]] = {}

    def hook(self, peer_id: str) -> TrainedHook:
        """The ``on_trained`` hook of one honest node."""

        def on_trained(round_: int, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]) -> None:
            self.record(round_, peer_id, flatten(trained, list(start)) - flatten(start))

        return on_trained

    def record(self, round_: int, peer_id: str, update: torch.Tensor) -> None:
        self._rounds.setdefault(round_, {})[peer_id] = update
        for r in [r for r in self._rounds if r < round_ - self.keep_rounds]:
            del self._rounds[r]

    async def updates(self, round_: int, peer_id: str) -> list[torch.Tensor]:
        """The honest updates of `round_` (the oracle; `peer_id` is the asking attacker)."""
        if self.settle_s > 0:
            await asyncio.sleep(self.settle_s)
        got = self._rounds.get(round_, {})
        return [got[p] for p in sorted(got)]
