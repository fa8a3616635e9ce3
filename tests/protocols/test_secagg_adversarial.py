"""Secure aggregation against bad input: replayed, reordered, wrong-stage, wrong-round, malformed and
oversized messages and forged keys are refused with a clear error and a counter, and the round still
completes with the sender treated as dropped. Also the users' checks on what a malicious aggregator
relays."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.errors import RemoteError
from p2pnode.proto import secagg_pb2
from p2pnode.secagg import (
    Contribution,
    SecAggAborted,
    SecAggHost,
    SecAggResult,
    SecAggSettings,
    SecAggUser,
    Session,
    Stage,
    Status,
    UserReport,
    plan,
    shamir,
)
from p2pnode.secagg import keys as K
from p2pnode.secagg.errors import SecAggError
from p2pnode.secagg.quantize import FixedPoint
from p2pnode.secagg.randomness import SeededRandomness
from p2pnode.secagg.state import UserState
from p2pnode.secagg.wire import REPLY_TYPES, session_proto
from p2pnode.transport.base import Transport
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.codec import Message
from p2pnode.transport.memory import MemoryNetwork

N, T, D = 5, 3, 8
IDS = tuple(f"p{i}" for i in range(N))
STEP = FixedPoint(dim=1).step
SETTINGS = SecAggSettings(threshold=T)


def identity(peer: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(SeededRandomness(b"id", peer.encode()).token_bytes(32))


IDENTITY_KEYS = {p: identity(p).public_key().public_bytes_raw() for p in (*IDS, "outsider")}


def value(i: int) -> torch.Tensor:
    return torch.full((D,), float(i + 1))


@dataclass
class Ctx:
    """What an attack sees: the network, the instance and its transports."""

    net: MemoryNetwork
    session: Session
    aggregator: Transport
    transports: dict[str, Transport] = field(default_factory=dict)

    @property
    def plan(self) -> Any:
        return plan(self.session, SETTINGS)

    async def send(self, sender: Transport, stage: Stage, body: Any, tensors: dict[str, torch.Tensor] | None = None,
                   timeout: float = 100.0) -> Any:
        msg = Message(body, tensors or {})
        return (await sender.call("agg", stage.method, msg, _reply_type(stage), timeout)).body


def _reply_type(stage: Stage) -> Any:
    return REPLY_TYPES[stage]


def advert(ctx: Ctx, peer: str, *, index: int | None = None, sign_with: Ed25519PrivateKey | None = None,
           digest: bytes | None = None, seed: bytes = b"adv") -> secagg_pb2.SecAggAdvertise:
    """A well-formed advertisement of `peer` (valid keys, commitment and, optionally, signature)."""
    p = ctx.plan
    idx = index if index is not None else ctx.session.index(peer)
    r = SeededRandomness(seed, peer.encode())
    _, cpk = K.generate(r)
    _, mpk = K.generate(r)
    d = digest if digest is not None else p.digest
    commit = K.commitment(d, idx, r.token_bytes(32))
    keys = secagg_pb2.SecAggKeys(index=idx, cipher_public_key=cpk, mask_public_key=mpk, self_mask_commitment=commit)
    if sign_with is not None:
        keys.signature = K.sign(sign_with, K.advertise_payload(d, idx, peer, cpk, mpk, commit))
    return secagg_pb2.SecAggAdvertise(session=session_proto(p), keys=keys, members=ctx.session.users,
                                      dim=ctx.session.dim)


@dataclass
class Outcome:
    result: SecAggResult | None
    error: SecAggAborted | None
    reports: dict[str, UserReport]
    rejected: dict[str, int]
    attack: Any


UserFactory = Callable[[Session, SecAggSettings, Transport], SecAggUser]


def run_round(attack: Callable[[Ctx], Awaitable[Any]] | None = None, *, honest: tuple[str, ...] = IDS,
              users: dict[str, UserFactory] | None = None, identities: bool = False,
              aggregator_max_bytes: int | None = None, round_: int = 0, start_late: dict[str, float] | None = None,
              train_for: dict[str, float] | None = None) -> Outcome:
    """One instance with the honest users `honest`, users built by `users`, and an `attack` beside them.

    `start_late` delays a user's start, `train_for` the moment its input is ready (virtual seconds).
    """
    async def user_run(u: SecAggUser, x: torch.Tensor, late: float, train: float) -> UserReport:
        async def training() -> Contribution:
            await asyncio.sleep(train)
            return Contribution(x)

        await asyncio.sleep(late)
        return await u.run(training())

    async def main() -> Outcome:
        net = MemoryNetwork()
        agg_t = (net.transport("agg", max_message_bytes=aggregator_max_bytes) if aggregator_max_bytes
                 else net.transport("agg"))
        host = SecAggHost(agg_t)
        session = Session("run", round_, "agg", IDS, dim=D)
        ctx = Ctx(net, session, agg_t)
        for p in (*IDS, "outsider"):
            ctx.transports[p] = net.transport(p)
        ik = {p: IDENTITY_KEYS[p] for p in IDS} if identities else None
        agg = asyncio.ensure_future(host.aggregate(session, SETTINGS, identity_keys=ik))
        tasks: dict[str, asyncio.Future[UserReport]] = {}
        for i, p in enumerate(IDS):
            factory = (users or {}).get(p)
            if factory is None and p not in honest:
                continue
            kw: dict[str, Any] = {"randomness": SeededRandomness(p.encode())}
            if identities:
                kw |= {"identity": identity(p), "identity_keys": ik}
            u = factory(session, SETTINGS, ctx.transports[p]) if factory else SecAggUser(
                session, SETTINGS, ctx.transports[p], **kw)
            tasks[p] = asyncio.ensure_future(user_run(u, value(i), (start_late or {}).get(p, 0.0),
                                                      (train_for or {}).get(p, 0.0)))
        attack_task = asyncio.ensure_future(attack(ctx)) if attack else None
        result = error = None
        try:
            result = await agg
        except SecAggAborted as e:
            error = e
        reports = {p: await t for p, t in tasks.items()}
        attack_result = await attack_task if attack_task else None
        return Outcome(result, error, reports, dict(agg_t.stats.rejected), attack_result)

    return run_virtual(main())


def assert_sum_of(out: Outcome, members: list[str]) -> None:
    assert out.result is not None, out.error
    assert list(out.result.survivors) == members
    ref = sum(float(IDS.index(p) + 1) for p in members)
    assert float((out.result.weighted_sum - ref).abs().max()) <= len(members) * STEP


async def expect_refusal(coro: Awaitable[Any], code: str, match: str) -> str:
    with pytest.raises(RemoteError, match=match) as info:
        await coro
    assert info.value.code == code
    return str(info.value)


# -- who may talk, and about which instance ------------------------------------------------------

def test_peer_outside_the_sample_is_refused() -> None:
    async def attack(ctx: Ctx) -> None:
        out = ctx.transports["outsider"]
        body = advert(ctx, "p4")  # keys in a member's name, but the channel says "outsider"
        await expect_refusal(ctx.send(out, Stage.ADVERTISE, body), "wrong_run", "not in this instance's sample")

    out = run_round(attack)
    assert_sum_of(out, list(IDS))
    assert out.rejected == {"wrong_run": 1}


def test_wrong_round_wrong_instance_and_finished_round() -> None:
    async def attack(ctx: Ctx) -> None:
        bad = ctx.transports["p4"]
        later = advert(ctx, "p4")
        later.session.round = 7
        await expect_refusal(ctx.send(bad, Stage.ADVERTISE, later), "unavailable", "no secagg instance open")
        other = advert(ctx, "p4")
        other.session.digest = b"\x00" * 32  # same run and round, another sample or config: another instance
        await expect_refusal(ctx.send(bad, Stage.ADVERTISE, other), "unavailable", "with this session digest")
        await asyncio.sleep(200.0)  # the round is over
        await expect_refusal(ctx.send(bad, Stage.ADVERTISE, advert(ctx, "p4")), "stale", "has finished")

    out = run_round(attack, honest=IDS[:4])
    assert_sum_of(out, list(IDS[:4]))
    assert out.rejected == {"stale": 1}


def test_wrong_stage_and_reordered_messages_are_refused_and_sender_counts_as_dropped() -> None:
    async def attack(ctx: Ctx) -> None:
        bad = ctx.transports["p4"]
        s = session_proto(ctx.plan)
        masked = {"masked": torch.zeros(ctx.plan.encoding.length, dtype=torch.int32)}
        await expect_refusal(ctx.send(bad, Stage.MASKED, secagg_pb2.SecAggMasked(session=s), masked),
                             "malformed", "while stage advertise is open")
        await expect_refusal(ctx.send(bad, Stage.UNMASK, secagg_pb2.SecAggUnmask(session=s)), "malformed",
                             "stages run in the order")
        await expect_refusal(ctx.send(bad, Stage.SHARE, secagg_pb2.SecAggShare(session=s)), "malformed",
                             "while stage advertise is open")

    out = run_round(attack, honest=IDS[:4])
    assert_sum_of(out, list(IDS[:4]))
    assert out.rejected == {"malformed": 3}
    assert out.result is not None and out.result.dropped["advertise"] == ("p4",)


def test_late_message_after_its_stage_closed_is_stale() -> None:
    async def attack(ctx: Ctx) -> None:
        await asyncio.sleep(SETTINGS.timeouts.advertise_s + 5)  # the advertise stage closed without p4
        await expect_refusal(ctx.send(ctx.transports["p4"], Stage.ADVERTISE, advert(ctx, "p4")), "stale",
                             "after that stage closed")

    # p3 trains for 60 s: the masked stage is still open when p4's late advertisement arrives.
    out = run_round(attack, honest=IDS[:4], train_for={"p3": 60.0})
    assert_sum_of(out, list(IDS[:4]))


class ReplayingUser(SecAggUser):
    """Sends its advertise and share messages twice (the same bytes), as a replay would."""

    refusals: list[str]

    async def _call(self, stage: Stage, body: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
        if stage in (Stage.ADVERTISE, Stage.MASKED):
            first = asyncio.ensure_future(super()._call(stage, body, tensors))
            await asyncio.sleep(0.1)
            try:
                await super()._call(stage, body, tensors)
            except RemoteError as e:
                self.refusals.append(f"{e.code}: {e}")
            return await first
        return await super()._call(stage, body, tensors)


def test_replayed_messages_are_refused_and_the_first_stands() -> None:
    replayer: list[ReplayingUser] = []

    def make(session: Session, settings: SecAggSettings, transport: Transport) -> SecAggUser:
        u = ReplayingUser(session, settings, transport, randomness=SeededRandomness(b"p2"))
        u.refusals = []
        replayer.append(u)
        return u

    # p4 starts late and trains late, so the advertise and masked stages are still open for the copies.
    out = run_round(users={"p2": make}, start_late={"p4": 1.0}, train_for={"p4": 1.0})
    assert_sum_of(out, list(IDS))  # p2 is in: only its copies were refused
    assert len(replayer[0].refusals) == 2 and all("duplicate" in r for r in replayer[0].refusals)
    assert out.rejected == {"stale": 2}


def test_keys_replayed_into_another_round_fail_their_signature() -> None:
    async def attack(ctx: Ctx) -> None:
        bad = ctx.transports["p4"]
        # A signed advertisement of p4 from round 0, its session header rewritten for this round (1).
        old_digest = plan(Session("run", 0, "agg", IDS, dim=D), SETTINGS).digest
        body = advert(ctx, "p4", sign_with=identity("p4"), digest=old_digest)
        await expect_refusal(ctx.send(bad, Stage.ADVERTISE, body), "malformed", "does not verify")

    out = run_round(attack, honest=IDS[:4], identities=True, round_=1)
    assert_sum_of(out, list(IDS[:4]))
    assert out.rejected == {"malformed": 1}


def test_forged_and_unsigned_keys_are_refused() -> None:
    async def attack(ctx: Ctx) -> None:
        bad = ctx.transports["p4"]
        forged = advert(ctx, "p4", sign_with=identity("outsider"))
        await expect_refusal(ctx.send(bad, Stage.ADVERTISE, forged), "malformed", "forged or replayed")
        await expect_refusal(ctx.send(bad, Stage.ADVERTISE, advert(ctx, "p4")), "malformed", "does not verify")

    out = run_round(attack, honest=IDS[:4], identities=True)
    assert_sum_of(out, list(IDS[:4]))
    assert out.rejected == {"malformed": 2}


# -- malformed and oversized ----------------------------------------------------------------------

@pytest.mark.parametrize(("field_name", "bad", "code"), [
    ("cipher_public_key", b"\x09" * 31, "malformed"),
    ("mask_public_key", bytes(32), "malformed"),  # a low-order point
    ("self_mask_commitment", b"c" * 40, "oversized"),
    ("signature", b"s" * 5000, "oversized"),
    ("index", 2, "malformed"),
    ("cipher_public_key", "mask", "malformed"),  # both keys equal
    ("members", "members", "malformed"),  # a sample other than the one the digest covers
])
def test_malformed_advertisements(field_name: str, bad: Any, code: str) -> None:
    async def attack(ctx: Ctx) -> str:
        body = advert(ctx, "p4")
        if bad == "mask":
            body.keys.cipher_public_key = body.keys.mask_public_key
        elif bad == "members":
            body.members.append("p9")
        else:
            setattr(body.keys, field_name, bad)
        with pytest.raises(RemoteError) as info:
            await ctx.send(ctx.transports["p4"], Stage.ADVERTISE, body)
        assert info.value.code == code
        return str(info.value)

    out = run_round(attack, honest=IDS[:4])
    assert_sum_of(out, list(IDS[:4]))
    assert out.rejected == {code: 1}
    assert "p4" not in str(out.result.survivors if out.result else "")


def _share_attack(mutate: Callable[[Ctx, secagg_pb2.SecAggShare], None], code: str, match: str
                  ) -> Callable[[Ctx], Awaitable[None]]:
    async def attack(ctx: Ctx) -> None:
        bad = ctx.transports["p4"]
        await ctx.send(bad, Stage.ADVERTISE, advert(ctx, "p4"))
        body = secagg_pb2.SecAggShare(session=session_proto(ctx.plan))
        for j in range(1, 5):
            body.ciphertexts.add(sender=5, recipient=j, ciphertext=b"x" * K.CIPHERTEXT_BYTES)
        mutate(ctx, body)
        await expect_refusal(ctx.send(bad, Stage.SHARE, body), code, match)

    return attack


@pytest.mark.parametrize(("mutate", "code", "match"), [
    (lambda ctx, b: b.ciphertexts[0].__setattr__("ciphertext", b"x" * 100_000), "oversized", "100000 bytes"),
    (lambda ctx, b: [b.ciphertexts.add(sender=5, recipient=1, ciphertext=b"y") for _ in range(50)], "oversized",
     "at most 4"),
    (lambda ctx, b: b.ciphertexts[0].__setattr__("sender", 2), "malformed", "in the name of user 2"),
    (lambda ctx, b: b.ciphertexts[0].__setattr__("recipient", 77), "malformed", "not in 1..5"),
    (lambda ctx, b: b.ciphertexts.pop(), "malformed", "must share with all of them"),
])
def test_malformed_and_oversized_shares(mutate: Any, code: str, match: str) -> None:
    out = run_round(_share_attack(mutate, code, match), honest=IDS[:4])
    assert_sum_of(out, list(IDS[:4]))
    assert out.result is not None and out.result.dropped["share"] == ("p4",)


class BadMaskedUser(SecAggUser):
    """Sends a masked input of the wrong shape or dtype."""

    mode = "shape"

    def _masked(self, premask: np.ndarray, noise: np.ndarray, c: Contribution) -> torch.Tensor:
        good = super()._masked(premask, noise, c)
        if self.mode == "shape":
            return torch.cat([good, good])
        if self.mode == "huge":
            return torch.zeros(100_000, dtype=torch.int32)
        return good.to(torch.float32)


@pytest.mark.parametrize(("mode", "code", "max_bytes"), [("shape", "bad_shape", None), ("dtype", "bad_shape", None),
                                                          ("huge", "oversized", 64_000)])
def test_malformed_or_oversized_masked_input_drops_its_sender(mode: str, code: str, max_bytes: int | None) -> None:
    def make(session: Session, settings: SecAggSettings, transport: Transport) -> SecAggUser:
        u = BadMaskedUser(session, settings, transport, randomness=SeededRandomness(b"p1"))
        u.mode = mode
        return u

    out = run_round(users={"p1": make}, aggregator_max_bytes=max_bytes)
    # p1's shares were distributed (U2) but its input never counted: its pairwise masks are removed.
    assert_sum_of(out, ["p0", "p2", "p3", "p4"])
    assert out.result is not None and out.result.dropped["masked"] == ("p1",)
    assert out.reports["p1"].status is Status.ABORTED and out.reports["p1"].reason
    assert out.rejected == {code: 1}


class BadRevealUser(SecAggUser):
    """At unmask, reveals what an honest user never would, or a corrupt share."""

    mode = "both"

    def _reveal(self, st: UserState) -> secagg_pb2.SecAggUnmask:
        body = super()._reveal(st)
        if self.mode == "both":  # also the mask-key share of a survivor
            owner = body.self_mask_shares[0].owner
            body.mask_key_shares.add(owner=owner, share=shamir.encode(st.held.get(owner, st.own_shares)[0]))
        elif self.mode == "corrupt":  # a wrong (but well-formed) self-mask share of every survivor
            for r in body.self_mask_shares:
                r.share = shamir.encode((shamir.decode(r.share) + 1) % shamir.PRIME)
        return body


@pytest.mark.parametrize("mode", ["both", "corrupt"])
def test_bad_unmask_messages(mode: str) -> None:
    def make(session: Session, settings: SecAggSettings, transport: Transport) -> SecAggUser:
        u = BadRevealUser(session, settings, transport, randomness=SeededRandomness(b"p0"))
        u.mode = mode
        return u

    out = run_round(users={"p0": make})
    # p0 sent its masked input, so its input is in the sum either way.
    assert_sum_of(out, list(IDS))
    if mode == "both":
        assert out.rejected == {"malformed": 1}
        assert out.reports["p0"].status is Status.ABORTED
    else:  # corrupt shares are caught by the commitments; with more shares another subset opens them
        assert out.rejected == {}
        assert out.result is not None and out.result.dropped["unmask"] == ()


def test_a_user_whose_identity_key_is_unknown_cannot_take_part() -> None:
    """With identity keys, a member missing from them is refused at once (the stage does not wait for it),
    and a user that does not know a member's key stops when the aggregator relays that member's keys."""
    known = {p: IDENTITY_KEYS[p] for p in IDS if p != "p4"}

    async def main() -> tuple[Any, list[UserReport], float, dict[str, int]]:
        net = MemoryNetwork()
        agg_t = net.transport("agg")
        host = SecAggHost(agg_t)
        session = Session("run", 1, "agg", IDS, dim=D)
        agg = asyncio.ensure_future(host.aggregate(session, SETTINGS, identity_keys=known))
        users = [SecAggUser(session, SETTINGS, net.transport(p), identity=identity(p),
                            identity_keys={k: v for k, v in known.items() if not (p == "p0" and k == "p1")},
                            randomness=SeededRandomness(p.encode())) for p in IDS]
        reports = list(await asyncio.gather(*(u.run(Contribution(value(i))) for i, u in enumerate(users))))
        return await agg, reports, asyncio.get_running_loop().time(), dict(agg_t.stats.rejected)

    result, reports, elapsed, rejected = run_virtual(main())
    assert rejected.get("unknown_identity") == 1
    p0, p4 = reports[0], reports[4]
    assert p4.status is Status.ABORTED and p4.reason is not None and "no identity key is known" in p4.reason
    assert p0.status is Status.ABORTED and p0.reason is not None and "does not know" in p0.reason
    assert list(result.survivors) == ["p1", "p2", "p3"]
    # Only the share stage ran to its timeout (waiting for p0, which stopped); the advertise stage did not
    # wait for p4.
    assert elapsed < SETTINGS.timeouts.advertise_s + SETTINGS.timeouts.share_s


# -- what the users check in the aggregator's replies ---------------------------------------------

def _user(identities: bool = True) -> tuple[SecAggUser, UserState, secagg_pb2.SecAggKeys]:
    session = Session("run", 0, "agg", IDS, dim=D)
    u = SecAggUser(session, SETTINGS, MemoryNetwork().transport("p0"), identity=identity("p0"),
                   identity_keys=IDENTITY_KEYS if identities else None, randomness=SeededRandomness(b"p0"))
    st, mine = u._start()
    return u, st, mine


def test_user_rejects_forged_or_inconsistent_key_lists() -> None:
    u, st, mine = _user()
    ctx = Ctx(MemoryNetwork(), u.plan.session, MemoryNetwork().transport("agg"))
    good = [advert(ctx, p, sign_with=identity(p)).keys for p in IDS[1:]]
    u._on_keys(st, mine, secagg_pb2.SecAggAdvertiseReply(keys=[mine, *good]))
    assert sorted(st.keys) == [1, 2, 3, 4, 5]
    cases: list[tuple[list[secagg_pb2.SecAggKeys], str]] = [
        ([mine, advert(ctx, "p1", sign_with=identity("p2")).keys, *good[1:]], "fail their identity signature"),
        ([advert(ctx, "p0", sign_with=identity("p0")).keys, *good], "other keys under this user's own index"),
        ([mine, good[0], good[0]], "appears twice"),
        ([mine, good[0]], "threshold"),
    ]
    for entries, match in cases:
        _, st2, _ = _user()
        with pytest.raises(SecAggError, match=match):
            u._on_keys(st2, mine, secagg_pb2.SecAggAdvertiseReply(keys=entries))


def test_user_rejects_tampered_relayed_shares() -> None:
    u, st, mine = _user(identities=False)
    ctx = Ctx(MemoryNetwork(), u.plan.session, MemoryNetwork().transport("agg"))
    st.keys = {1: mine, **{i + 2: advert(ctx, p).keys for i, p in enumerate(IDS[1:])}}
    reply = secagg_pb2.SecAggShareReply()
    reply.ciphertexts.add(sender=2, recipient=1, ciphertext=b"z" * K.CIPHERTEXT_BYTES)
    with pytest.raises(SecAggError, match="fail authentication"):
        u._on_shares(st, reply)
    reply = secagg_pb2.SecAggShareReply()
    reply.ciphertexts.add(sender=2, recipient=3, ciphertext=b"z" * K.CIPHERTEXT_BYTES)
    with pytest.raises(SecAggError, match="did not expect"):
        u._on_shares(st, reply)
