"""What every round protocol shares: the report of one round and the peer-selection bookkeeping."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

#: A model (or an update, or an optimizer's state): tensors by entry name.
State = dict[str, torch.Tensor]


@dataclass
class RoundReport:
    """What one node did in one round.

    :param round: the round just completed (1-based).
    :param train_loss: mean training loss over the round's local steps.
    :param test_loss: loss on the held-out test split, or None when not evaluated this round.
    :param accuracy: value of the task's metric on the held-out test split (`Trainer.metric`: accuracy in
        [0, 1] for the image tasks, perplexity for ``tiny-lm``), or None when not evaluated. The node,
        control API and simulator report it under the metric's name.
    :param peers: peers of the run this node knew at the start of the round.
    :param combined: models merged into this node's model this round, its own included (1: trained alone).
    :param fraction: share of the model's tensors that the merge really combined (1.0 or 0.0 here).
    :param partner: peer this node exchanged with, or None.
    :param failures: exchanges that failed this round (timeout, refusal, bad response).
    """

    round: int
    train_loss: float
    test_loss: float | None
    accuracy: float | None
    peers: int
    combined: int
    fraction: float
    partner: str | None = None
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class RoundProtocol(Protocol):
    """A protocol drives one node's rounds. The node calls `run_round` in a loop."""

    round: int

    async def run_round(self) -> RoundReport: ...

    async def close(self) -> None: ...


class PeerHealth:
    """Skips peers that failed recently: after a failure a peer is skipped for 1, 2, 4, ... rounds (at most 16).

    Peers a node hears from are also remembered here, so a node whose directory is stale still knows them.
    """

    def __init__(self, max_backoff_rounds: int = 16) -> None:
        self.max_backoff_rounds = max_backoff_rounds
        self._fails: dict[str, int] = {}
        self._skip_until: dict[str, int] = {}
        self._heard: dict[str, int] = {}

    def failed(self, peer_id: str, round_: int) -> None:
        n = self._fails.get(peer_id, 0) + 1
        self._fails[peer_id] = n
        self._skip_until[peer_id] = round_ + 1 + min(2 ** (n - 1), self.max_backoff_rounds)

    def succeeded(self, peer_id: str, round_: int) -> None:
        self._fails.pop(peer_id, None)
        self._skip_until.pop(peer_id, None)
        self._heard[peer_id] = round_

    def heard_from(self, peer_id: str, round_: int) -> None:
        self._heard[peer_id] = round_
        self._skip_until.pop(peer_id, None)

    def usable(self, peer_id: str, round_: int) -> bool:
        """Whether `peer_id` is not in back-off at round `round_`."""
        return self._skip_until.get(peer_id, -1) <= round_

    def recently_heard(self, round_: int, window: int = 3) -> list[str]:
        return sorted(p for p, r in self._heard.items() if r >= round_ - window)

    def choose(self, candidates: list[str], round_: int, rng: random.Random) -> str | None:
        """A random candidate not in back-off, or None."""
        usable = [p for p in candidates if self._skip_until.get(p, -1) <= round_]
        return rng.choice(usable) if usable else None
