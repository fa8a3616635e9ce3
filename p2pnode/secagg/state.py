"""The state of one instance at the aggregator and at a user, and what each role hands back.

`AggregatorState` is the server's state machine: the open stage, who completed which stage (U1, U2,
U3, U5 in the papers' notation) and the running sum. Every incoming message passes
`AggregatorState.expect` first: its stage must be the open one and its sender must have completed
the previous stage and not have sent this stage's message already. `UserState` is a user's secrets and
what it learned from the aggregator.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pnode.errors import BadMessage
from p2pnode.proto import secagg_pb2
from p2pnode.secagg.settings import Plan
from p2pnode.secagg.stages import STAGES, Stage, Status


@dataclass
class Contribution:
    """What a user puts into the sum.

    :param vector: its model coordinates (``Session.dim`` float elements, any shape): for MoDeST the
        update ``delta_i`` or the weights.
    :param weight: its weight in ``(0, SecAggSettings.max_weight]`` (default 1.0).
    :param extras: ``Session.extras`` extra float coordinates (for example per-layer variances for
        VCA, see `p2pnode.secagg.compose`), or None (default) when there are none.
    """

    vector: torch.Tensor
    weight: float = 1.0
    extras: torch.Tensor | None = None


@dataclass
class SecAggResult:
    """What the aggregator obtains from one instance.

    Attributes:
        weighted_sum: ``sum(w_u * x_u)`` over the users in `survivors`, float64, ``dim`` elements (with
            unit weights: the plain sum). Exact up to quantization: below ``len(survivors) * 2 clip /
            levels * max_weight`` per coordinate for unclipped inputs.
        extras_sum: ``sum(w_u * extras_u)``, float64, ``extras`` elements.
        weight_sum: ``sum(w_u)`` (up to the rounding of each weight to 1 / levels of max_weight).
        survivors: peer ids whose inputs are in the sum (U3), sorted.
        dropped: peer ids first missing at each stage, by stage label.
        users: size of the sample.
        neighbours, threshold, word_bits: the instance's resolved parameters.
        compute_s: CPU seconds (thread time) the aggregator spent in protocol computation (sums, Shamir
            reconstruction, mask regeneration, decoding); waits for the network excluded.
        rejected: messages refused, by reason code.
    """

    weighted_sum: torch.Tensor
    extras_sum: torch.Tensor
    weight_sum: float
    survivors: tuple[str, ...]
    dropped: dict[str, tuple[str, ...]]
    users: int
    neighbours: int
    threshold: int
    word_bits: int
    compute_s: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Share of the sample whose inputs are in the sum."""
        return len(self.survivors) / self.users

    def mean(self) -> torch.Tensor:
        """The weighted mean ``sum(w x) / sum(w)`` (with unit weights: the plain mean over survivors)."""
        return self.weighted_sum / self.weight_sum

    def extras_mean(self) -> torch.Tensor:
        """The weighted mean of the extra coordinates (for VCA: the target variance of each layer)."""
        return self.extras_sum / self.weight_sum


@dataclass
class UserReport:
    """How one user's part of an instance ended.

    Attributes:
        peer_id, index: the user and its 1-based index.
        status: DONE (it revealed its shares), ABORTED (it stopped on an error or an abort by the
            aggregator; see `reason`) or RUNNING (it was told to go silent: `stop_before`).
        completed: the last stage whose reply it received, or None.
        reason: why it stopped early, or None.
        survivors: size of U3 as announced by the aggregator (0 if not reached).
        partners: number of users it masked with.
        compute_s: CPU seconds (thread time) spent in protocol computation (keys, shares, masks, encoding).
        mask_s: the part of `compute_s` spent generating the masks and the stochastic rounding's noise,
            which do not depend on the input and so run while the input is being trained.
        input_s: the part of `compute_s` spent after the input was available (encoding it into the
            masks, checking the survivor list, revealing shares): the user's share of the round's
            critical path when it trains while the earlier stages run. Everything else (keys, shares,
            masks) runs before the input is awaited.
    """

    peer_id: str
    index: int
    status: Status
    completed: Stage | None = None
    reason: str | None = None
    survivors: int = 0
    partners: int = 0
    compute_s: float = 0.0
    mask_s: float = 0.0
    input_s: float = 0.0


@dataclass
class AggregatorState:
    """The server's state of one instance (one per round)."""

    plan: Plan
    stage: Stage = Stage.ADVERTISE
    #: Whether `stage` accepts messages: False between its close and the next stage's opening (the
    #: advertise stage is open from the creation of the state).
    open: bool = True
    status: Status = Status.RUNNING
    abort_reason: str | None = None
    #: U1: the advertised keys, by index.
    keys: dict[int, secagg_pb2.SecAggKeys] = field(default_factory=dict)
    #: U2: ciphertexts by sender, then by recipient.
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)
    #: U3 (once the masked stage closes): users whose masked input was added to `masked_sum`.
    masked: set[int] = field(default_factory=set)
    masked_sum: np.ndarray | None = None
    #: U5: shares revealed, by revealer: (self-mask shares by owner, mask-key shares by owner).
    revealed: dict[int, tuple[dict[int, int], dict[int, int]]] = field(default_factory=dict)
    #: Users that completed each closed stage.
    completed: dict[Stage, frozenset[int]] = field(default_factory=dict)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Users that cannot take part (no identity key known for them): never expected, always refused.
    ineligible: frozenset[int] = frozenset()

    def arrived(self, stage: Stage) -> set[int]:
        """Users whose message of `stage` has been accepted so far."""
        if stage is Stage.ADVERTISE:
            return set(self.keys)
        if stage is Stage.SHARE:
            return set(self.ciphertexts)
        if stage is Stage.MASKED:
            return set(self.masked)
        return set(self.revealed)

    def expected(self, stage: Stage) -> frozenset[int]:
        """Users allowed to send a message of `stage`: those that completed the previous stage."""
        if stage is Stage.ADVERTISE:
            return frozenset(range(1, self.plan.n + 1)) - self.ineligible
        return self.completed[STAGES[stage - 1]]

    def expect(self, stage: Stage, index: int) -> None:
        """Check a message of `stage` from user `index` against the state; raise `BadMessage` if unexpected."""
        if self.status is not Status.RUNNING:
            raise BadMessage(f"secagg {stage.label} message from user {index}: the instance is already "
                             f"{self.status.value}", code="stale")
        if stage < self.stage or (stage == self.stage and not self.open):
            raise BadMessage(f"secagg {stage.label} message from user {index} arrived after that stage closed "
                             f"(open stage: {self.stage.label})", code="stale")
        if stage > self.stage:
            raise BadMessage(f"secagg {stage.label} message from user {index} while stage {self.stage.label} is "
                             f"open: stages run in the order advertise, share, masked, unmask", code="malformed")
        if index not in self.expected(stage):
            prev = STAGES[stage - 1].label if stage else "advertise"
            raise BadMessage(f"secagg {stage.label} message from user {index}, which did not complete stage "
                             f"{prev}: it counts as dropped", code="stale")
        if index in self.arrived(stage):
            raise BadMessage(f"duplicate secagg {stage.label} message from user {index} (replayed?); the first "
                             f"one stands", code="stale")


@dataclass
class UserState:
    """A user's secrets and what it learned, for one instance."""

    plan: Plan
    index: int
    cipher_sk: X25519PrivateKey
    mask_sk: X25519PrivateKey
    self_seed: bytes
    commitment: bytes
    #: Its own shares of its own secrets: (mask-key share, self-mask share).
    own_shares: tuple[int, int] = (0, 0)
    #: Keys of its holders that advertised (U1 restricted to its neighbourhood), by index.
    keys: dict[int, secagg_pb2.SecAggKeys] = field(default_factory=dict)
    #: Shares it holds of its partners' secrets: (mask-key share, self-mask share), by owner.
    held: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Neighbours that sent it shares (U2 restricted to its neighbours): its mask partners.
    partners: tuple[int, ...] = ()
    survivors: frozenset[int] = frozenset()
    completed: Stage | None = None
