"""Settings of secure aggregation, the description of one instance, and the parameters resolved from them.

`SecAggSettings` is what a run configures (``--secagg-neighbours`` and ``--secagg-threshold`` map to
`SecAggSettings.neighbours` and `SecAggSettings.threshold`). `Session` names one instance: a run, a
round, its aggregator, the sample of users and the vector layout. `Plan` is what every party derives
alike from the two (`plan`): the graph, the threshold, the modulus, the encoding and the digest that
binds every key and message to the instance. A setting that cannot work (too few users, a threshold
out of range, a sum that could overflow) is refused with `ConfigError`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2pnode.aggregation import available_rules
from p2pnode.errors import ConfigError
from p2pnode.secagg import graph
from p2pnode.secagg.prg import ALGORITHMS
from p2pnode.secagg.quantize import FixedPoint, choose_word_bits
from p2pnode.secagg.stages import Stage

#: Largest sample one instance accepts (the aggregator's work grows as n * k).
MAX_USERS = 4096


@dataclass(frozen=True)
class StageTimeouts:
    """How long the aggregator keeps each stage open, in seconds.

    A stage closes early once every expected user has sent its message (the masked stage also when
    `SecAggSettings.masked_quorum` inputs are in; the unmask stage once every needed secret can be
    reconstructed).

    :param advertise_s: from opening the instance (default 30).
    :param share_s: from the close of the advertise stage (default 30).
    :param masked_s: from the close of the share stage; it must cover local training when users
        advertise and share before training, as MoDeST trainers do (default 120).
    :param unmask_s: from the close of the masked stage (default 30).
    """

    advertise_s: float = 30.0
    share_s: float = 30.0
    masked_s: float = 120.0
    unmask_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("advertise_s", "share_s", "masked_s", "unmask_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"secagg timeouts.{name} must be a finite number > 0, got {v!r}")

    def of(self, stage: Stage) -> float:
        """The timeout of `stage`, in seconds."""
        return float((self.advertise_s, self.share_s, self.masked_s, self.unmask_s)[stage])


@dataclass(frozen=True)
class SecAggSettings:
    """Settings of secure aggregation (run-wide; every member of an instance must use the same).

    :param threshold: shares needed to reconstruct a user's secret, among its ``k + 1`` holders;
        with the complete graph, the classic SecAgg ``t``: the sum is recovered when at least ``t``
        users remain at unmasking. None (default): the smallest integer above 2/3 of the holders.
        Must be a strict majority of the holders (``--secagg-threshold``).
    :param neighbours: ``k``, the number of other users each user masks with and shares with; even
        unless it makes the graph complete. None (default): the complete graph for samples of up to
        `complete_up_to` users, else `graph.choose_neighbours` (``--secagg-neighbours``).
    :param complete_up_to: largest sample that uses the complete graph by default (default 32).
    :param dropout: dropout rate assumed when choosing ``k`` (default 0.05).
    :param corruption: fraction of corrupt users assumed when choosing ``k`` (default 0.05).
    :param clip: model coordinates are clipped to ``[-clip, clip]`` (default 8.0).
    :param levels: quantization levels ``Q`` per coordinate (default 2^22: step 2 clip / Q = 3.8e-6).
    :param modulus_bits: 32 or 64 to force the modulus ``2^bits``; None (default): 32 when the sum of
        the sample cannot overflow it, else 64.
    :param extra_range: clip range ``(lo, hi)`` of extra coordinates such as VCA's per-layer
        variances (default (0.0, 1.0)).
    :param max_weight: largest user weight (for example examples seen); weights are divided by it
        (default 1.0: every user has weight 1, the unweighted mean of MoDeST).
    :param prg: mask generator, ``"aes-256-ctr"`` (default) or ``"chacha20"``.
    :param timeouts: per-stage timeouts at the aggregator (see `StageTimeouts`).
    :param open_timeout_s: how long a user keeps retrying while the aggregator has not opened the
        instance yet, in seconds (default 30).
    :param grace_s: how long a user waits for a reply beyond the stage's timeout, in seconds: the
        time a reply needs on the wire (default 10).
    :param retry_interval_s: pause between a user's retries, in seconds (default 0.5).
    :param masked_quorum: the aggregator closes the masked stage once this many masked inputs are
        in (MoDeST's ``sf * s``); None (default): it waits for every user of U2 or the timeout.
    """

    threshold: int | None = None
    neighbours: int | None = None
    complete_up_to: int = 32
    dropout: float = 0.05
    corruption: float = 0.05
    clip: float = 8.0
    levels: int = 2**22
    modulus_bits: int | None = None
    extra_range: tuple[float, float] = (0.0, 1.0)
    max_weight: float = 1.0
    prg: str = "aes-256-ctr"
    timeouts: StageTimeouts = field(default_factory=StageTimeouts)
    open_timeout_s: float = 30.0
    grace_s: float = 10.0
    retry_interval_s: float = 0.5
    masked_quorum: int | None = None

    def __post_init__(self) -> None:
        if self.prg not in ALGORITHMS:
            raise ConfigError(f"secagg prg must be one of {', '.join(ALGORITHMS)}, got {self.prg!r}")
        for name in ("dropout", "corruption"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"secagg {name} must be a rate in [0, 1), got {v!r}")
        for name in ("open_timeout_s", "grace_s", "retry_interval_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"secagg {name} must be a finite number > 0, got {v!r}")
        if self.complete_up_to < 2:
            raise ConfigError(f"secagg complete_up_to must be >= 2, got {self.complete_up_to}")


@dataclass(frozen=True)
class Session:
    """One instance: a run, a round, its aggregator (the server) and its sample of users.

    :param run_id: the run.
    :param round: the round (MoDeST: the model version being aggregated).
    :param aggregator: peer id of the server of this instance.
    :param users: peer ids of the sample (the trainers); any order, stored sorted. A user's index
        (its Shamir x-coordinate) is its 1-based position in the sorted list.
    :param dim: number of model coordinates each user contributes.
    :param extras: number of extra coordinates (for example per-layer variances for VCA; default 0).
    :param group: which group of the round's sample this instance aggregates, when the sample is split
        into several instances (``--secagg-groups``); default 0 (the whole sample, or its first group).
    """

    run_id: str
    round: int
    aggregator: str
    users: tuple[str, ...]
    dim: int
    extras: int = 0
    group: int = 0

    def __post_init__(self) -> None:
        users = tuple(sorted(self.users))
        object.__setattr__(self, "users", users)
        if len(set(users)) != len(users):
            raise ConfigError("secagg: the sample lists a user twice")
        if not all(isinstance(u, str) and u for u in users):
            raise ConfigError("secagg: user ids must be non-empty strings")
        if len(users) < 2:
            raise ConfigError(f"secagg needs at least 2 users (a sum of one input is that input), got {len(users)}")
        if len(users) > MAX_USERS:
            raise ConfigError(f"secagg accepts at most {MAX_USERS} users per instance, got {len(users)}")
        if self.round < 0 or self.dim < 1 or self.extras < 0 or self.group < 0:
            raise ConfigError(f"secagg: round >= 0, dim >= 1, extras >= 0 and group >= 0 needed, got "
                              f"{self.round}, {self.dim}, {self.extras}, {self.group}")

    def index(self, peer_id: str) -> int:
        """1-based index of `peer_id` in the sample; `ConfigError` if it is not a member."""
        try:
            return self.users.index(peer_id) + 1
        except ValueError:
            raise ConfigError(f"{peer_id!r} is not a user of this secagg instance") from None


@dataclass(frozen=True)
class Plan:
    """Everything the parties of one instance derive alike from (`Session`, `SecAggSettings`)."""

    session: Session
    settings: SecAggSettings
    #: k: neighbours of each user (n - 1 for the complete graph).
    neighbours: int
    #: t: shares needed per secret.
    threshold: int
    word_bits: int
    encoding: FixedPoint
    #: neighbours of user i (1-based) at graph[i - 1], self excluded.
    graph: tuple[tuple[int, ...], ...]
    digest: bytes

    @property
    def n(self) -> int:
        """Number of users."""
        return len(self.session.users)

    @property
    def complete(self) -> bool:
        """Whether the graph is complete (classic SecAgg)."""
        return self.neighbours >= self.n - 1

    def holders(self, index: int) -> tuple[int, ...]:
        """Users that hold shares of `index`'s secrets: its neighbours and itself, sorted."""
        return tuple(sorted((*self.graph[index - 1], index)))


def _digest(fields: Sequence[bytes]) -> bytes:
    h = hashlib.sha256(b"p2pnode/secagg/v1 session")
    for f in fields:
        h.update(len(f).to_bytes(8, "big"))
        h.update(f)
    return h.digest()


def plan(session: Session, settings: SecAggSettings) -> Plan:
    """Resolve the parameters of `session` under `settings`; raises `ConfigError` for unusable ones."""
    n = len(session.users)
    if settings.neighbours is None:
        k = n - 1 if n <= settings.complete_up_to else graph.choose_neighbours(n, settings.dropout,
                                                                                 settings.corruption)
    else:
        k = settings.neighbours
        if k < 1:
            raise ConfigError(f"secagg neighbours must be >= 1, got {k}")
        k = min(k, n - 1)
        if k < n - 1 and k % 2:
            raise ConfigError(f"secagg neighbours must be even for a Harary graph (or >= n - 1 = {n - 1} for the "
                              f"complete graph), got {k}")
    holders = k + 1
    t = graph.default_threshold(holders) if settings.threshold is None else settings.threshold
    lowest = graph.min_threshold(holders)
    if not lowest <= t <= holders:
        raise ConfigError(
            f"secagg threshold must be in [{lowest}, {holders}] for {holders} share holders (each user and its "
            f"{k} neighbours): a strict majority, so that an aggregator lying about who dropped cannot obtain "
            f"both secrets of one user; got {t}")
    bits = choose_word_bits(settings.levels, n, settings.modulus_bits)
    encoding = FixedPoint(dim=session.dim, extras=session.extras, clip=settings.clip, levels=settings.levels,
                          extra_range=settings.extra_range, max_weight=settings.max_weight, word_bits=bits)
    fields = [
        session.run_id.encode(), str(session.round).encode(), session.aggregator.encode(),
        "\x00".join(session.users).encode(), str(session.dim).encode(), str(session.extras).encode(),
        str(k).encode(), str(t).encode(), str(bits).encode(), str(settings.levels).encode(),
        struct.pack("<4d", settings.clip, *settings.extra_range, settings.max_weight), settings.prg.encode(),
    ]
    if session.group:
        # Only a group other than 0 enters the digest, so that the digest (hence the graph and the masks)
        # of an unsplit sample stays what it always was.
        fields.append(b"group " + str(session.group).encode())
    digest = _digest(fields)
    return Plan(session, settings, k, t, bits, encoding, graph.neighbours(n, k, digest), digest)


#: Rules that reduce to a (weighted) sum of per-user vectors, so they run on what secure aggregation reveals.
SUM_RULES: tuple[str, ...] = ("mean", "vca")


def check_rule_compatible(rule: str, *, across_samples: bool = False) -> None:
    """Refuse an aggregation rule that cannot run on the output of secure aggregation.

    Inside one sample the aggregator learns only the sum of the users' vectors, so only rules that
    reduce to a sum work: ``mean`` (the weight travels as an extra coordinate) and ``vca`` (each user
    adds its per-layer variances as extra coordinates; the sum gives the VCA target). Every other rule
    of `p2pnode.aggregation` (``flag``, ``median``, ``krum``, ...) needs each update in the clear.

    :param rule: the aggregation rule's name.
    :param across_samples: True when the rule combines the outputs of several secure instances (one
        per sample or group, MoDeST with more than one aggregator), not individual updates; then every
        rule is allowed: "secure within a sample, robust across samples" (docs/secagg.md).

    Raises `ConfigError` with the reason and the alternatives.
    """
    if rule in SUM_RULES:
        return
    known = available_rules()
    if rule not in known:
        raise ConfigError(f"unknown aggregation rule {rule!r}; available: {', '.join(known)}")
    if across_samples:
        return
    raise ConfigError(
        f"aggregation rule {rule!r} needs each update in the clear, but with secagg the aggregator of a sample "
        f"sees only their sum; use {' or '.join(SUM_RULES)} inside a sample, apply {rule!r} across the secure "
        f"sums of several samples (MoDeST with a > 1 aggregators), or turn secagg off")
