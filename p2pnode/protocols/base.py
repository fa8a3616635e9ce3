"""What every round protocol shares: the report of one round, the interface the node drives, the hooks
that the simulator and tests set, and the peer-selection bookkeeping.

`RoundProtocol` is everything the daemon (`p2pnode.daemon.node`, `p2pnode.daemon.metrics`) and the
simulator (`simulator.runner`) may use of a protocol; nothing outside `p2pnode.protocols` reads a
protocol's other attributes. Every protocol (gossip, dpsgd, modest, fl) implements all of it; members
that mean nothing to a protocol are documented no-ops there (gossip announces no leave, so its
`leave_on_close` changes nothing).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

import torch

if TYPE_CHECKING:  # only for annotations: these modules import this one
    from p2pnode.protocols.adversary import Attacker
    from p2pnode.protocols.modest.state import AggregationEvent
    from p2pnode.secagg import Contribution, Stage, UserReport

#: A model (or an update, or an optimizer's state): tensors by entry name.
State = dict[str, torch.Tensor]

#: ``on_trained(round, start_model, trained_model)``: a hook an honest protocol calls after local training.
TrainedHook = Callable[[int, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None]


class RoundExtra(TypedDict, total=False):
    """The per-round extras of a `RoundReport` (``extra``), written into the round's log event, the
    control API's ``extra_json`` and the simulator's rows. Every key is optional.

    Keys set by the protocols:

    - ``role``: modest, fl, dpsgd: what the node did (``trainer``, ``aggregator``, ``idle``, ...).
    - ``aggregated``: modest, fl: the model versions this node aggregated since its last report.
    - ``ignored``: gossip: senders whose models the merge left out as suspects (``exclude_suspects``).

    Keys set by the node (`p2pnode.daemon.node.Node`) when it decides a round was partial:

    - ``partial``: why (``quorum``: fewer models than ``min_merge``; ``fraction``: part of the model).
    - ``offered``, ``quorum``, ``merge_applied``: with ``partial = quorum``, the models the protocol
      combined, the quorum asked for, and False (the merge was undone or none was applied).
    """

    role: str
    aggregated: list[int]
    ignored: list[str]
    partial: str
    offered: int
    quorum: int
    merge_applied: bool


@dataclass
class RoundReport:
    """What one node did in one round.

    Args:
        round: the round just completed (1-based).
        train_loss: mean training loss over the round's local steps.
        test_loss: loss on the held-out test split, or None when not evaluated this round.
        accuracy: value of the task's metric on the held-out test split (`Trainer.metric`: accuracy in
            [0, 1] for the image tasks, perplexity for ``tiny-lm``), or None when not evaluated. The node,
            control API and simulator report it under the metric's name.
        peers: peers of the run this node knew at the start of the round.
        combined: models merged into this node's model this round, its own included (1: trained alone;
            modest and fl: the models combined into the version the node holds; 0: an aborted secure
            aggregation, which combined none).
        fraction: share of the model's floating-point entries (by element count) that this round's merge
            really combined, in [0, 1]: 1.0 when a merge covered the whole model, 0.0 when none was applied
            (the node keeps its own model: it trained alone, the rule refused its inputs, or the quorum
            undid the merge). Our protocols merge whole models, so 1.0 or 0.0; a merge that keeps the
            local values of a slice (as hivemind's averager does when a peer fails mid-exchange) reports
            the share it did combine, and the node counts such a round as partial (``fraction``).
        partner: peer this node exchanged with, or None.
        failures: exchanges that failed this round (timeout, refusal, bad response).
        extra: per-round extras (`RoundExtra`).
        pre_merge: the model as it was before this round's merge was applied, when the node asked the
            protocol to keep it (`RoundProtocol.keep_pre_merge`, for the quorum) and a merge was applied;
            else None. Not part of the round's record (logs, control API).
        pre_outer: with `pre_merge`, the state of the protocol's own outer optimizer from before this round
            (`LocalOuterState.outer_state`; gossip and dpsgd with DiLoCo), which undoing the merge loads
            back; else None. Not part of the round's record.
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
    extra: RoundExtra = field(default_factory=lambda: RoundExtra())
    pre_merge: State | None = field(default=None, repr=False, compare=False)
    pre_outer: State | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """The report as a JSON-ready record (logs, control API): every field but `pre_merge` and `pre_outer`."""
        return {"round": self.round, "train_loss": self.train_loss, "test_loss": self.test_loss,
                "accuracy": self.accuracy, "peers": self.peers, "combined": self.combined,
                "fraction": self.fraction, "partner": self.partner, "failures": self.failures,
                "extra": dict(self.extra)}


def merged_fraction(merged: bool) -> float:
    """`RoundReport.fraction` of a protocol that merges whole models: 1.0 if a merge was applied, else 0.0."""
    return 1.0 if merged else 0.0


@dataclass
class ProtocolHooks:
    """The seams that the simulator, tests and research code set on a protocol (all None: none).

    One object per protocol (`RoundProtocol.hooks`), read at each use, so a hook set after the protocol
    was built takes effect at its next use. A hook a protocol has no use for is never called (gossip
    and dpsgd complete no aggregations, only modest and fl run secure aggregation).

    Args:
        attacker: a Byzantine node's forging of the models it sends (None: honest; see
            `p2pnode.protocols.adversary`).
        on_trained: called after each local training with (round or version, start model, trained model);
            the simulator's omniscient attackers read honest updates through it. Never set in the daemon.
        on_aggregate: modest, fl: called with an `AggregationEvent` after each aggregation this node completes.
        on_secagg_report: modest, fl: called with (version trained, report) for each secagg user of this
            node once it ends.
        on_secagg_input: modest, fl: called on a trainer with (round, its own contribution) before it is masked.
        secagg_silent_from: modest, fl: this node's next secure round goes silent from that stage on (fault
            injection); reset once used.
    """

    attacker: Attacker | None = None
    on_trained: TrainedHook | None = None
    on_aggregate: Callable[[AggregationEvent], None] | None = None
    on_secagg_report: Callable[[int, UserReport], None] | None = None
    on_secagg_input: Callable[[int, Contribution], None] | None = None
    secagg_silent_from: Stage | None = None


@dataclass(frozen=True)
class ProtocolSnapshot:
    """A protocol's own counts at one moment (copies: later rounds do not change them).

    Args:
        counters: events counted by the protocol, by event name (modest, fl: ``aggregations``,
            ``topups``, ...; gossip, dpsgd: none yet). Exported as ``p2pnode_protocol_events_total``.
        suspicion: suspicion score of each peer this node scored (`p2pnode.protocols.suspicion`; empty
            for a protocol that scores nobody). Exported as ``p2pnode_peer_suspicion``.
    """

    counters: dict[str, int] = field(default_factory=dict)
    suspicion: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class LocalOuterState(Protocol):
    """A protocol whose DiLoCo outer optimizer is the node's own (gossip, dpsgd), so that the node checkpoints
    its momentum and restores it (resume, an undone merge). In modest and fl the momentum travels with each
    model version instead, and is no node's own."""

    def outer_state(self) -> State:
        """A copy of the outer optimizer's state (`OuterOptimizer.state_dict`; empty without one)."""
        ...

    def load_outer_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an `outer_state` back (empty: forget the momentum); call between rounds."""
        ...


@runtime_checkable
class RoundProtocol(Protocol):
    """A protocol drives one node's rounds: the node calls `run_round` in a loop.

    This is all that the daemon, its metrics and the simulator use of a protocol (see the module doc).
    `round` is writable: the node sets it when it resumes from a checkpoint or a state sync.
    """

    round: int
    #: The seams of the simulator and tests (`ProtocolHooks`).
    hooks: ProtocolHooks
    #: The quorum's seam: when True, each report carries the model as it was before the round's merge
    #: (`RoundReport.pre_merge`), so that the node can undo a merge below its quorum. Default False (no copy).
    keep_pre_merge: bool

    async def run_round(self) -> RoundReport:
        """Run one round and report it."""
        ...

    async def rejoin(self) -> None:
        """Come back after being unresponsive (a crash the process survived): forget work in progress and,
        where the protocol has membership, announce the return."""
        ...

    async def close(self) -> None:
        """Stop background work and release what the protocol holds (announcing a leave if it does that)."""
        ...

    def snapshot(self) -> ProtocolSnapshot:
        """The protocol's event counters and suspicion scores now."""
        ...

    def state_loaded(self) -> None:
        """The trainer's model was replaced outside a round (checkpoint resume, state sync, an undone merge):
        refresh whatever the protocol derived from it (gossip: the model it serves to peers)."""
        ...

    @property
    def secagg_public_key(self) -> bytes:
        """The Ed25519 public key this node announces in its directory record for secure aggregation;
        empty when it binds no identity (every protocol but a secure modest or fl)."""
        ...

    @property
    def leave_on_close(self) -> bool:
        """Whether `close` announces a leave to peers (modest, fl; the simulator turns it off at the end of a
        run, where the whole swarm stops at once). Always False for protocols without membership messages."""
        ...

    @leave_on_close.setter
    def leave_on_close(self, value: bool) -> None: ...


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
