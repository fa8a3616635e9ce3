"""What the roles of one MoDeST node share: the records of models and aggregations, and `Core`.

`Core` is the node's protocol state (round estimate, view, held model versions, open aggregations,
counters) with the small helpers every role uses (clock, background tasks, ordering keys, thresholds).
It does no networking: the roles (`trainer`, `aggregator`, `secure`, `spread`, `membership`) do, each
on the state it is handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pnode.aggregation import rule_info
from p2pnode.discovery import PeerDirectory
from p2pnode.protocols.base import PeerHealth, RoundExtra, RoundReport, State, merged_fraction
from p2pnode.protocols.compute import Compute
from p2pnode.protocols.membership import View
from p2pnode.protocols.modest.settings import ModestSettings
from p2pnode.protocols.suspicion import SuspicionTracker
from p2pnode.secagg import SecAggResult
from p2pnode.secagg.aggregator import SecAggAggregator
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Transport
from p2pnode.transport.compression import (
    CompressedTensor,
    check_combination,
    compress_state,
    decompress,
    model_format,
)
from p2pnode.transport.feedback import ErrorFeedback

logger = logging.getLogger(__name__)


def short(peer_id: str) -> str:
    """A peer id for logs: libp2p ids are long, so their last 8 characters."""
    return peer_id if len(peer_id) <= 12 else peer_id[-8:]


def majority(values: Iterable[bytes]) -> bytes:
    """The most frequent value (ties: the smallest), deterministic."""
    counts = Counter(values)
    return max(sorted(counts), key=lambda d: counts[d]) if counts else b""


@dataclass
class AggregationEvent:
    """One completed aggregation, as the aggregator saw it.

    :param index: the model version produced.
    :param aggregator: the aggregator's peer id.
    :param contributors: trainers whose models were combined, sorted.
    :param sample: peers that accepted the new model (the next sample), in arrival order.
    :param train_loss: mean training loss reported by the contributors.
    :param accuracy: value of the task's metric (accuracy, or perplexity for a language model) of the new model on
        the test split, or None when not evaluated.
    :param test_loss: loss of the new model on the test split, or None.
    :param time_s: loop time of the completion, in seconds (virtual seconds in the simulator).
    :param degraded: completed with fewer models than ``liveness_min`` after the top-ups.
    :param topups: top-ups this aggregation needed.
    :param rule: the rule really used (``mean`` when the configured rule refused too few inputs; ``none``
        for an aborted secure aggregation).
    :param secure: the models were combined by secure aggregation (only their mean was seen).
    :param dropped: secure aggregation: members of the sample whose input is not in the mean, sorted.
    :param aborted: secure aggregation: why it was aborted (too few trainers left); the new version is
        then the base model unchanged, and `contributors` is empty. None when it completed.
    :param state: the new model version (not copied: do not modify it).
    :param ignored: trainers whose models were left out as suspects (``exclude_suspects``).
    """

    index: int
    aggregator: str
    contributors: list[str]
    sample: list[str]
    train_loss: float | None
    accuracy: float | None
    test_loss: float | None
    time_s: float
    degraded: bool
    topups: int
    rule: str
    secure: bool = False
    dropped: list[str] = field(default_factory=list)
    aborted: str | None = None
    state: State | None = field(default=None, repr=False)
    ignored: list[str] = field(default_factory=list)


@dataclass
class Incoming:
    round: int
    state: State
    outer: State
    sender: str
    parent: bytes = b""  # digest of version round - 1
    combined: int = 1
    # With secagg: the sample of `round` (the users of the secure aggregation of round + 1) and the key
    # that ordered its candidates (the aggregator of round + 1 checks the sample against it).
    sample: tuple[str, ...] = ()
    sample_key: bytes = b""


@dataclass
class Base:
    """A model version this node holds (to train from, to serve to aggregators, to send again).

    `outer`: the version's outer optimizer state, held by the aggregators that built it and by those that
    pulled it (empty on trainers: the momentum does not travel with the version). `sender`: the peer that
    sent this node the version (empty when it built it), whom the next aggregators ask for the momentum.
    """

    round: int
    digest: bytes
    state: State
    outer: State
    parent: bytes  # digest of version round - 1
    combined: int
    sender: str = ""


@dataclass
class Upload:
    state: State
    base_digest: bytes
    parent_digest: bytes
    train_loss: float
    #: Spread secure groups: the aggregators of the version in the trainer's order.
    aggregators: tuple[str, ...] = ()
    #: DiLoCo: the peer that sent the trainer its base version (it holds the outer momentum); "" if none.
    base_sender: str = ""


@dataclass
class Result:
    success: bool
    reason: str
    contributors: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)


class Aggregation:
    """The state of one aggregation index at one aggregator: open -> completing -> done."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.models: dict[str, Upload] = {}
        self.state = "open"
        self.topups = 0
        self.future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.Task[None] | None = None
        # Secure aggregation: a signal for each trainer's metadata (its update travels masked in an instance).
        self.arrived = asyncio.Event()
        # The instances of each group (group 0 alone without groups). A group can have several candidate
        # instances, one per distinct member list claimed, so that a member claiming a forged list cannot
        # take the group from the others; each member opens at most one per group (`openers`: (group,
        # member) pairs that opened one). The first instance of a group to produce a sum decides it; a group
        # whose last candidate aborts is decided as left out. `decided`: the instance whose outcome counts.
        self.candidates: dict[int, list[SecAggAggregator]] = {}
        self.opened: list[SecAggAggregator] = []
        self.openers: set[tuple[int, str]] = set()
        self.decided: dict[int, SecAggAggregator] = {}
        # The outcome of each decided group (its result, or why it was left out), a signal for either, and
        # whether new groups are refused.
        self.group_results: dict[int, SecAggResult | str] = {}
        self.group_changed = asyncio.Event()
        self.groups_closed = False
        # Secure groups spread over the aggregators (`ModestProtocol._spread`): the residue ``g mod a`` of
        # the groups trainers send here (from the first claim), i.e. this aggregator's position in their list.
        self.home: int | None = None

    def running(self) -> bool:
        """Whether an instance of a group not yet decided is still running."""
        return any(insts for g, insts in self.candidates.items() if g not in self.group_results)

    def secure_users(self) -> set[str]:
        """Members of the secure instances of this index: of the deciding instance of each decided group,
        and of every instance opened for an undecided group (the whole sample with one group)."""
        users: set[str] = set()
        for inst in self.opened:
            g = inst.plan.session.group
            if g not in self.decided or self.decided[g] is inst:
                users.update(inst.plan.session.users)
        return users

    def base_digest(self) -> bytes:
        """The base version the trainers of this index trained from: the majority of their digests."""
        return majority(u.base_digest for u in self.models.values())

    def parent_digest(self) -> bytes:
        """The digest of the base's parent version, as the majority of the trainers name it."""
        return majority(u.parent_digest for u in self.models.values())

    def base_senders(self, digest: bytes) -> list[str]:
        """The peers the trainers of the base `digest` got it from, most named first (ties: by id)."""
        counts = Counter(u.base_sender for u in self.models.values() if u.base_sender and u.base_digest == digest)
        return sorted(counts, key=lambda p: (-counts[p], p))

    async def wait_metadata(self, needed: Iterable[str], *, timeout: float, any_one: bool = False) -> None:
        """Wait (at most `timeout` seconds) for the metadata updates of `needed` (or of any one trainer)."""
        want = set(needed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.models if any_one else want <= set(self.models)):
            self.arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)

    def resolve(self, result: Result) -> None:
        self.state = "done"
        if not self.future.done():
            self.future.set_result(result)
        if self.timer is not None and self.timer is not asyncio.current_task():
            self.timer.cancel()


@dataclass
class Watch:
    """A trainer's watch on the sample of version `index` (relaunch when all of it is gone)."""

    index: int
    base_round: int
    sample: list[str]
    contributors: list[str]
    since: float


@dataclass(frozen=True)
class Layout:
    """How a model is laid out for secure aggregation: its floating entries, in a fixed order, as one vector.

    Floating entries are what secure aggregation sums (as ``model - base``); others (integer buffers) keep
    the base's value. `extras`: with ``vca``, one variance per floating entry appended to each input.
    """

    float_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dim: int
    extras: int

    @classmethod
    def of(cls, spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], rule: str) -> Layout:
        """The layout of models with `spec` (name -> (shape, dtype)) under `rule`."""
        names = tuple(sorted(n for n, (_, dtype) in spec.items() if dtype.is_floating_point))
        shapes = tuple(tuple(spec[n][0]) for n in names)
        return cls(names, shapes, sum(math.prod(sh) for sh in shapes), len(names) if rule == "vca" else 0)


class Core:
    """One node's MoDeST state, shared by its roles (see the module docstring).

    Args:
        settings: the run's MoDeST settings.
        transport: the node's transport (its peer id is this node's).
        directory: the long-term membership.
        trainer: the local model and data.
        compute: where training and aggregation run.
        rng: the node's random stream (advertisement targets).
    """

    def __init__(self, settings: ModestSettings, *, transport: Transport, directory: PeerDirectory,
                 trainer: Trainer, compute: Compute, rng: random.Random) -> None:
        self.settings = settings
        self.transport = transport
        self.directory = directory
        self.trainer = trainer
        self.compute = compute
        self.rng = rng
        #: The round estimate: the highest model version this node has seen evidence of.
        self.round = 0
        #: Suspicion scores of the trainers this node aggregated (`p2pnode.protocols.suspicion`).
        self.suspicion = SuspicionTracker(settings.suspicion_decay)
        self.me = transport.peer_id
        self.me_short = short(self.me)
        self.view = View(self.me, settings.inactivity_threshold)
        self.health = PeerHealth()
        #: The fixed aggregator (fl's server), or None for MoDeST.
        self.server: str | None = settings.fixed_aggregator
        self.counters: Counter[str] = Counter()
        self.spec = trainer.spec
        info = rule_info(settings.rule)
        self.needs_updates = info.needs_updates
        #: The run's wire format (refused with secagg when lossy).
        self.compression = check_combination(settings.compression, secagg=settings.secagg is not None)
        #: Lossy compression: trainers upload ``model - base`` (compressed with `feedback`), not the model.
        self.upload_updates = self.compression.lossy and settings.secagg is None
        #: Error feedback of this node's uploads (one stream: each trainer's residual goes into its next update).
        self.feedback = ErrorFeedback(self.compression)
        #: The format of the versions aggregators send (`model_format`: by default the run's, int8 under topk).
        self.model_compression = model_format(self.compression, settings.model_compression)
        # With secagg the mean of the updates is applied to the base model; so are uploaded updates.
        self.needs_base = (info.needs_updates or settings.outer_lr is not None or settings.secagg is not None
                           or self.upload_updates)
        self.layout = Layout.of(self.spec, settings.rule)
        self.own_index = 0
        self.accepted_round = -1
        self.model_round = 0
        self.held_combined = 1
        self.bases: dict[int, Base] = {}
        self.aggregations: dict[int, Aggregation] = {}
        self.completed_index = 0
        self.digests: dict[int, set[bytes]] = {}
        self.started = False
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.watch: Watch | None = None
        self.events: list[AggregationEvent] = []
        #: The quorum's seam (`RoundProtocol.keep_pre_merge`): keep the model the first load of a round replaces.
        self.keep_pre_merge = False
        self.in_round = False
        self.pre_merge: State | None = None

    @property
    def spread(self) -> bool:
        """Whether secure groups are spread over the aggregators: ``G > 1`` groups and ``a > 1`` aggregators
        (modest; fl has one server). Group ``g`` is aggregated by the aggregator at position ``g mod a`` of the
        trainers' list, and the aggregators exchange their group sums (`ModestGroupSums`)."""
        s = self.settings
        return s.secagg is not None and s.secagg_groups > 1 and s.aggregators > 1 and self.server is None

    def load_model(self, state: State) -> None:
        """Load `state` into the trainer (call on the compute thread). With `keep_pre_merge`, the first load
        during a round keeps the model it replaces, for the node's quorum (`RoundReport.pre_merge`)."""
        if self.keep_pre_merge and self.in_round and self.pre_merge is None:
            self.pre_merge = self.trainer.state()
        self.trainer.load_state(state)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def note_round(self, r: int) -> None:
        if r > self.round:
            self.round = r

    def heard(self, sender: str, r: int) -> None:
        """`sender` showed it is alive at round estimate `r`."""
        self.note_round(r)
        self.view.heard_from(sender, self.round)
        self.health.heard_from(sender, self.round)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background (cancelled on close; a failure is logged)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: background task failed", self.me_short, exc_info=task.exception())

    def key(self, index: int, grandparent: bytes) -> bytes:
        """The ordering key of round `index`: the digest of version ``index - 2`` (``sample_key=model``, index >= 3).

        Two rounds back rather than one: two versions ``index - 1`` that split off one version
        ``index - 2`` (an aggregator that crashed before acknowledging, so that its trainers went to the
        next one) then still share the aggregators of ``index``, which merges them again.
        """
        return grandparent if self.settings.sample_key == "model" and index >= 3 else b""

    def know(self, round_: int, digest: bytes) -> None:
        """Remember that model version `round_` has `digest` (checks of secure-aggregation claims use it).

        Fed from the models this node received or built, not from trainers' uploads: a claimant must not
        be able to vouch for its own key.
        """
        if round_ < 0 or len(digest) != 32:
            return
        self.digests.setdefault(round_, set()).add(digest)
        if len(self.digests) > 16:
            for r in sorted(self.digests)[:-16]:
                del self.digests[r]

    def active_count(self) -> int:
        active = self.view.active(self.round)
        return len([p for p in active if p != self.server])

    def threshold(self) -> int:
        """Models an aggregation waits for."""
        # A swarm smaller than s would never fill a sample: cap by the trainers this node knows of.
        return max(1, min(self.settings.threshold,
                          math.floor(self.settings.success_fraction * self.active_count() + 1e-9)))

    def exclude(self, extra: Iterable[str] = ()) -> set[str]:
        """`extra` and the fixed server: peers that are never candidates of a sample."""
        out = set(extra)
        if self.server is not None:
            out.add(self.server)
        return out

    def prune_bases(self) -> None:
        keep = {self.model_round, self.model_round - 1, self.completed_index, self.completed_index - 1}
        if self.watch is not None:
            keep.add(self.watch.base_round)
        for r in [r for r in self.bases if r not in keep]:
            del self.bases[r]

    def report(self, role: str, *, train_loss: float = math.nan, failures: int = 0,
               partner: str | None = None) -> RoundReport:
        """The report of the round just done, with the aggregations completed since the last report."""
        events, self.events = self.events, []
        last = events[-1] if events else None
        combined = len(last.contributors) if last else self.held_combined
        return RoundReport(round=self.round, train_loss=float(train_loss),
                           test_loss=last.test_loss if last else None, accuracy=last.accuracy if last else None,
                           peers=len(self.view.active(self.round)) - 1, combined=combined,
                           fraction=merged_fraction(combined > 1), partner=partner, failures=failures,
                           extra=RoundExtra(role=role, aggregated=[e.index for e in events]))


def decoded(wire: Mapping[str, CompressedTensor]) -> State:
    """The tensors a receiver decodes from `wire` (what the sender keeps when it must hold the same bytes)."""
    return {k: decompress(v) for k, v in wire.items()}


def initial_version(core: Core) -> State:
    """Version 0 as the trainers of the first sample hold it: the run's common initial model (the trainer's).

    Under a lossy model format it is kept as decoded from that format, as every later version is (the
    encoding is a deterministic function of the model's bytes, so every trainer of the first sample gets
    the same tensors and digest): base pulls, top-ups and relaunches of version 0 then travel compressed
    too (`Versions.message`).
    """
    state = core.trainer.state()
    if not core.model_compression.lossy:
        return state
    return decoded(compress_state(state, core.model_compression))
