"""MoDeST: decentralized sampling that emulates federated learning without a server.

Spec: ``algorithms.md`` section 3 (de Vos, Dhasade, Kermarrec, Lavoie, Pouwelse, Sharma: "MoDeST:
Mostly-Consistent Decentralized Sampling Training", arXiv 2302.13837; the latest variant of the authors'
code, with aggregator acknowledgements and the liveness rule). Protocol notes and design choices:
``docs/protocols.md``.

Rounds. Round ``k`` is model version ``k``. Version 0 is the run's common initial model. The sample
``S_k`` (``sample_size`` nodes) trains version ``k``; each trainer sends its trained model to the
aggregators ``A_{k+1}`` (``aggregators`` nodes), which combine ``floor(success_fraction * s)`` of them
with the configured rule (and the optional outer optimizer) into version ``k+1``, send it to
``S_{k+1}``, and acknowledge the trainers. Both lists come from one pure function,
`candidate_order` (SHA-256 of peer id and round), over the node's population view
(`p2pnode.protocols.membership.View`), skipping candidates that do not answer a ping.

Nodes are reactive: a node only works when a model reaches it. `ModestProtocol.run_round` therefore
waits for the next model (at most ``idle_timeout_s``), trains it, uploads it, waits for the
acknowledgement, and returns; a node that gets no model returns an idle report after the timeout. The
aggregator role runs in the background, driven by the uploads it receives.

Recovery (our additions, where the spec leaves the swarm stuck; see ``docs/protocols.md``):

- *top-up*: an aggregator whose deadline passes with fewer than ``liveness_min`` models fetches the
  base model from a contributor and sends it to fresh live candidates, at most ``max_topups`` times;
  then it aggregates what it has rather than drop the round (a dropped round leaves no one with a
  newer model, and training would stop for good);
- *relaunch*: a trainer whose update went into version ``k+1`` watches the sample of ``k+1``; if none of
  its members answers pings, the first live contributor (lowest peer id) sends version ``k`` again, as
  version ``k+1``, to a fresh sample.

Sample grinding. Peer ids are self-chosen, so a Sybil could pick ids that hash to the top of future
orderings. With ``sample_key="model"`` (default) the order of round ``k >= 3`` is keyed by the SHA-256
of model version ``k-2``, which nobody knows before aggregation ``k-2`` completes; an id must be in the
views before then (a join takes effect at the next model send), so ids cannot be chosen against the key.
The trainers of ``k-1`` (their model carries its parent's digest) and the aggregators of ``k`` (every
update carries it) derive the same key, so samples stay consistent; two rounds back rather than one so
that two versions ``k-1`` split off one version ``k-2`` still meet at the same aggregator of ``k``.
The aggregator of ``k-2`` could still grind its model's bytes to steer round ``k``: see docs/protocols.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.aggregation import OuterOptimizer, aggregate_states, rule_info
from p2pnode.discovery import PeerDirectory, PeerInfo
from p2pnode.errors import AggregationError, BadMessage, ConfigError, PeerUnreachable, TransportError
from p2pnode.proto import peer_pb2
from p2pnode.protocols.adversary import Attacker, TrainedHook
from p2pnode.protocols.base import PeerHealth, RoundReport
from p2pnode.protocols.compute import Compute
from p2pnode.protocols.membership import JOIN, LEAVE, MAX_WIRE_NUMBER, Entry, View, from_proto, initial_view
from p2pnode.protocols.suspicion import DEFAULT_DECAY, DEFAULT_THRESHOLD, SuspicionTracker
from p2pnode.secagg import (
    Contribution,
    SecAggError,
    SecAggHost,
    SecAggResult,
    SecAggSettings,
    SecAggUser,
    Session,
    SessionClaim,
    Stage,
    check_rule_compatible,
    layer_variances,
    plan,
    split_layers,
    variance_correct,
)
from p2pnode.secagg import keys as secagg_keys
from p2pnode.secagg.aggregator import SecAggAggregator
from p2pnode.secagg.groups import DEFAULT_MIN_GROUP, check_groups, group_of, groups_needed, split_groups
from p2pnode.secagg.randomness import Randomness, SystemRandomness
from p2pnode.secagg.settings import SUM_RULES
from p2pnode.secagg.state import UserReport
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Message, Transport
from p2pnode.transport.codec import check_tensors

logger = logging.getLogger(__name__)

PING = "modest.ping"
MEMBERSHIP = "modest.membership"
MODEL = "modest.model"
UPDATE = "modest.update"
BASE = "modest.base"
GROUP_SUMS = "modest.group_sums"
#: Prefix of the outer optimizer's state tensors, which travel with a model.
OUTER_PREFIX = "outer/"
#: Largest sample a model message may list, and longest peer id in it (characters).
MAX_SAMPLE = 4096
MAX_PEER_ID = 256
#: Transport refusal code of a secure-aggregation claim that the sample order does not support.
WRONG_SAMPLE = "wrong_sample"
#: Versions whose group sums from other aggregators a node keeps (spread secure groups), the newest.
_REMOTE_VERSIONS = 8

State = dict[str, torch.Tensor]


def candidate_order(peer_ids: Sequence[str], round: int, *, key: bytes = b"") -> list[str]:
    """The order in which peers are considered for the sample and aggregators of `round`.

    Peers (duplicates removed) sorted by ``SHA-256(key || utf8(peer_id) || b"-" || ascii(round))``, ties
    by peer id. A pure function of its arguments: every node with the same view derives the same
    order. With the default empty `key` this is the reference ordering with SHA-256 instead of MD5.
    """
    suffix = b"-" + str(int(round)).encode("ascii")
    return sorted(sorted(set(peer_ids)), key=lambda p: hashlib.sha256(key + p.encode("utf-8") + suffix).digest())


def model_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over a model's entries (sorted names, dtypes, shapes and raw bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return h.digest()


@dataclass
class ModestSettings:
    """Settings of MoDeST (and of `fl`, which is MoDeST with a fixed aggregator).

    The authors' defaults are given in brackets where ours differ (``algorithms.md`` 3.5).

    :param run_id: the run; requests from other runs are refused (``wrong_run``).
    :param config_hash: hash of the run-wide config; requests with another hash are refused.
    :param local_steps: minibatch steps per training (the authors: one local epoch, batch 20).
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
    """

    run_id: str
    config_hash: str
    local_steps: int
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

    @property
    def threshold(self) -> int:
        """Models an aggregator waits for: ``max(1, floor(sf * s))``."""
        return max(1, math.floor(self.success_fraction * self.sample_size + 1e-9))


@dataclass
class AggregationEvent:
    """One completed aggregation, as the aggregator saw it.

    :param index: the model version produced.
    :param aggregator: the aggregator's peer id.
    :param contributors: trainers whose models were combined, sorted.
    :param sample: peers that accepted the new model (the next sample), in arrival order.
    :param train_loss: mean training loss reported by the contributors.
    :param accuracy: accuracy of the new model on the test split, or None when not evaluated.
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
class _Incoming:
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
class _Base:
    """A model version this node holds (to train from, to serve to aggregators, to send again)."""

    round: int
    digest: bytes
    state: State
    outer: State
    parent: bytes  # digest of version round - 1
    combined: int


@dataclass
class _Upload:
    state: State
    base_digest: bytes
    parent_digest: bytes
    train_loss: float
    #: Spread secure groups: the aggregators of the version in the trainer's order.
    aggregators: tuple[str, ...] = ()


def _short(peer_id: str) -> str:
    """A peer id for logs: libp2p ids are long, so their last 8 characters."""
    return peer_id if len(peer_id) <= 12 else peer_id[-8:]


def _majority(values: Iterable[bytes]) -> bytes:
    """The most frequent value (ties: the smallest), deterministic."""
    counts = Counter(values)
    return max(sorted(counts), key=lambda d: counts[d]) if counts else b""


def _group_result(mean: torch.Tensor, extras: torch.Tensor, weight_sum: float, survivors: tuple[str, ...],
                  users: int) -> SecAggResult:
    """A secure group's result as another aggregator receives it (`ModestGroupSums`): the mean in float32."""
    mean64, extras64 = mean.to(torch.float32).to(torch.float64), extras.to(torch.float32).to(torch.float64)
    return SecAggResult(weighted_sum=mean64 * weight_sum, extras_sum=extras64 * weight_sum, weight_sum=weight_sum,
                        survivors=survivors, dropped={}, users=users, neighbours=0, threshold=0, word_bits=0)


def _as_sent(result: SecAggResult) -> SecAggResult:
    """`result` as the other aggregators receive it (`_group_result` of its float32 mean)."""
    return _group_result(result.mean(), result.extras_mean(), result.weight_sum, tuple(sorted(result.survivors)),
                         result.users)


@dataclass
class _Result:
    success: bool
    reason: str
    contributors: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)


class _Aggregation:
    """The state of one aggregation index at one aggregator: open -> completing -> done."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.models: dict[str, _Upload] = {}
        self.state = "open"
        self.topups = 0
        self.future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
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

    def resolve(self, result: _Result) -> None:
        self.state = "done"
        if not self.future.done():
            self.future.set_result(result)
        if self.timer is not None and self.timer is not asyncio.current_task():
            self.timer.cancel()


@dataclass
class _Watch:
    """A trainer's watch on the sample of version `index` (relaunch when all of it is gone)."""

    index: int
    base_round: int
    sample: list[str]
    contributors: list[str]
    since: float


class ModestProtocol:
    """One node's MoDeST rounds over a `Transport` and a `PeerDirectory` (see the module docstring).

    `round` is the node's round estimate: the highest model version it has seen evidence of.
    `on_aggregate`, when set, is called with an `AggregationEvent` after each aggregation this node
    completes (the simulator uses it to record rounds). `counters` counts protocol events:
    ``aggregations``, ``topups``, ``relaunches``, ``resends``, ``late``, ``aborted``, ``degraded_rounds``,
    ``base_pulls``; with secure aggregation also ``secagg_rounds`` (completed), ``secagg_aborted`` (below
    the threshold: not applied), ``secagg_refused`` (claims of a sample that `candidate_order` does not
    support, or from a peer outside it), ``secagg_no_sample`` (a model without a sample naming this node),
    ``secagg_competing_claims`` (an instance opened beside another of the same group, from a claim with
    another member list), ``secagg_candidates_aborted`` (such an instance that aborted while another ran),
    and with groups spread over the aggregators ``secagg_remote_groups`` (group sums of other aggregators
    combined here).
    `secagg_silent_from`, when set, makes this node's next secure round go silent from that stage on
    (fault injection for the simulator and the tests). `secagg_randomness`: the secret randomness of
    this node's secagg users (default: the OS CSPRNG; the simulator passes a seeded stream).

    `secagg_identity`: this node's long-term Ed25519 key (default None). With it and an `authenticated`
    directory, the secure aggregation binds every member's ephemeral keys to its identity end to end:
    the node announces the public half in its directory record (`secagg_public_key`), learns the
    members' keys only from their own records, signs its advertised keys, and its users and its
    aggregator verify every member's signature, so an aggregator that relays keys cannot substitute
    them. A member whose key it does not know cannot take part (counter ``secagg_unknown_key``: one per
    such member each time this node sets up a sample as trainer or aggregator). Without the key or with
    unsigned records the binding is the transport's authenticated sender (`secagg_binding` says which).
    """

    def __init__(self, settings: ModestSettings, *, transport: Transport, directory: PeerDirectory,
                 trainer: Trainer, compute: Compute, rng: random.Random,
                 secagg_randomness: Randomness | None = None, attacker: Attacker | None = None,
                 secagg_identity: Ed25519PrivateKey | None = None) -> None:
        self.settings = settings
        self.transport = transport
        self.directory = directory
        self.trainer = trainer
        self.compute = compute
        self.rng = rng
        self.round = 0
        #: A Byzantine node's forging of the models it uploads as a trainer (None: honest).
        self.attacker = attacker
        #: Called after each local training with (version, start model, trained model); the simulator's
        #: omniscient attackers read honest updates through it. Never set in the daemon.
        self.on_trained: TrainedHook | None = None
        #: Suspicion scores of the trainers this node aggregated (`p2pnode.protocols.suspicion`).
        self.suspicion = SuspicionTracker(settings.suspicion_decay)
        self.me = transport.peer_id
        self._me_short = _short(self.me)
        self.view = View(self.me, settings.inactivity_threshold)
        self.health = PeerHealth()
        self.server: str | None = settings.fixed_aggregator
        self.on_aggregate: Callable[[AggregationEvent], None] | None = None
        self.counters: Counter[str] = Counter()
        self._spec = trainer.spec
        info = rule_info(settings.rule)
        self._needs_updates = info.needs_updates
        self._needs_base = info.needs_updates or settings.outer_lr is not None
        self._secagg = settings.secagg
        # Secret randomness of this node's secagg users: the OS CSPRNG unless a seeded stream is given (the
        # simulator, for reproducible runs; never in a real run: the seed is public).
        self._secagg_rnd: Randomness = secagg_randomness if secagg_randomness is not None else SystemRandomness()
        self._host: SecAggHost | None = None
        # Identity binding only where a record's key is bound to its peer id: with unsigned records anyone
        # could announce a key in another peer's name, which is no better than the transport's binding.
        self._identity = secagg_identity if settings.secagg is not None and directory.authenticated else None
        #: Members' Ed25519 public keys by peer id, each read from that member's own directory record.
        self._identity_keys: dict[str, bytes] = {}
        if self._identity is not None:
            self._identity_keys[self.me] = secagg_keys.public_identity_key(self._identity)
        self._keys_read_at = -math.inf
        self._keys_refresh: asyncio.Task[None] | None = None
        #: Called with (version trained, report) for each secagg user of this node once it ends (tests, research).
        self.on_secagg_report: Callable[[int, UserReport], None] | None = None
        self.secagg_silent_from: Stage | None = None
        #: Called on a trainer with (round, its own contribution) before it is masked (tests, research).
        self.on_secagg_input: Callable[[int, Contribution], None] | None = None
        # Floating entries, in a fixed order, are what secure aggregation sums (as model - base); others
        # (integer buffers) keep the base's value.
        self._float_names = sorted(n for n, (_, dtype) in self._spec.items() if dtype.is_floating_point)
        self._dim = sum(math.prod(self._spec[n][0]) for n in self._float_names)
        self._vca_extras = len(self._float_names) if settings.rule == "vca" else 0
        self._digests: dict[int, set[bytes]] = {}
        self._refused: set[tuple[int, str]] = set()
        # Spread secure groups: group sums from the other aggregators of a version, by version and
        # (group, sender): the base digest they apply to and the sum (None: the sender left the group out).
        self._remote_groups: dict[int, dict[tuple[int, str], tuple[bytes, SecAggResult | None]]] = {}
        self._remote_arrived = asyncio.Event()
        if self._secagg is not None:
            if settings.secagg_groups > 1:
                check_groups(settings.rule, settings.rule_params, settings.secagg_groups, settings.sample_size,
                             self._secagg.threshold, min_group=settings.secagg_min_group)
            else:
                check_rule_compatible(settings.rule)
            self._needs_base = True  # the mean of the updates is applied to the base model
            self._host = SecAggHost(transport)
            self._host.on_unopened = self._on_claim
            if self._identity is None:
                logger.info("%s: secure aggregation binds keys to the transport's authenticated sender only (%s)",
                            self._me_short, "unsigned directory records" if secagg_identity is not None
                            else "no secagg identity key")
        self._own_index = 0
        self._inbox: _Incoming | None = None
        self._wake = asyncio.Event()
        self._accepted_round = -1
        self._model_round = 0
        self._held_combined = 1
        self._bases: dict[int, _Base] = {}
        self._aggregations: dict[int, _Aggregation] = {}
        self._completed_index = 0
        self._started = False
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch: _Watch | None = None
        self._last_dir_refresh = -math.inf
        self._events: list[AggregationEvent] = []
        transport.register(PING, peer_pb2.ModestPing, self._on_ping)
        transport.register(MEMBERSHIP, peer_pb2.ModestAdvert, self._on_membership)
        transport.register(MODEL, peer_pb2.ModestModel, self._on_model)
        transport.register(UPDATE, peer_pb2.ModestUpdate, self._on_update)
        transport.register(BASE, peer_pb2.ModestBaseRequest, self._on_base)
        transport.register(GROUP_SUMS, peer_pb2.ModestGroupSums, self._on_group_sums)

    # -- secagg identity keys --------------------------------------------------------------------------
    @property
    def secagg_binding(self) -> str:
        """How members' secagg keys are bound: ``identity`` (Ed25519, end to end), ``transport``, or ``off``."""
        if self._secagg is None:
            return "off"
        return "identity" if self._identity is not None else "transport"

    @property
    def secagg_public_key(self) -> bytes:
        """The raw Ed25519 public key this node announces in its record; empty without identity binding."""
        return self._identity_keys.get(self.me, b"") if self._identity is not None else b""

    def _learn_keys(self, peers: Iterable[PeerInfo]) -> None:
        """Take the members' identity keys from their directory records (bound to their peer ids)."""
        if self._identity is None:
            return
        self._keys_read_at = self._now()
        for info in peers:
            if len(info.secagg_key) == secagg_keys.KEY_BYTES and info.peer_id != self.me:
                # The latest signed record wins: a peer that replaced its key announces the new one.
                self._identity_keys[info.peer_id] = info.secagg_key

    def _keys_stale(self, members: Iterable[str]) -> bool:
        """Whether some member's key is unknown and the directory was not read within a ping timeout.

        The rate limit keeps a member without a record (crashed, or running without a key) from making
        every round read the directory again.
        """
        return self._directory_stale(m not in self._identity_keys for m in members)

    def _directory_stale(self, missing: Iterable[bool]) -> bool:
        """Whether something is `missing` and the directory was not read within a ping timeout."""
        return any(missing) and self._now() - self._keys_read_at >= self.settings.ping_timeout_s

    def _reading_directory(self) -> bool:
        """Whether a background read of the directory (`_read_directory_soon`) is running."""
        return self._keys_refresh is not None and not self._keys_refresh.done()

    def _read_directory_soon(self) -> None:
        """Read the directory (views and keys) in the background, unless a read is already running."""
        if self._keys_refresh is None or self._keys_refresh.done():
            self._keys_refresh = self._spawn(self._read_keys())

    async def _read_keys(self) -> None:
        """Read the directory now (views and keys); a failure leaves the keys as they were."""
        await self._refresh_from_directory(force=True)
        # Also after a failed read: the rate limit then lets the round go on with the keys it has.
        self._keys_read_at = self._now()

    def _keys_for(self, members: Iterable[str], *, index: int, role: str) -> dict[str, bytes] | None:
        """The identity keys of `members` for the secure aggregation of version `index` (None: no binding).

        Members whose key is unknown are left out: they cannot take part (counted and logged).
        """
        if self._identity is None:
            return None
        members = list(members)
        known = {m: self._identity_keys[m] for m in members if m in self._identity_keys}
        unknown = [m for m in members if m not in known]
        if unknown:
            self.counters["secagg_unknown_key"] += len(unknown)
            logger.warning("%s: no signed identity key known for %d member(s) of the secure aggregation of "
                           "version %d (as %s), e.g. %s: they cannot take part", self._me_short, len(unknown),
                           index, role, _short(unknown[0]))
        return known

    # -- small helpers ------------------------------------------------------------------------------
    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _note_round(self, r: int) -> None:
        if r > self.round:
            self.round = r

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: background task failed", self._me_short, exc_info=task.exception())

    def _key(self, index: int, grandparent: bytes) -> bytes:
        """The ordering key of round `index`: the digest of version ``index - 2`` (``sample_key=model``, index >= 3).

        Two rounds back rather than one: two versions ``index - 1`` that split off one version
        ``index - 2`` (an aggregator that crashed before acknowledging, so that its trainers went to the
        next one) then still share the aggregators of ``index``, which merges them again.
        """
        return grandparent if self.settings.sample_key == "model" and index >= 3 else b""

    def _know(self, round_: int, digest: bytes) -> None:
        """Remember that model version `round_` has `digest` (checks of secure-aggregation claims use it).

        Fed from the models this node received or built, not from trainers' uploads: a claimant must not
        be able to vouch for its own key.
        """
        if round_ < 0 or len(digest) != 32:
            return
        self._digests.setdefault(round_, set()).add(digest)
        if len(self._digests) > 16:
            for r in sorted(self._digests)[:-16]:
                del self._digests[r]

    def _active_count(self) -> int:
        active = self.view.active(self.round)
        return len([p for p in active if p != self.server])

    def _threshold(self) -> int:
        # A swarm smaller than s would never fill a sample: cap by the trainers this node knows of.
        return max(1, min(self.settings.threshold,
                          math.floor(self.settings.success_fraction * self._active_count() + 1e-9)))

    def _exclude(self, extra: Iterable[str] = ()) -> set[str]:
        out = set(extra)
        if self.server is not None:
            out.add(self.server)
        return out

    def _prune_bases(self) -> None:
        keep = {self._model_round, self._model_round - 1, self._completed_index, self._completed_index - 1}
        if self._watch is not None:
            keep.add(self._watch.base_round)
        for r in [r for r in self._bases if r not in keep]:
            del self._bases[r]

    def _outer_tensors(self, outer: Mapping[str, torch.Tensor]) -> State:
        # 0-d tensors (the step counter) travel as shape (1,): the wire codec cannot view a 0-d int64 as bytes.
        return {OUTER_PREFIX + k: (v.reshape(1) if v.dim() == 0 else v) for k, v in outer.items()}

    # -- checks of incoming messages -----------------------------------------------------------------
    def _check_run(self, sender: str, body: Any) -> None:
        if body.run_id != self.settings.run_id or body.config_hash != self.settings.config_hash:
            raise BadMessage(f"{sender} is in run {body.run_id!r} with config {body.config_hash!r}; this node is "
                             f"in run {self.settings.run_id!r} with config {self.settings.config_hash!r}",
                             code="wrong_run")

    def _check_round(self, *values: int) -> None:
        if any(v >= MAX_WIRE_NUMBER for v in values):
            raise BadMessage("round number out of range", code="malformed")

    def _split_model(self, tensors: Mapping[str, torch.Tensor], *, outer_allowed: bool) -> tuple[State, State]:
        """Check a received model (and its outer optimizer state); raise `BadMessage` when malformed."""
        model = {k: v for k, v in tensors.items() if not k.startswith(OUTER_PREFIX)}
        outer = {k[len(OUTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(OUTER_PREFIX)}
        check_tensors(model, self._spec)
        if outer and not (outer_allowed and self.settings.outer_lr is not None):
            raise BadMessage("unexpected outer optimizer state in this message", code="bad_shape")
        for name, t in outer.items():
            if name == "steps":
                if t.dtype != torch.int64 or t.numel() != 1 or t.dim() > 1 or int(t.reshape(())) < 0:
                    raise BadMessage("outer optimizer 'steps' must be a non-negative int64 scalar", code="bad_shape")
                continue
            param = name[len("momentum/"):] if name.startswith("momentum/") else None
            if param is None or param not in self._spec:
                raise BadMessage(f"unknown outer optimizer entry {name[:60]!r}", code="bad_shape")
            if tuple(t.shape) != self._spec[param][0] or not t.is_floating_point():
                raise BadMessage(f"outer optimizer entry {name[:60]!r} has the wrong shape or dtype", code="bad_shape")
            if not bool(torch.isfinite(t).all()):
                raise BadMessage(f"outer optimizer entry {name[:60]!r} holds NaN or Inf", code="non_finite")
        return model, outer

    def _merge_view(self, msg: peer_pb2.MembershipView, claimed_round: int) -> None:
        entries = from_proto(msg, max_round=claimed_round)
        mine = entries.pop(self.me, None)
        if mine is not None and not self._closing and (
                mine.index > self._own_index or (mine.index == self._own_index and mine.status == LEAVE)):
            # Someone holds a newer entry for us (a forged or outdated LEAVE): refute it with a larger index.
            self._own_index = mine.index + 1
            self.view.set(self.me, Entry(self.round, self._own_index, JOIN))
        self.view.merge(entries)
        self._note_round(self.view.max_active_round())

    def _heard(self, sender: str, r: int) -> None:
        self._note_round(r)
        self.view.heard_from(sender, self.round)
        self.health.heard_from(sender, self.round)

    # -- handlers -----------------------------------------------------------------------------------
    async def _on_ping(self, sender: str, msg: Message[Any]) -> Message[Any]:
        body: peer_pb2.ModestPing = msg.body
        self._check_run(sender, body)
        self._check_round(body.round_estimate)
        self._heard(sender, body.round_estimate)
        return Message(peer_pb2.ModestPong(round_estimate=self.round, index=self._own_index,
                                           model_round=self._model_round))

    async def _on_membership(self, sender: str, msg: Message[Any]) -> Message[Any]:
        body: peer_pb2.ModestAdvert = msg.body
        self._check_run(sender, body)
        self._check_round(body.round_estimate, body.index)
        if body.status == JOIN:
            self._note_round(body.round_estimate)
            self.view.receive_join(sender, Entry(self.round, body.index, JOIN))
            self.health.heard_from(sender, self.round)
            return Message(peer_pb2.ModestAdvertAck(round_estimate=self.round, view=self.view.to_proto()))
        if body.status == LEAVE:
            self.view.receive_leave(sender, Entry(self.round, body.index, LEAVE))
            return Message(peer_pb2.ModestAdvertAck(round_estimate=self.round))
        raise BadMessage(f"unknown membership status {body.status}", code="malformed")

    async def _on_model(self, sender: str, msg: Message[Any]) -> Message[Any]:
        body: peer_pb2.ModestModel = msg.body
        self._check_run(sender, body)
        self._check_round(body.round, body.round_estimate)
        model, outer = self._split_model(msg.tensors, outer_allowed=True)
        if len(body.sample) > MAX_SAMPLE or any(len(p) > MAX_PEER_ID for p in body.sample):
            raise BadMessage(f"the sample of version {body.round} lists {len(body.sample)} peers (at most "
                             f"{MAX_SAMPLE}) or an over-long peer id", code="oversized")
        if len(body.sample_key) > 64:
            raise BadMessage(f"sample_key: {len(body.sample_key)} bytes, at most 64", code="oversized")
        self._merge_view(body.view, max(body.round_estimate, body.round))
        self._heard(sender, max(body.round_estimate, body.round))
        self._know(int(body.round) - 1, bytes(body.parent_digest))
        accepted = self._offer(_Incoming(int(body.round), model, outer, sender, bytes(body.parent_digest),
                                         max(1, int(body.combined)), tuple(body.sample), bytes(body.sample_key)))
        return Message(peer_pb2.ModestModelAck(accepted=accepted, round_estimate=self.round))

    async def _on_update(self, sender: str, msg: Message[Any]) -> Message[Any]:
        body: peer_pb2.ModestUpdate = msg.body
        self._check_run(sender, body)
        self._check_round(body.round, body.round_estimate)
        if self._secagg is not None or body.secure:
            # With secagg an update travels only masked: refuse one in the clear (and the converse).
            if self._secagg is None:
                raise BadMessage("secure update, but this run does not use secure aggregation", code="malformed")
            if not body.secure or msg.tensors:
                raise BadMessage("update in the clear, but this run uses secure aggregation: the trained model "
                                 "must travel masked (secagg)", code="malformed")
            model: State = {}
        else:
            model, _ = self._split_model(msg.tensors, outer_allowed=False)
        if not math.isfinite(body.train_loss):
            raise BadMessage("train_loss is not finite", code="non_finite")
        self._merge_view(body.view, max(body.round_estimate, body.round))
        self._heard(sender, max(body.round_estimate, body.round))
        if len(body.aggregators) > self.settings.aggregators or any(len(a) > MAX_PEER_ID for a in body.aggregators):
            raise BadMessage(f"the update lists {len(body.aggregators)} aggregators (at most "
                             f"{self.settings.aggregators}) or an over-long peer id", code="oversized")
        result = await self._receive_update(sender, int(body.round), model, bytes(body.base_digest),
                                            bytes(body.parent_digest), float(body.train_loss),
                                            secure=self._secagg is not None, aggregators=tuple(body.aggregators))
        return Message(result)

    async def _on_base(self, sender: str, msg: Message[Any]) -> Message[Any]:
        body: peer_pb2.ModestBaseRequest = msg.body
        self._check_run(sender, body)
        base = self._bases.get(int(body.round))
        if base is None or (body.digest and bytes(body.digest) != base.digest):
            return Message(peer_pb2.ModestBaseResponse(found=False, round=body.round))
        return Message(peer_pb2.ModestBaseResponse(found=True, round=body.round),
                       {**base.state, **self._outer_tensors(base.outer)})

    # -- receiving models ---------------------------------------------------------------------------
    def _offer(self, inc: _Incoming) -> bool:
        """Take `inc` as the next model to train if it is newer than any accepted so far."""
        if self._closing or inc.round <= self._accepted_round:
            return False
        self._accepted_round = inc.round
        self._inbox = inc
        self._note_round(inc.round)
        if self._watch is not None and inc.round >= self._watch.index:
            self._watch = None
        self._wake.set()
        return True

    async def _next_model(self, timeout: float) -> _Incoming | None:
        if self._inbox is None:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        inc, self._inbox = self._inbox, None
        return inc

    # -- membership ---------------------------------------------------------------------------------
    def _fanout(self, population: int) -> int:
        if self.settings.join_fanout is not None:
            return min(self.settings.join_fanout, population)
        return min(10 * self.settings.sample_size, population)

    async def _advertise(self, status: int) -> None:
        """Tell a random subset of the view about our join or leave; merge the views that come back."""
        self._own_index += 1
        self.view.set(self.me, Entry(self.round, self._own_index, status))
        others = [p for p in self.view.joined() if p != self.me]
        targets = self.rng.sample(others, self._fanout(len(others)))
        body = peer_pb2.ModestAdvert(run_id=self.settings.run_id, config_hash=self.settings.config_hash,
                                     status=status, index=self._own_index,  # type: ignore[arg-type]
                                     round_estimate=self.round)

        async def tell(peer: str) -> None:
            try:
                resp = await self.transport.call(peer, MEMBERSHIP, Message(body), peer_pb2.ModestAdvertAck,
                                                 timeout=self.settings.ping_timeout_s)
            except TransportError as e:
                logger.debug("%s: advert to %s failed: %s", self._me_short, _short(peer), e)
                return
            if status == JOIN:
                try:
                    self._merge_view(resp.body.view, resp.body.round_estimate)
                except BadMessage as e:
                    self.transport.reject(peer, e.code, str(e))
                    return
                self._heard(peer, resp.body.round_estimate)

        await asyncio.gather(*(tell(p) for p in targets))

    async def _refresh_from_directory(self, *, force: bool = False) -> None:
        """Long-term membership: peers listed in the directory are alive; unknown ones join (pending)."""
        now = self._now()
        if not force and now - self._last_dir_refresh < self.settings.idle_timeout_s / 2:
            return
        self._last_dir_refresh = now
        try:
            peers = await self.directory.peers()
        except Exception as e:  # a slow or stale directory must not stop the protocol: views carry on
            logger.warning("%s: peer directory unavailable: %s", self._me_short, e)
            return
        self._learn_keys(peers)
        for info in peers:
            if info.peer_id in self.view:
                self.view.heard_from(info.peer_id, self.round)
            else:
                self.view.receive_join(info.peer_id, Entry(self.round, 0, JOIN))

    async def _start(self) -> None:
        """First round: bootstrap from the directory, or join a swarm already in progress."""
        self._started = True
        try:
            peers = await self.directory.peers()
        except Exception as e:
            logger.warning("%s: peer directory unavailable at start: %s", self._me_short, e)
            peers = []
        self._learn_keys(peers)
        self._last_dir_refresh = self._now()
        progress = max((p.round for p in peers), default=0)
        if progress > 0:
            self._note_round(progress)
            for p in peers:
                self.view.set(p.peer_id, Entry(p.round, 0, JOIN))
            await self._advertise(JOIN)
            if self.server is None and self.settings.fixed_aggregator_auto:
                self.server = min(self.view)
            logger.info("%s: joined a run at round %d with %d peers in view", self._me_short, self.round,
                        len(self.view))
            return
        # Merge (not replace): handlers may have run before this node's first round.
        self.view.merge(initial_view(self.me, [p.peer_id for p in peers], round_=0,
                                     inactivity_threshold=self.settings.inactivity_threshold))
        if self.server is None and self.settings.fixed_aggregator_auto:
            self.server = min(self.view)
        # Bootstrap: the first s of the initial ordering train version 0, without pings.
        first = [p for p in candidate_order(self.view.active(0), 0) if p != self.server][:self.settings.sample_size]
        if self.me in first:
            # parent b"", combined 1; the bootstrap sample is the first s candidates, keyed by b"".
            self._offer(_Incoming(0, self.trainer.state(), {}, self.me, sample=tuple(first)))

    async def rejoin(self) -> None:
        """Come back after being unresponsive: forget work in progress and announce a JOIN."""
        self._inbox = None
        self._watch = None
        if not self._started:
            await self._start()
            return
        await self._advertise(JOIN)

    # -- availability -------------------------------------------------------------------------------
    async def _ping(self, peer: str, round_: int) -> peer_pb2.ModestPong | None:
        """Ping `peer` every ``ping_interval_s`` until it answers or ``ping_timeout_s`` passes."""
        s = self.settings
        body = peer_pb2.ModestPing(run_id=s.run_id, config_hash=s.config_hash, round_estimate=self.round,
                                   index=self._own_index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.ping_timeout_s
        while (remaining := deadline - loop.time()) > 0:
            t0 = loop.time()
            try:
                resp = await self.transport.call(peer, PING, Message(body), peer_pb2.ModestPong,
                                                 timeout=min(s.ping_interval_s, remaining))
            except PeerUnreachable:
                # Re-ping on the interval (a fast failure, e.g. no route yet, must not spin).
                await asyncio.sleep(max(0.0, min(s.ping_interval_s - (loop.time() - t0), deadline - loop.time())))
                continue
            except TransportError:
                break
            self._heard(peer, resp.body.round_estimate)
            self.health.succeeded(peer, self.round)
            return resp.body
        self.health.failed(peer, round_)
        return None

    async def _available(self, round_: int, count: int, key: bytes, exclude: Iterable[str] = (), *,
                         ordered: bool = False) -> list[str]:
        """Up to `count` responsive peers of ``candidate_order(active peers, round_, key)``, in arrival order
        (with `ordered`, in candidate order: the same list on every node that found the same peers).

        The first `count` candidates are pinged in parallel; each one that does not answer is replaced by
        the next unused candidate. This node counts as available without a ping. Candidates in back-off
        after a failed ping are skipped without one.
        """
        if count <= 0:
            return []
        skip = set(exclude)
        order = [p for p in candidate_order(self.view.active(round_), round_, key=key) if p not in skip]
        position = {p: i for i, p in enumerate(order)}
        it = iter(order)
        found: list[str] = []
        pending: dict[asyncio.Task[peer_pb2.ModestPong | None], str] = {}
        loop = asyncio.get_running_loop()

        def launch() -> None:
            while len(found) + len(pending) < count:
                p = next(it, None)
                if p is None:
                    return
                if p == self.me:
                    found.append(p)
                elif self.health.usable(p, round_):
                    pending[loop.create_task(self._ping(p, round_))] = p

        launch()
        try:
            while pending and len(found) < count:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: position[pending[t]]):  # deterministic order
                    peer = pending.pop(task)
                    if task.result() is not None and len(found) < count:
                        found.append(peer)
                launch()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return sorted(found, key=position.__getitem__) if ordered else found

    # -- trainer side -------------------------------------------------------------------------------
    async def run_round(self) -> RoundReport:
        """Wait for the next model (at most ``idle_timeout_s``), train it, upload it, and report.

        Returns after the aggregators acknowledged (or the uploads failed), after a newer model
        arrived, or, for a node that got no model, after the idle timeout.
        """
        if not self._started:
            await self._start()
        inc = await self._next_model(self.settings.idle_timeout_s)
        if inc is None:
            await self._on_idle()
            return self._report("idle")
        return await self._train_and_upload(inc)

    async def _train(self, inc: _Incoming) -> tuple[float, State]:
        """Train `local_steps` on the model `inc` carries; return (mean loss, trained state)."""
        s = self.settings

        def work() -> tuple[float, State]:
            # Load and train in one job: nothing (an aggregator's evaluation) may swap the model between.
            self.trainer.load_state(inc.state)
            loss = self.trainer.train(s.local_steps)
            return loss, self.trainer.state()

        result = await self.compute.run(work, cost_s=s.step_cost_s * s.local_steps)
        self._model_round = max(self._model_round, inc.round)
        self._held_combined = inc.combined
        return result

    async def _train_and_upload(self, inc: _Incoming) -> RoundReport:
        if self._secagg is not None:
            return await self._train_and_upload_secure(inc)
        k = inc.round
        loss, trained = await self._train(inc)
        base_digest = model_digest(inc.state)
        self._bases[k] = _Base(k, base_digest, inc.state, inc.outer, inc.parent, inc.combined)
        self._prune_bases()
        if self._accepted_round > k or self._closing:
            self.counters["aborted"] += 1  # a newer model arrived while training: this work is stale
            return self._report("aborted", train_loss=loss)
        if not math.isfinite(loss):
            logger.warning("%s: training diverged in round %d (loss %s); not uploading", self._me_short, k, loss)
            return self._report("diverged", train_loss=loss)
        if self.on_trained is not None:
            self.on_trained(k, inc.state, trained)
        if self.attacker is not None and self.attacker.model_attack:
            trained = await self.attacker.forge(k, inc.state, trained)
        acks = await self._upload(k, trained, loss, base_digest, inc.parent)
        ok = [a for a in acks if a is not None and a[1].success]
        return self._report("trainer", train_loss=loss, failures=len(acks) - len(ok),
                            partner=ok[0][0] if ok else None)

    async def _train_and_upload_secure(self, inc: _Incoming) -> RoundReport:
        """Train version ``k = inc.round`` and contribute ``model - base`` masked to each aggregator of ``k + 1``.

        One `SecAggUser` per aggregator (independent instances), started before training: the advertise
        and share stages and the masks run while the model trains; the update then goes into the masked
        stage, and the metadata (view, digests, loss) goes as a `ModestUpdate` without tensors, whose
        acknowledgement says whether the update is in the mean. No resend to another aggregator: a new
        instance would need the whole sample again.
        """
        s = self.settings
        assert self._secagg is not None and self._host is not None
        k = inc.round
        sample = tuple(dict.fromkeys(inc.sample))
        if self.me not in sample or len(sample) < 2:
            self.counters["secagg_no_sample"] += 1
            logger.warning("%s: version %d came without a sample naming this node; not training it",
                           self._me_short, k)
            return self._report("no_sample")
        index = k + 1
        # With groups, this node's instance holds only its group of the sample (every member derives the
        # same groups from the sample's order); with one group it is the whole sample, as always.
        group, members = 0, sample
        if s.secagg_groups > 1:
            group = group_of(sample, self.me, s.secagg_groups)
            members = split_groups(sample, s.secagg_groups)[group]
            if len(members) < s.secagg_min_group:
                # A sample smaller than G * min_group (peers missing): the group's mean would say too much
                # about each member.
                self.counters["secagg_small_group"] += 1
                logger.warning("%s: group %d of version %d's sample has %d member(s), below secagg_min_group=%d; "
                               "not training it", self._me_short, group, k, len(members), s.secagg_min_group)
                return self._report("no_sample")
        self.view.flush_pending()  # a model send follows: pending joins enter the view that travels with it
        key = self._key(index, inc.parent)
        aggregators = [self.server] if self.server is not None else await self._available(
            index, s.aggregators, key, ordered=self._spread)
        targets = aggregators
        if self._spread and aggregators:
            # Groups spread over the aggregators: this node's group goes to one of them only (the others
            # receive its group's sum from that one), so each trainer uploads once instead of a times.
            targets = [aggregators[group % len(aggregators)]]
        if self._identity is not None and self._keys_stale(members):
            await self._read_keys()  # a member that joined since the last read: its record has its key
        identity_keys = self._keys_for(members, index=index, role="trainer")
        loop = asyncio.get_running_loop()
        training: asyncio.Future[Contribution] = loop.create_future()
        silent, self.secagg_silent_from = self.secagg_silent_from, None
        runs = []
        for a in targets:
            session = Session(s.run_id, index, a, members, dim=self._dim, extras=self._vca_extras, group=group)
            try:
                user = SecAggUser(session, self._secagg, self.transport, local=self._host.dispatch,
                                  randomness=self._secagg_rnd, context=inc.sample_key, stop_before=silent,
                                  identity=self._identity, identity_keys=identity_keys)
            except (ConfigError, SecAggError) as e:
                logger.warning("%s: cannot take part in the secure aggregation of version %d at %s: %s",
                               self._me_short, index, _short(a), e)
                continue
            runs.append(self._spawn(self._run_user(k, user, training)))

        loss, trained = await self._train(inc)
        base_digest = model_digest(inc.state)
        self._know(k, base_digest)
        self._bases[k] = _Base(k, base_digest, inc.state, inc.outer, inc.parent, inc.combined)
        self._prune_bases()
        stale = self._accepted_round > k or self._closing
        if stale or not math.isfinite(loss):
            # No input: the users stop before the masked stage and count as dropped there.
            if runs:
                training.set_exception(SecAggError("no input: training was superseded" if stale
                                                   else "training diverged"))
            else:
                training.cancel()  # nobody awaits it
            await asyncio.gather(*runs, return_exceptions=True)
            if stale:
                self.counters["aborted"] += 1
                return self._report("aborted", train_loss=loss)
            logger.warning("%s: training diverged in round %d (loss %s); not uploading", self._me_short, k, loss)
            return self._report("diverged", train_loss=loss)
        if self.on_trained is not None:
            self.on_trained(k, inc.state, trained)
        if self.attacker is not None and self.attacker.model_attack:
            trained = await self.attacker.forge(k, inc.state, trained)  # masked like an honest update
        # float32 (4 bytes per coordinate): its rounding, below 1e-7 of an update, is far below the fixed-point
        # step (2 clip / 2^22); half and bfloat16 models widen exactly.
        vector = torch.cat([(trained[n].detach().cpu().float() - inc.state[n].detach().cpu().float()).reshape(-1)
                            for n in self._float_names])
        extras = layer_variances([trained[n] for n in self._float_names]) if self._vca_extras else None
        body = peer_pb2.ModestUpdate(run_id=s.run_id, config_hash=s.config_hash, round=k, round_estimate=self.round,
                                     view=self.view.to_proto(), base_digest=base_digest, train_loss=loss,
                                     examples=self.trainer.num_examples, parent_digest=inc.parent, secure=True,
                                     aggregators=aggregators if self._spread else [])
        msg: Message[peer_pb2.ModestUpdate] = Message(body, {})
        tried = set(targets)
        acks_task = asyncio.gather(*(self._deliver(a, msg, k, key, tried, resend=False) for a in targets))
        contribution = Contribution(vector=vector, extras=extras)
        if self.on_secagg_input is not None:
            self.on_secagg_input(k, contribution)
        training.set_result(contribution)
        acks = list(await acks_task)
        await asyncio.gather(*runs, return_exceptions=True)
        ok = [a for a in acks if a is not None and a[1].success]
        completed = [a[1] for a in acks if a is not None and a[1].reason in ("late", "aborted")]
        known = [list(c.sample) for c in completed if c.sample]
        if completed and not known:
            pass  # the aggregator had already finished version k + 1 (without this input): the swarm moved on
        elif not ok and self.server is None and self._accepted_round <= k and not self._closing:
            # No aggregator took the update (it crashed, refused the claim, or aborted) and there is no
            # resend under secagg: watch version k + 1 like a contributor. When no member of its sample
            # (named by an aggregator that aborted or completed without this input; none after a crash or
            # a refusal) answers after the idle timeout, this node sends version k again as k + 1. Every
            # such trainer does, not only the lowest live one: it cannot tell which members trained, and a
            # live one that did not would never relaunch. The copies are identical (same base, same
            # order), so trainers keep the first.
            self._watch = _Watch(index=index, base_round=k, sample=known[0] if known else [],
                                 contributors=[self.me], since=self._now())
            self._prune_bases()
        return self._report("trainer", train_loss=loss, failures=len(acks) - len(ok),
                            partner=ok[0][0] if ok else None)

    async def _run_user(self, k: int, user: SecAggUser, training: asyncio.Future[Contribution]) -> UserReport:
        """Run one secagg user of version `k` and hand its report to `on_secagg_report`."""
        report = await user.run(training)
        if self.on_secagg_report is not None:
            self.on_secagg_report(k, report)
        return report

    async def _upload(self, k: int, state: State, loss: float, base_digest: bytes, parent_digest: bytes
                      ) -> list[tuple[str, peer_pb2.ModestAggAck] | None]:
        """Send the model trained from version `k` to the aggregators of ``k + 1``; resend on failure."""
        s = self.settings
        self.view.flush_pending()  # a model send: pending joins enter the view that travels with it
        index = k + 1
        key = self._key(index, parent_digest)
        body = peer_pb2.ModestUpdate(run_id=s.run_id, config_hash=s.config_hash, round=k, round_estimate=self.round,
                                     view=self.view.to_proto(), base_digest=base_digest, train_loss=loss,
                                     examples=self.trainer.num_examples, parent_digest=parent_digest)
        msg = Message(body, state)
        if self.server is not None:
            first = [self.server]
        else:
            first = await self._available(index, s.aggregators, key)
        tried = set(first)
        return list(await asyncio.gather(*(self._deliver(agg, msg, k, key, tried) for agg in first)))

    async def _deliver(self, agg: str, msg: Message[peer_pb2.ModestUpdate], k: int, key: bytes, tried: set[str],
                       *, resend: bool = True) -> tuple[str, peer_pb2.ModestAggAck] | None:
        resends = 0
        while True:
            ack = await self._send_update(agg, msg, k)
            if ack is not None and (ack.success or ack.reason == "late"):
                self._note_round(int(ack.round) + (1 if ack.success else 0))
                if ack.success and self.server is None:  # in fl the server watches its own samples
                    self._watch = _Watch(index=k + 1, base_round=k, sample=list(ack.sample),
                                         contributors=list(ack.contributors), since=self._now())
                    self._prune_bases()
                return agg, ack
            if self._accepted_round > k or self._closing:
                return None  # a newer model is here: stop waiting (this aggregator is not at fault)
            if ack is None:
                self.health.failed(agg, k + 1)
            if self.server is not None:
                return None
            if not resend:
                return (agg, ack) if ack is not None else None
            if resends >= self.settings.max_resends:
                return None
            resends += 1
            self.counters["resends"] += 1
            nxt = await self._available(k + 1, 1, key, exclude=tried)
            if not nxt:
                return None
            agg = nxt[0]
            tried.add(agg)

    async def _send_update(self, agg: str, msg: Message[peer_pb2.ModestUpdate], k: int
                           ) -> peer_pb2.ModestAggAck | None:
        """Upload to one aggregator and wait for its acknowledgement; None when it is gone or we moved on."""
        body = msg.body
        if agg == self.me:
            return await self._receive_update(self.me, k, msg.tensors, bytes(body.base_digest),
                                              bytes(body.parent_digest), body.train_loss, secure=body.secure,
                                              aggregators=tuple(body.aggregators))
        call = asyncio.get_running_loop().create_task(
            self.transport.call(agg, UPDATE, msg, peer_pb2.ModestAggAck, timeout=self.settings.ack_timeout_s))
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=self.settings.ping_timeout_s)
                if call in done:
                    try:
                        resp = call.result()
                    except TransportError as e:
                        logger.info("%s: upload of round %d to %s failed: %s", self._me_short, k, _short(agg), e)
                        return None
                    self._heard(agg, resp.body.round_estimate)
                    return resp.body
                if self._accepted_round > k or self._closing:
                    return None
                # Liveness: an aggregator that stops answering pings has crashed; do not wait it out.
                if await self._ping(agg, k + 1) is None:
                    logger.info("%s: aggregator %s stopped answering during round %d", self._me_short, _short(agg), k)
                    return None
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await call

    # -- idle work: watching for a lost sample, directory refresh ------------------------------------
    async def _on_idle(self) -> None:
        await self._refresh_from_directory(force=True)
        if self._watch is not None:
            await self._check_watch()

    async def _check_watch(self) -> None:
        w = self._watch
        if w is None:
            return
        if self.round > w.index or self._accepted_round >= w.index:
            self._watch = None  # the swarm moved on
            self._prune_bases()
            return
        if self._now() - w.since < self.settings.idle_timeout_s:
            return
        # One answer is enough (alive, or already further): ping the sample one member at a time.
        for peer in [p for p in w.sample if p != self.me]:
            pong = await self._ping(peer, w.index)
            if self._watch is not w:
                return
            if self.round > w.index:
                self._watch = None
                self._prune_bases()
                return
            if pong is not None:
                w.since = self._now()  # the sample is alive and working
                return
        # Nobody of the sample answers: the first live contributor (lowest peer id) relaunches.
        earlier = [c for c in sorted(w.contributors) if c < self.me and c != self.server]
        if earlier and any(p is not None for p in await asyncio.gather(*(self._ping(c, w.index) for c in earlier))):
            w.since = self._now()
            return
        if self._watch is w:
            await self._relaunch(w)

    async def _relaunch(self, w: _Watch) -> None:
        base = self._bases.get(w.base_round)
        if base is None:
            self._watch = None
            return
        self.counters["relaunches"] += 1
        self.view.flush_pending()
        key = self._key(w.index, base.parent)
        sample = await self._available(w.index, self.settings.sample_size, key, exclude=self._exclude(w.sample))
        accepted = await self._push_model(sample, w.index, base.state, base.outer, parent=base.digest,
                                          combined=base.combined, sample_key=key)
        logger.warning("%s: the sample of version %d stopped answering; sent version %d again as %d to %d peers",
                       self._me_short, w.index, w.base_round, w.index, len(accepted))
        w.sample, w.since = accepted, self._now()

    # -- aggregator side ----------------------------------------------------------------------------
    async def _receive_update(self, sender: str, round_: int, state: State, base_digest: bytes,
                              parent_digest: bytes, train_loss: float, *, secure: bool = False,
                              aggregators: tuple[str, ...] = ()) -> peer_pb2.ModestAggAck:
        """Add a trained model to aggregation ``round_ + 1`` and wait until that aggregation ends.

        `secure`: the update's metadata only (its model travels masked in the secure instance of that
        aggregation, which a claim must have opened).
        """
        index = round_ + 1

        def ack(success: bool, reason: str, result: _Result | None = None) -> peer_pb2.ModestAggAck:
            return peer_pb2.ModestAggAck(round=round_, success=success, reason=reason, round_estimate=self.round,
                                         contributors=result.contributors if result else [],
                                         sample=result.sample if result else [])

        if self._closing:
            return ack(False, "leaving")
        agg = self._aggregations.get(index)
        if index <= self._completed_index or (agg is not None and agg.state != "open"):
            self.counters["late"] += 1
            return ack(False, "late")  # the index is complete: late models are ignored
        if secure:
            if agg is None or sender not in agg.secure_users():
                return ack(False, "refused")  # no secure instance here that this trainer belongs to
            agg.models.setdefault(sender, _Upload({}, base_digest, parent_digest, train_loss, aggregators))
            agg.arrived.set()
            result = await asyncio.shield(agg.future)
            ok = result.success and sender in result.contributors
            # Completed without this trainer's input (it came after the quorum): "late", as in plain rounds.
            late = result.success and not ok and result.reason != "aborted"
            return ack(ok, "late" if late else result.reason, result)
        if agg is None:
            agg = _Aggregation(index)
            self._aggregations[index] = agg
            agg.timer = self._spawn(self._deadline(agg))
        if sender not in agg.models:  # one model per sender: the first one counts
            agg.models[sender] = _Upload(state, base_digest, parent_digest, train_loss)
        if len(agg.models) >= self._threshold() and agg.state == "open":
            self._spawn(self._complete(agg))
        result = await asyncio.shield(agg.future)
        if result.success and sender in result.contributors:
            return ack(True, result.reason, result)
        return ack(False, result.reason if not result.success else "late", result)

    # -- secure aggregation: the aggregator side ----------------------------------------------------
    def _secagg_settings(self, n: int, threshold: int, *, grouped: bool = False) -> SecAggSettings:
        """The run's secagg settings with the masked-stage quorum of this aggregator.

        The masked stage closes once ``max(t, floor(sf * s))`` inputs are in (capped by the sample): MoDeST's
        wait for ``sf * s`` models, but never below the secagg threshold, which could only abort. With
        `grouped` (one of several groups of n members) the same fraction applies to the group:
        ``max(t, floor(sf * n))``.
        """
        assert self._secagg is not None
        if grouped:
            share = math.floor(self.settings.success_fraction * n + 1e-9)
            return dataclasses.replace(self._secagg, masked_quorum=min(n, max(threshold, share)))
        return dataclasses.replace(self._secagg, masked_quorum=min(n, max(threshold, self._threshold())))

    def _check_claim(self, claim: SessionClaim) -> str | None:
        """Why the claimed sample of a secure aggregation is refused, or None when `candidate_order` supports it.

        The sample of version ``k = claim.round - 1`` is the first responsive candidates of
        ``candidate_order(active peers, k, key)``. Every member must be in this node's view and among the
        first ``2 s`` candidates (room for ``s`` unresponsive ones skipped and for small view differences);
        the key must be the one the run uses for round ``k`` (the digest of version ``k - 2`` with
        ``sample_key=model``: when this node knows that version's digest, the key must be one of them).
        """
        s = self.settings
        index, k, users = claim.round, claim.round - 1, set(claim.users)
        if claim.run_id != s.run_id:
            return f"run {claim.run_id!r} is not this node's run {s.run_id!r}"
        if index < 1 or index >= MAX_WIRE_NUMBER:
            return f"round {index} is never aggregated"
        existing = self._aggregations.get(index)
        if index <= self._completed_index or (existing is not None and existing.state != "open"):
            return f"version {index} is already complete here"
        if self.server is not None and self.server != self.me:
            return "this node is not the run's aggregator"
        if claim.sender not in users:
            return "the sender is not in the sample it claims"
        groups = s.secagg_groups
        if claim.group >= groups:
            return f"group {claim.group} does not exist: this run splits a sample into {groups} group(s)"
        if groups > 1 and existing is not None and existing.groups_closed:
            return f"the groups of version {index} are already combined here"
        # A group holds at most ceil(s / G) members of the sample (all s with one group).
        largest = -(-s.sample_size // groups)
        if len(users) > largest or (self.server is not None and self.server in users):
            return (f"the sample lists {len(users)} peers, more than s = {s.sample_size} trainers" if groups == 1
                    else f"group {claim.group} lists {len(users)} peers, more than ceil(s / G) = {largest}")
        if groups > 1 and len(users) < s.secagg_min_group:
            return f"group {claim.group} lists {len(users)} peers, fewer than secagg_min_group = {s.secagg_min_group}"
        if claim.dim != self._dim or claim.extras != self._vca_extras:
            return f"layout dim={claim.dim} extras={claim.extras}; this model needs {self._dim} and {self._vca_extras}"
        key = claim.context
        if s.sample_key == "model" and k >= 3:
            known = self._digests.get(k - 2)
            if len(key) != 32 or (known and key not in known):
                return f"the ordering key is not the digest of model version {k - 2}"
        elif key:
            return f"round {k} is ordered without a key"
        # A pending join is a known member too: it is only held out of the view so that it cannot change the
        # sample of the round in progress, and the claimed sample is ordered below with the claimants included.
        unknown = sorted(u for u in users if not self.view.knows(u))
        if unknown:
            return f"{len(unknown)} member(s) of the claimed sample are not in this node's view, e.g. {unknown[0]!r}"
        pool = (set(self.view.active(k)) | users) - self._exclude()
        order = candidate_order(sorted(pool), k, key=key)
        window = set(order[:2 * s.sample_size])
        outside = sorted(users - window)
        if outside:
            return (f"{len(outside)} member(s), e.g. {outside[0]!r}, are not among the first {2 * s.sample_size} "
                    f"candidates of round {k}")
        return None

    def _on_claim(self, claim: SessionClaim) -> None:
        """`SecAggHost.on_unopened`: open the secure aggregation of ``claim.round`` when the claim checks out."""
        assert self._host is not None and self._secagg is not None
        if self._closing:
            return
        reason = self._check_claim(claim)
        missing = [not self.view.knows(u) for u in claim.users]
        if reason is not None and any(missing) and (self._directory_stale(missing) or self._reading_directory()):
            # Members missing from this node's view may only be newer than its last directory read (a stale
            # view at start): read it in the background and let the claimant retry before refusing.
            self._read_directory_soon()
            return
        if reason is not None:
            self._refuse(claim, reason)
            return
        if self._identity is not None and (self._keys_stale(claim.users) or self._reading_directory()):
            # on_unopened must not block: read the directory in the background; the claimant retries
            # (users retry for open_timeout_s while the instance is not open) and finds it open then.
            self._read_directory_soon()
            return
        index = claim.round
        agg = self._aggregations.get(index)
        if agg is None:
            agg = _Aggregation(index)
            self._aggregations[index] = agg
        group = claim.group
        if group in agg.group_results or any(i.plan.digest == claim.digest for i in agg.candidates.get(group, [])):
            return
        if (group, claim.sender) in agg.openers:
            # One instance per member and group: a member cannot open a new one for each member list it forges.
            self._refuse(claim, f"{_short(claim.sender)} already opened another instance of group {group} of "
                                f"version {index} here, with another member list")
            return
        grouped = self.settings.secagg_groups > 1
        session = Session(self.settings.run_id, index, self.me, claim.users, dim=self._dim, extras=self._vca_extras,
                          group=group)
        try:
            p = plan(session, self._secagg)
            if p.digest != claim.digest:
                raise SecAggError("the claimed session digest differs from this node's for the same members "
                                  "(different secagg settings?)")
            instance = self._host.open(session, self._secagg_settings(p.n, p.threshold, grouped=grouped),
                                       identity_keys=self._keys_for(claim.users, index=index, role="aggregator"))
        except (ConfigError, SecAggError) as e:  # e.g. a sample too small for the configured threshold
            self.counters["secagg_refused"] += 1
            self.transport.reject(claim.sender, WRONG_SAMPLE, f"secure aggregation of version {index}: {e}")
            return
        first = not agg.opened
        if self._spread and agg.home is None:
            agg.home = group % self.settings.aggregators
        agg.openers.add((group, claim.sender))
        agg.candidates.setdefault(group, []).append(instance)
        agg.opened.append(instance)
        if len(agg.candidates[group]) > 1:
            self.counters["secagg_competing_claims"] += 1
            logger.warning("%s: %s claims group %d of version %d with another member list than an instance "
                           "already open; both run, the first to produce a sum counts", self._me_short,
                           _short(claim.sender), group, index)
        agg.group_changed.set()
        self._spawn(self._secure_instance(agg, group, instance))
        if grouped and first:
            self._spawn(self._secure_groups(agg))

    def _refuse(self, claim: SessionClaim, reason: str) -> None:
        """Refuse `claim` (counted once per claimant and round: users retry) and tell the claimant why."""
        if (claim.round, claim.sender) in self._refused:
            return
        if len(self._refused) > 4096:
            self._refused.clear()
        self._refused.add((claim.round, claim.sender))
        self.counters["secagg_refused"] += 1
        self.transport.reject(claim.sender, WRONG_SAMPLE, f"secure aggregation of version {claim.round} refused: "
                                                          f"{reason}")

    async def _await_metadata(self, agg: _Aggregation, needed: Iterable[str], *, timeout: float,
                              any_one: bool = False) -> None:
        """Wait (at most `timeout` seconds) for the metadata updates of `needed` (or of any one trainer)."""
        want = set(needed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (agg.models if any_one else want <= set(agg.models)):
            agg.arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(agg.arrived.wait(), remaining)

    async def _secure_instance(self, agg: _Aggregation, group: int, instance: SecAggAggregator) -> None:
        """Run one instance of `group` of `agg` as its server and decide the group when it is the one that counts.

        The first candidate of the group to produce a sum decides it; one that aborts while another
        candidate of the group still runs is dropped (``secagg_candidates_aborted``); the last one to
        abort decides the group as left out. Without groups the decision completes the round (or aborts
        it, loudly: the model goes on unchanged); with groups `_secure_groups` combines the decided groups.
        """
        assert self._host is not None
        try:
            try:
                outcome: SecAggResult | str = await instance.run()
            finally:
                self._host.close(instance.plan.session)
        except SecAggError as e:  # SecAggAborted: too few trainers left at some stage
            outcome = str(e)
        others = [i for i in agg.candidates.get(group, []) if i is not instance]
        agg.candidates[group] = others
        if group in agg.group_results or agg.state != "open":
            return  # another instance decided the group first
        if isinstance(outcome, str) and others:
            self.counters["secagg_candidates_aborted"] += 1
            logger.warning("%s: an instance of group %d of version %d aborted (%s); %d other instance(s) of the "
                           "group still run", self._me_short, group, agg.index, outcome, len(others))
            return
        agg.decided[group] = instance
        agg.group_results[group] = outcome
        agg.group_changed.set()
        if self.settings.secagg_groups > 1:
            if isinstance(outcome, str):
                logger.warning("%s: secure group %d of version %d left out (%s)", self._me_short, group, agg.index,
                               outcome)
            return
        s = self.settings
        if isinstance(outcome, str):
            await self._abort_secure(agg, outcome)
            return
        self.counters["secagg_rounds"] += 1
        await self._await_metadata(agg, outcome.survivors, timeout=s.exchange_timeout_s)
        logger.info("%s: secure aggregation of version %d: %d of %d trainers in the sum (t=%d)", self._me_short,
                    agg.index, len(outcome.survivors), outcome.users, outcome.threshold)
        await self._complete(agg, secure=outcome)

    async def _secure_groups(self, agg: _Aggregation) -> None:
        """Wait for the groups of `agg`, then combine the group means with the run's rule (or abort).

        A group whose trainers never open an instance here is given the trainers' open timeout (they
        retry that long), counted from the first group's opening; after that, once every opened group
        has finished, the missing ones are left out. Every group left out counts in
        ``secagg_groups_left_out``. With fewer groups than `groups_needed` left, the round aborts like a
        secure aggregation below its threshold.
        """
        s = self.settings
        assert self._secagg is not None
        loop = asyncio.get_running_loop()
        open_until = loop.time() + self._secagg.open_timeout_s
        while not self._local_groups(agg) <= set(agg.group_results):
            running = agg.running()
            remaining = open_until - loop.time()
            if not running and remaining <= 0:
                break
            agg.group_changed.clear()
            with contextlib.suppress(TimeoutError):
                # Instances end by their own stage timeouts; without one running, wait for the open timeout.
                await asyncio.wait_for(agg.group_changed.wait(), None if running else remaining)
        agg.groups_closed = True
        results = {g: r for g, r in sorted(agg.group_results.items()) if isinstance(r, SecAggResult)}
        if self._spread:
            results = await self._exchange_groups(agg, results)
        if len(results) < s.secagg_groups:
            self.counters["secagg_groups_left_out"] += s.secagg_groups - len(results)
        needed = groups_needed(s.rule, s.rule_params, s.secagg_groups)
        if len(results) < needed:
            await self._abort_secure(agg, f"{len(results)} of {s.secagg_groups} secure groups completed; rule "
                                          f"{s.rule} needs {needed}")
            return
        self.counters["secagg_rounds"] += 1
        survivors = sorted({u for r in results.values() for u in r.survivors})
        if not self._spread:  # (spread: `_exchange_groups` waited for its own trainers'; the others' go elsewhere)
            await self._await_metadata(agg, survivors, timeout=s.exchange_timeout_s)
        logger.info("%s: secure aggregation of version %d: %d of %d groups, %d trainers in the group sums",
                    self._me_short, agg.index, len(results), s.secagg_groups, len(survivors))
        await self._complete(agg, groups=results)

    async def _abort_secure(self, agg: _Aggregation, reason: str) -> None:
        """Complete `agg` as aborted (loudly: counted and logged): the new version is the base unchanged."""
        self.counters["secagg_aborted"] += 1
        logger.warning("%s: secure aggregation of version %d aborted (%s); the model goes on unchanged",
                       self._me_short, agg.index, reason)
        # The trainers' metadata names the base version; wait for one of them at least.
        await self._await_metadata(agg, agg.secure_users(), timeout=self.settings.aggregation_timeout_s,
                                   any_one=True)
        await self._complete(agg, aborted=reason)

    # -- secure groups spread over the aggregators of a version ---------------------------------------
    @property
    def _spread(self) -> bool:
        """Whether secure groups are spread over the aggregators: ``G > 1`` groups and ``a > 1`` aggregators
        (modest; fl has one server). Group ``g`` is aggregated by the aggregator at position ``g mod a`` of the
        trainers' list, and the aggregators exchange their group sums (`ModestGroupSums`)."""
        s = self.settings
        return self._secagg is not None and s.secagg_groups > 1 and s.aggregators > 1 and self.server is None

    def _local_groups(self, agg: _Aggregation) -> set[int]:
        """The groups `agg` runs here: all of them, or with spread groups those of its position (`home`) and
        any other that trainers opened here."""
        s = self.settings
        if not self._spread or agg.home is None:
            return set(range(s.secagg_groups))
        return {g for g in range(s.secagg_groups) if g % s.aggregators == agg.home} | set(agg.candidates)

    async def _exchange_groups(self, agg: _Aggregation, local: dict[int, SecAggResult]) -> dict[int, SecAggResult]:
        """Send the sums of this aggregator's groups to the other aggregators of `agg` and add theirs.

        The aggregators and their order are the majority list in the trainers' updates (group ``g`` belongs
        to ``order[g mod a]``); a sum counts only from the aggregator its group belongs to and only for the
        same base version. Waits at most ``aggregation_timeout_s`` (the longest a slow group's masked stage
        runs) for the others' groups; missing ones are left out. Returns every group sum, by group.
        """
        s = self.settings
        survivors = sorted({u for r in local.values() for u in r.survivors})
        await self._await_metadata(agg, survivors, timeout=s.exchange_timeout_s)
        lists = Counter(u.aggregators for u in agg.models.values() if u.aggregators)
        order = max(sorted(lists), key=lambda o: lists[o]) if lists else ()
        if self.me not in order:
            logger.warning("%s: version %d: the trainers' aggregator lists do not name this node; its %d group(s) "
                           "are not exchanged", self._me_short, agg.index, len(local))
            return local
        groups = s.secagg_groups
        owner = {g: order[g % len(order)] for g in range(groups)}
        base_digest = self._base_digest(agg)
        left_out = sorted(g for g in range(groups) if owner[g] == self.me and g not in local)
        for peer in dict.fromkeys(order):
            if peer != self.me:
                self._spawn(self._send_group_sums(peer, agg.index, base_digest, local, left_out))
        foreign = [g for g in range(groups) if owner[g] != self.me and g not in local]

        def collected() -> dict[int, SecAggResult | None]:
            entries = self._remote_groups.get(agg.index, {})
            found: dict[int, SecAggResult | None] = {}
            for g in foreign:
                entry = entries.get((g, owner[g]))
                if entry is not None and entry[0] == base_digest:
                    found[g] = entry[1]
            return found

        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.aggregation_timeout_s
        while True:
            self._remote_arrived.clear()
            got = collected()
            remaining = deadline - loop.time()
            if len(got) == len(foreign) or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._remote_arrived.wait(), remaining)
        # Own groups in the form they travel in (mean rounded to float32), so that every aggregator with the
        # same groups builds the same model bit for bit (same digest: trainers' sample keys agree).
        merged = {g: _as_sent(r) for g, r in local.items()}
        merged.update({g: r for g, r in got.items() if r is not None})
        others = sum(1 for r in got.values() if r is not None)
        self.counters["secagg_remote_groups"] += others
        logger.info("%s: version %d: %d own secure group(s), %d from the other %d aggregator(s), %d left out",
                    self._me_short, agg.index, len(local), others, len(set(order)) - 1, groups - len(merged))
        return dict(sorted(merged.items()))

    async def _send_group_sums(self, peer: str, index: int, base_digest: bytes, results: Mapping[int, SecAggResult],
                               left_out: Sequence[int]) -> None:
        """Send each group sum of `results` (one message per group: a model's size each) and the groups left
        out to the aggregator `peer`. A group travels as its mean (float32, as models do) and its weight."""
        s = self.settings
        messages: list[Message[peer_pb2.ModestGroupSums]] = []
        for g, r in results.items():
            body = peer_pb2.ModestGroupSums(run_id=s.run_id, config_hash=s.config_hash, index=index,
                                            base_digest=base_digest)
            body.groups.add(group=g, weight_sum=r.weight_sum, survivors=r.survivors, users=r.users)
            tensors = {f"mean.{g}": r.mean().to(torch.float32)}
            if self._vca_extras:
                tensors[f"extras.{g}"] = r.extras_mean().to(torch.float32)
            messages.append(Message(body, tensors))
        if left_out or not messages:
            messages.append(Message(peer_pb2.ModestGroupSums(run_id=s.run_id, config_hash=s.config_hash, index=index,
                                                             base_digest=base_digest, left_out=left_out)))
        for msg in messages:
            try:
                await self.transport.call(peer, GROUP_SUMS, msg, peer_pb2.ModestGroupSumsAck,
                                          timeout=s.exchange_timeout_s)
            except TransportError as e:
                logger.info("%s: group sums of version %d to %s failed: %s", self._me_short, index, _short(peer), e)
                return

    async def _on_group_sums(self, sender: str, msg: Message[Any]) -> Message[Any]:
        """Keep the group sums another aggregator of a version sent (checked here; their owner and base are
        checked when the version combines its groups, `_exchange_groups`)."""
        body: peer_pb2.ModestGroupSums = msg.body
        self._check_run(sender, body)
        self._check_round(body.index)
        s = self.settings
        if not self._spread:
            raise BadMessage("group sums, but this run does not spread secure groups over aggregators",
                             code="malformed")
        index = int(body.index)
        if index <= self._completed_index:
            return Message(peer_pb2.ModestGroupSumsAck(accepted=False, reason="late"))
        groups = [(int(g.group), g) for g in body.groups]
        named = [g for g, _ in groups] + [int(g) for g in body.left_out]
        if len(named) != len(set(named)) or any(g >= s.secagg_groups for g in named):
            raise BadMessage(f"group sums name groups {named[:8]}: duplicates or beyond secagg_groups="
                             f"{s.secagg_groups}", code="malformed")
        if len(body.base_digest) != 32:
            raise BadMessage("group sums: base_digest must be 32 bytes", code="malformed")
        largest = -(-s.sample_size // s.secagg_groups)
        expected = {f"mean.{g}" for g, _ in groups}
        if self._vca_extras:
            expected |= {f"extras.{g}" for g, _ in groups}
        if set(msg.tensors) != expected:
            raise BadMessage(f"group sums carry tensors {sorted(msg.tensors)[:4]}, expected {sorted(expected)[:4]}",
                             code="bad_shape")
        parsed: dict[int, SecAggResult] = {}
        for g, part in groups:
            if not (len(part.survivors) <= part.users <= largest and part.survivors) or any(
                    len(p) > MAX_PEER_ID for p in part.survivors):
                raise BadMessage(f"group {g}: {len(part.survivors)} survivors of {part.users} members (a group has "
                                 f"at most {largest})", code="malformed")
            if not (math.isfinite(part.weight_sum) and part.weight_sum > 0):
                raise BadMessage(f"group {g}: weight_sum {part.weight_sum} must be finite and > 0", code="non_finite")
            mean = msg.tensors[f"mean.{g}"]
            extras = msg.tensors.get(f"extras.{g}", torch.zeros(0))
            for name, t, n in ((f"mean.{g}", mean, self._dim), (f"extras.{g}", extras, self._vca_extras)):
                if tuple(t.shape) != (n,) or not t.is_floating_point():
                    raise BadMessage(f"group sums: {name} has shape {tuple(t.shape)} {t.dtype}, expected ({n},) "
                                     f"floating", code="bad_shape")
                if not bool(torch.isfinite(t).all()):
                    raise BadMessage(f"group sums: {name} holds NaN or Inf", code="non_finite")
            parsed[g] = _group_result(mean, extras, float(part.weight_sum), tuple(sorted(part.survivors)),
                                      int(part.users))
        # Memory stays bounded: one entry per (group, sender), from the aggregators the trainers named once
        # this node knows their list, and from at most 2 a senders per version before.
        agg = self._aggregations.get(index)
        lists = {u.aggregators for u in agg.models.values() if u.aggregators} if agg is not None else set()
        entries = self._remote_groups.get(index, {})
        senders = {snd for _, snd in entries}
        if lists and not any(sender in order for order in lists):
            return Message(peer_pb2.ModestGroupSumsAck(accepted=False, reason="not_aggregating"))
        if sender not in senders and len(senders) >= 2 * s.aggregators:
            return Message(peer_pb2.ModestGroupSumsAck(accepted=False, reason="not_aggregating"))
        entries = self._remote_groups.setdefault(index, entries)
        digest = bytes(body.base_digest)
        for g in named:
            entries.setdefault((g, sender), (digest, parsed.get(g)))
        while len(self._remote_groups) > _REMOTE_VERSIONS:
            del self._remote_groups[min(self._remote_groups)]
        self._remote_arrived.set()
        return Message(peer_pb2.ModestGroupSumsAck(accepted=True))

    async def _deadline(self, agg: _Aggregation) -> None:
        s = self.settings
        while agg.state == "open":
            await asyncio.sleep(s.aggregation_timeout_s)
            if agg.state != "open":
                return
            n = len(agg.models)
            if n >= min(s.liveness_min, self._threshold()):
                await self._complete(agg)
                return
            if agg.topups < s.max_topups and await self._topup(agg):
                continue
            if agg.state == "open":
                logger.warning("%s: aggregation %d ends with %d model(s), below liveness_min=%d",
                               self._me_short, agg.index, n, s.liveness_min)
                await self._complete(agg, degraded=True)
            return

    def _base_digest(self, agg: _Aggregation) -> bytes:
        return _majority(u.base_digest for u in agg.models.values())

    def _parent_digest(self, agg: _Aggregation) -> bytes:
        return _majority(u.parent_digest for u in agg.models.values())

    async def _get_base(self, agg: _Aggregation) -> _Base | None:
        """Model ``index - 1`` (the contributors' start), from this node or pulled from a contributor."""
        k = agg.index - 1
        digest = self._base_digest(agg)
        base = self._bases.get(k)
        if base is not None and (base.digest == digest or not agg.models):
            return base  # (no models: an aborted secure aggregation whose trainers all vanished)
        s = self.settings
        req = peer_pb2.ModestBaseRequest(run_id=s.run_id, config_hash=s.config_hash, round=k, digest=digest)
        for peer in sorted(agg.models):
            if peer == self.me or agg.models[peer].base_digest != digest:
                continue
            try:
                resp = await self.transport.call(peer, BASE, Message(req), peer_pb2.ModestBaseResponse,
                                                 timeout=s.exchange_timeout_s)
                if not resp.body.found:
                    continue
                model, outer = self._split_model(resp.tensors, outer_allowed=True)
                if model_digest(model) != digest:
                    raise BadMessage(f"base model of round {k} does not match its digest", code="bad_shape")
            except BadMessage as e:
                self.transport.reject(peer, e.code, str(e))
                continue
            except TransportError as e:
                logger.info("%s: base pull from %s failed: %s", self._me_short, _short(peer), e)
                continue
            base = _Base(k, digest, model, outer, self._parent_digest(agg), 1)
            self._bases[k] = base
            self.counters["base_pulls"] += 1
            return base
        return None

    async def _topup(self, agg: _Aggregation) -> bool:
        """Send the base model to fresh live candidates so that more trained models arrive."""
        agg.topups += 1
        self.counters["topups"] += 1
        base = await self._get_base(agg)
        if base is None or agg.state != "open":
            return False
        need = self._threshold() - len(agg.models)
        recruits = await self._available(agg.index, need, self._key(agg.index, self._parent_digest(agg)),
                                         exclude=self._exclude(agg.models))
        accepted = await self._push_model(recruits, base.round, base.state, base.outer,
                                          parent=self._parent_digest(agg), combined=base.combined)
        logger.info("%s: aggregation %d had %d model(s) at its deadline; sent version %d to %d more peers",
                    self._me_short, agg.index, len(agg.models), base.round, len(accepted))
        return bool(accepted)

    def _combine(self, states: Sequence[State], base: _Base | None) -> tuple[State, State, str]:
        """Aggregate trained models into the next version (and step the outer optimizer)."""
        s = self.settings
        params = dict(s.rule_params)
        rule = s.rule
        try:
            if self._needs_updates:
                assert base is not None
                updates = [{k: st[k] - base.state[k] for k in st} for st in states]
                delta = aggregate_states(rule, updates, **params)
                combined = {k: base.state[k] + delta[k] for k in base.state}
            else:
                combined = aggregate_states(rule, states, **params)
        except AggregationError as e:
            # e.g. a robust rule refuses too few inputs after a degraded round: fall back, and say so.
            logger.warning("%s: rule %s refused %d input(s) (%s); using mean", self._me_short, rule, len(states), e)
            rule = "mean"
            combined = aggregate_states("mean", states)
        combined, outer_state = self._outer_step(combined, base)
        return combined, outer_state, rule

    def _outer_step(self, combined: State, base: _Base | None) -> tuple[State, State]:
        """Step the outer optimizer (if any) from the base towards `combined`; return the model and its state."""
        s = self.settings
        if s.outer_lr is None or base is None:
            return combined, {}
        opt = OuterOptimizer(lr=s.outer_lr, momentum=s.outer_momentum, nesterov=s.outer_nesterov)
        opt.load_state_dict(base.outer)
        combined = opt.step_towards(base.state, combined)
        return combined, opt.state_dict()

    def _combine_secure(self, result: SecAggResult, base: _Base) -> tuple[State, State, str]:
        """The next version from a secure aggregation: base + mean update (vca: rescaled), then the outer step."""
        shapes = [self._spec[n][0] for n in self._float_names]
        deltas = split_layers(result.mean(), shapes)
        combined = {k: v.clone() for k, v in base.state.items()}  # integer buffers keep the base's value
        layers = [base.state[n].to(torch.float64) + d for n, d in zip(self._float_names, deltas, strict=True)]
        if self.settings.rule == "vca":
            # Each trainer appended the variance of each of its trained layers: their mean is VCA's target.
            every = self.settings.rule_params.get("correct", "matrices") == "all"
            layers = variance_correct(layers, result.extras_mean(),
                                      corrected=[every or len(sh) >= 2 for sh in shapes])
        for n, layer in zip(self._float_names, layers, strict=True):
            combined[n] = layer.to(base.state[n].dtype)
        combined, outer_state = self._outer_step(combined, base)
        return combined, outer_state, self.settings.rule

    def _combine_groups(self, results: Sequence[SecAggResult], base: _Base) -> tuple[State, State, str]:
        """The next version from the secure groups that completed: base + the rule across group means.

        ``mean`` and ``vca`` pool the group sums (weights and extras included), which is exactly one
        secure sum over the union of the groups. A robust rule combines the group mean updates, each
        one input of equal weight (a group's size is no reason to trust it more).
        """
        s = self.settings
        if s.rule in SUM_RULES:
            first = results[0]
            pooled = dataclasses.replace(
                first, weighted_sum=sum((r.weighted_sum for r in results[1:]), first.weighted_sum.clone()),
                extras_sum=sum((r.extras_sum for r in results[1:]), first.extras_sum.clone()),
                weight_sum=sum(r.weight_sum for r in results),
                survivors=tuple(sorted({u for r in results for u in r.survivors})),
                users=sum(r.users for r in results))
            return self._combine_secure(pooled, base)
        shapes = [self._spec[n][0] for n in self._float_names]
        updates = [dict(zip(self._float_names, split_layers(r.mean(), shapes), strict=True)) for r in results]
        delta = aggregate_states(s.rule, updates, **dict(s.rule_params))
        combined = {k: v.clone() for k, v in base.state.items()}  # integer buffers keep the base's value
        for n in self._float_names:
            combined[n] = (base.state[n].to(torch.float64) + delta[n].to(torch.float64)).to(base.state[n].dtype)
        combined, outer_state = self._outer_step(combined, base)
        return combined, outer_state, s.rule

    async def _complete(self, agg: _Aggregation, *, degraded: bool = False, secure: SecAggResult | None = None,
                        aborted: str | None = None, groups: Mapping[int, SecAggResult] | None = None) -> None:
        """Aggregate, send the new model to the next sample, acknowledge the trainers: once per index.

        `secure`: the result of the secure aggregation (its survivors are the contributors). `aborted`:
        the secure aggregation was aborted for this reason; the new version is the base unchanged (no
        update is applied), so that the swarm goes on. `groups`: the results of the secure groups that
        completed, by group (their survivors are the contributors; the rule combines the group means).
        """
        if agg.state != "open":
            return
        agg.state = "completing"
        s = self.settings
        received = sorted(agg.models) if secure is None and aborted is None and groups is None else []
        ignored: list[str] = []
        if secure is not None:
            contributors = list(secure.survivors)
        elif groups is not None:
            contributors = sorted({u for r in groups.values() for u in r.survivors})
        elif aborted is not None:
            contributors = []
        else:
            contributors = received
            if s.exclude_suspects:
                # Samples must stay the same on every node, so suspects are not dropped from them: this
                # aggregator only leaves their models out (and keeps scoring them, so a peer can recover).
                suspects = self.suspicion.suspects(s.suspect_threshold)
                kept = [c for c in received if c not in suspects]
                if kept:
                    contributors, ignored = kept, [c for c in received if c in suspects]
        try:
            base = await self._get_base(agg) if self._needs_base else None
            if self._needs_base and base is None:
                raise AggregationError(f"no contributor could send the base model of round {agg.index - 1}")
            if secure is not None:
                assert base is not None
                sec, base_ = secure, base
                new_state, outer_state, rule = await self.compute.run(lambda: self._combine_secure(sec, base_))
            elif groups is not None:
                assert base is not None
                parts, base_ = list(groups.values()), base
                new_state, outer_state, rule = await self.compute.run(lambda: self._combine_groups(parts, base_))
            elif aborted is not None:
                assert base is not None
                new_state, outer_state, rule = base.state, base.outer, "none"
            else:
                states = [agg.models[c].state for c in contributors]
                new_state, outer_state, rule = await self.compute.run(lambda: self._combine(states, base))
                self._score(agg, received, new_state, base)
        except Exception as e:
            logger.error("%s: aggregation %d failed: %s", self._me_short, agg.index, e)
            agg.resolve(_Result(False, "dropped"))
            return
        index = agg.index
        parent = self._base_digest(agg)
        grandparent = self._parent_digest(agg)
        self._completed_index = max(self._completed_index, index)
        self._note_round(index)
        self._bases[index] = _Base(index, model_digest(new_state), new_state, outer_state, parent, len(contributors))
        self._know(index, self._bases[index].digest)
        self._know(index - 1, parent)
        for other in list(self._aggregations.values()):
            if other.index < index and other.state == "open":
                other.resolve(_Result(False, "late"))
        self.view.flush_pending()  # a model send: pending joins enter the view
        key = self._key(index, grandparent)
        # Spread groups: every aggregator of the version sends the sample in candidate order, so that its
        # members derive the same groups whichever aggregator's copy reaches them first.
        sample = await self._available(index, s.sample_size, key, exclude=self._exclude(), ordered=self._spread)
        accepted = await self._push_model(sample, index, new_state, outer_state, parent=parent,
                                          combined=max(1, len(contributors)), sample_key=key)
        result = _Result(True, "aborted" if aborted is not None else "aggregated", contributors, accepted)
        agg.resolve(result)
        for i in [i for i in self._aggregations if i <= index - 2]:
            del self._aggregations[i]
        self._prune_bases()
        if self.server == self.me:
            # The server watches its own sample: if all of it disappears, it sends the model again.
            self._watch = _Watch(index=index, base_round=index, sample=accepted, contributors=[self.me],
                                 since=self._now())
        accuracy = test_loss = None
        if s.eval_every and index % s.eval_every == 0:
            def evaluate() -> tuple[float, float]:
                self.trainer.load_state(new_state)
                return self.trainer.evaluate()

            test_loss, accuracy = await self.compute.run(evaluate)
            self._model_round = max(self._model_round, index)
        losses = [agg.models[c].train_loss for c in contributors if c in agg.models]
        if degraded:
            self.counters["degraded_rounds"] += 1
        event = AggregationEvent(index=index, aggregator=self.me, contributors=contributors, sample=accepted,
                                 train_loss=sum(losses) / len(losses) if losses else None, accuracy=accuracy,
                                 test_loss=test_loss, time_s=self._now(), degraded=degraded, topups=agg.topups,
                                 rule=rule, secure=self._secagg is not None,
                                 dropped=sorted(agg.secure_users() - set(contributors)), aborted=aborted,
                                 state=new_state,
                                 ignored=ignored)
        if aborted is None:
            self.counters["aggregations"] += 1
        self._events.append(event)
        acc = "-" if accuracy is None else f"{accuracy:.3f}"
        logger.info("%s: aggregated version %d from %d model(s) by %s; acc=%s; sent to %d peers", self._me_short,
                    index, len(contributors), rule, acc, len(accepted))
        if self.on_aggregate is not None:
            self.on_aggregate(event)

    def _score(self, agg: _Aggregation, received: Sequence[str], new_state: State, base: _Base | None) -> None:
        """Update the suspicion of the trainers of `agg` by their distance to the new model (all received
        models, ignored suspects included; this node's own model counts for the median only).

        With an outer optimizer the new model is the outer step's result rather than the rule's output: it
        moves every distance alike, so the scores stay comparable but are less sharp.
        """
        peers = {c: agg.models[c].state for c in received if c != self.me}
        own = [agg.models[self.me].state] if self.me in agg.models else []
        if base is None:  # without a base (mean, median...), the one this node trained from, if it matches
            held = self._bases.get(agg.index - 1)
            base = held if held is not None and held.digest == self._base_digest(agg) else None
        if peers:
            self.suspicion.observe_states(peers, new_state, others=own,
                                          reference=base.state if base is not None else None)

    async def _push_model(self, targets: Sequence[str], round_: int, state: State, outer: State, *,
                          parent: bytes, combined: int, sample_key: bytes = b"") -> list[str]:
        """Send version `round_` (and the view) to `targets`; return those that accepted it, in order.

        With secure aggregation the message also names `targets` as the sample of `round_`, and
        `sample_key` as the key that ordered its candidates: the users and the checkable claim of the
        secure aggregation of ``round_ + 1``.
        """
        if not targets:
            return []
        s = self.settings
        sample = tuple(targets) if self._secagg is not None else ()
        key = sample_key if self._secagg is not None else b""
        body = peer_pb2.ModestModel(run_id=s.run_id, config_hash=s.config_hash, round=round_,
                                    round_estimate=self.round, view=self.view.to_proto(), parent_digest=parent,
                                    combined=combined, sample=sample, sample_key=key)
        msg = Message(body, {**state, **self._outer_tensors(outer)})

        async def one(peer: str) -> bool:
            if peer == self.me:
                return self._offer(_Incoming(round_, state, outer, self.me, parent, combined, sample, key))
            try:
                resp = await self.transport.call(peer, MODEL, msg, peer_pb2.ModestModelAck,
                                                 timeout=s.exchange_timeout_s)
            except TransportError as e:
                logger.info("%s: sending version %d to %s failed: %s", self._me_short, round_, _short(peer), e)
                self.health.failed(peer, round_)
                return False
            self._heard(peer, resp.body.round_estimate)
            return bool(resp.body.accepted)

        results = await asyncio.gather(*(one(p) for p in targets))
        return [p for p, ok in zip(targets, results, strict=True) if ok]

    # -- reports and shutdown -----------------------------------------------------------------------
    def _report(self, role: str, *, train_loss: float = math.nan, failures: int = 0,
                partner: str | None = None) -> RoundReport:
        events, self._events = self._events, []
        last = events[-1] if events else None
        return RoundReport(round=self.round, train_loss=float(train_loss),
                           test_loss=last.test_loss if last else None, accuracy=last.accuracy if last else None,
                           peers=len(self.view.active(self.round)) - 1,
                           combined=len(last.contributors) if last else self._held_combined,
                           fraction=1.0, partner=partner, failures=failures,
                           extra={"role": role, "aggregated": [e.index for e in events]})

    async def close(self) -> None:
        """Answer waiting trainers with ``leaving``, stop background work, and announce a LEAVE."""
        if self._closing:
            return
        self._closing = True
        for agg in self._aggregations.values():
            if agg.state != "done":
                agg.resolve(_Result(False, "leaving"))
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.settings.leave_on_close and self._started:
            try:
                await self._advertise(LEAVE)
            except Exception as e:  # leaving must never fail a shutdown
                logger.warning("%s: could not announce the leave: %s", self._me_short, e)
        self._inbox = None
        self._bases.clear()
