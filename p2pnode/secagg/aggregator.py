"""The server role of one instance: the round's aggregator.

Users call the aggregator once per stage; the aggregator holds each call until the stage closes and
answers with what the users need for the next stage (long polling over the request/response
transport). A stage closes when every expected user has sent its message, or when its timeout
(`StageTimeouts`) runs out; then the threshold check of that stage runs, and the instance aborts
loudly (`SecAggAborted`) when it fails. Users that are silent, late or whose message is refused are
simply treated as dropped.

Reconstruction at the end (algorithms.md 5.3, round 4)::

    sum_{u in U3} x_u = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u)
                        + sum_{v in U2 \\ U3} sum_{u in U3 adjacent to v} sign(v, u) PRG(s_{v,u})   (mod R)

with ``sign(v, u) = +1`` if ``v > u`` else ``-1``, which adds back ``p_{v,u} = -p_{u,v}``. The
reconstruction of the secrets and the removal of the masks are `p2pnode.secagg.unmask`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from p2pnode.errors import BadMessage, TransportError
from p2pnode.proto import secagg_pb2
from p2pnode.secagg import keys, shamir, unmask
from p2pnode.secagg.errors import SecAggAborted
from p2pnode.secagg.prg import word_dtype
from p2pnode.secagg.settings import Plan
from p2pnode.secagg.stages import STAGES, Stage, Status
from p2pnode.secagg.state import AggregatorState, SecAggResult
from p2pnode.secagg.timing import CpuClock, cpu_call
from p2pnode.secagg.wire import (
    MASKED_TENSOR,
    check_bytes,
    check_count,
    check_index,
    check_session,
    masked_dtype,
)
from p2pnode.transport.codec import Message, check_tensors

logger = logging.getLogger(__name__)

#: Refusal code of a user whose identity key the aggregator does not know (it cannot take part).
UNKNOWN_IDENTITY = "unknown_identity"

#: Called with (user index, masked words) for every masked input accepted: what the aggregator sees.
MaskedObserver = Callable[[int, np.ndarray], None]


class SecAggAggregator:
    """The aggregator (server) of one instance.

    :param plan: the instance (`p2pnode.secagg.settings.plan`).
    :param identity_keys: raw Ed25519 public keys of the users, by peer id. When given, every user
        must sign its advertised keys with its identity key; unsigned or badly signed keys are
        refused. A user missing from the mapping cannot take part: its keys could not be verified, so
        its advertisement is refused (``unknown_identity``) and the advertise stage does not wait for it.
        None (default): the transport's authenticated sender id is the only binding.
    :param on_masked_input: called with (index, words) for each accepted masked input (research and
        tests: exactly what a curious aggregator sees).

    Use through `p2pnode.secagg.protocol.SecAggHost`, which routes the transport's requests here.
    """

    def __init__(self, plan: Plan, *, identity_keys: Mapping[str, bytes] | None = None,
                 on_masked_input: MaskedObserver | None = None) -> None:
        self.plan = plan
        self.state = AggregatorState(plan)
        self.identity_keys = dict(identity_keys) if identity_keys is not None else None
        if self.identity_keys is not None:
            # Counted as absent from the start: waiting for a message that must be refused would only hold
            # the advertise stage open until its timeout.
            self.state.ineligible = frozenset(i for i, u in enumerate(plan.session.users, 1)
                                              if u not in self.identity_keys)
        self.on_masked_input = on_masked_input
        self._closed = {s: asyncio.Event() for s in STAGES}
        self._ready = asyncio.Event()
        self._cpu = CpuClock()
        self._shared_keys: set[bytes] = set()
        #: Set after a corrupt share: the unmask stage then waits for every survivor's shares.
        self._want_all = False

    # -- internals ----------------------------------------------------------------------------
    def _index(self, sender: str) -> int:
        users = self.plan.session.users
        if sender not in users:
            raise BadMessage(f"secagg message from {sender}, which is not in this instance's sample",
                             code="wrong_run")
        return users.index(sender) + 1

    async def _wait_closed(self, stage: Stage) -> None:
        await self._closed[stage].wait()
        if self.state.status is Status.ABORTED:
            raise TransportError(f"secure aggregation aborted: {self.state.abort_reason}", code="stale")

    def _maybe_ready(self) -> None:
        """Let the open stage close early when nothing more is needed."""
        st = self.state
        stage = st.stage
        arrived = st.arrived(stage)
        if stage is Stage.UNMASK:
            if self._unmask_complete():
                self._ready.set()
            return
        expected = st.expected(stage)
        if arrived >= expected:
            self._ready.set()
        elif stage is Stage.MASKED and self.plan.settings.masked_quorum is not None:
            if len(arrived) >= max(self.plan.settings.masked_quorum, self.plan.threshold):
                self._ready.set()

    # -- the handlers -------------------------------------------------------------------------
    async def handle(self, stage: Stage, sender: str, msg: Message[Any]) -> Message[Any]:
        """Handle one user's message of `stage`; raise `BadMessage` to refuse it (it is then counted)."""
        try:
            check_session(self.plan, msg.body.session, sender)
            index = self._index(sender)
            st = self.state
            if stage is Stage.UNMASK and st.stage is Stage.UNMASK and not st.open and st.status is not Status.ABORTED:
                # The unmask stage closed early (every secret had enough shares): a late share is not an error.
                return Message(secagg_pb2.SecAggUnmaskReply(accepted=0))
            if index in self.state.ineligible:
                raise BadMessage(f"user {index} ({sender}): no identity key is known for it here, so its keys "
                                 f"cannot be verified; it cannot take part in this instance", code=UNKNOWN_IDENTITY)
            self.state.expect(stage, index)
            if stage is Stage.ADVERTISE:
                return await self._advertise(index, sender, msg.body)
            if stage is Stage.SHARE:
                return await self._share(index, msg.body)
            if stage is Stage.MASKED:
                return await self._masked(index, msg)
            return self._unmask(index, msg.body)
        except BadMessage as e:
            self.state.rejected[e.code] += 1
            raise

    async def _advertise(self, index: int, sender: str, body: secagg_pb2.SecAggAdvertise) -> Message[Any]:
        k = body.keys
        s = self.plan.session
        if tuple(body.members) != s.users or body.dim != s.dim or body.extras != s.extras:
            raise BadMessage(f"user {index} describes another sample or vector layout than this instance's",
                             code="malformed")
        if k.index != index:
            raise BadMessage(f"user {index} advertised keys under index {k.index}", code="malformed")
        check_bytes("cipher_public_key", k.cipher_public_key, keys.KEY_BYTES)
        check_bytes("mask_public_key", k.mask_public_key, keys.KEY_BYTES)
        check_bytes("self_mask_commitment", k.self_mask_commitment, keys.COMMITMENT_BYTES)
        if len(k.signature) > keys.SIGNATURE_BYTES:
            check_bytes("signature", k.signature, keys.SIGNATURE_BYTES)
        try:
            keys.check_public_key(k.cipher_public_key)
            keys.check_public_key(k.mask_public_key)
        except ValueError as e:
            raise BadMessage(f"user {index} advertised an unusable X25519 key: {e}", code="malformed") from e
        if k.cipher_public_key == k.mask_public_key or {k.cipher_public_key, k.mask_public_key} & self._shared_keys:
            raise BadMessage(f"user {index} advertised a key already in use in this instance", code="malformed")
        if self.identity_keys is not None:
            payload = keys.advertise_payload(self.plan.digest, index, sender, k.cipher_public_key,
                                             k.mask_public_key, k.self_mask_commitment)
            if not keys.verify(self.identity_keys[sender], k.signature, payload):
                raise BadMessage(f"user {index} ({sender}): the signature of its advertised keys does not verify "
                                 f"with its identity key (forged or replayed keys)", code="malformed")
        self.state.keys[index] = k
        self._shared_keys |= {k.cipher_public_key, k.mask_public_key}
        self._maybe_ready()
        await self._wait_closed(Stage.ADVERTISE)
        u1 = self.state.completed[Stage.ADVERTISE]
        reply = secagg_pb2.SecAggAdvertiseReply()
        for j in self.plan.holders(index):
            if j in u1:
                reply.keys.append(self.state.keys[j])
        return Message(reply)

    async def _share(self, index: int, body: secagg_pb2.SecAggShare) -> Message[Any]:
        u1 = self.state.completed[Stage.ADVERTISE]
        want = {j for j in self.plan.graph[index - 1] if j in u1}
        check_count("ciphertexts", body.ciphertexts, len(want))
        got: dict[int, bytes] = {}
        for c in body.ciphertexts:
            check_index("ciphertext recipient", c.recipient, self.plan.n)
            if c.sender != index:
                raise BadMessage(f"user {index} sent a ciphertext in the name of user {c.sender}", code="malformed")
            if c.recipient not in want or c.recipient in got:
                raise BadMessage(f"user {index} sent a ciphertext for user {c.recipient}, which is not one of its "
                                 f"advertised neighbours or appears twice", code="malformed")
            check_bytes("ciphertext", c.ciphertext, keys.CIPHERTEXT_BYTES)
            got[c.recipient] = c.ciphertext
        if set(got) != want:
            raise BadMessage(f"user {index} sent shares to {len(got)} of its {len(want)} neighbours; it must share "
                             f"with all of them", code="malformed")
        self.state.ciphertexts[index] = got
        self._maybe_ready()
        await self._wait_closed(Stage.SHARE)
        u2 = self.state.completed[Stage.SHARE]
        reply = secagg_pb2.SecAggShareReply()
        for j in sorted(self.plan.graph[index - 1]):
            if j in u2:
                reply.ciphertexts.add(sender=j, recipient=index, ciphertext=self.state.ciphertexts[j][index])
        return Message(reply)

    async def _masked(self, index: int, msg: Message[Any]) -> Message[Any]:
        enc = self.plan.encoding
        check_tensors(msg.tensors, {MASKED_TENSOR: ((enc.length,), masked_dtype(self.plan.word_bits))})
        with self._cpu.timed():
            words = msg.tensors[MASKED_TENSOR].numpy().view(word_dtype(self.plan.word_bits))
            st = self.state
            if st.masked_sum is None:
                st.masked_sum = words.copy()
            else:
                np.add(st.masked_sum, words, out=st.masked_sum)  # wraps modulo 2^bits
            st.masked.add(index)
        if self.on_masked_input is not None:
            self.on_masked_input(index, words)
        self._maybe_ready()
        await self._wait_closed(Stage.MASKED)
        return Message(secagg_pb2.SecAggMaskedReply(survivors=sorted(self.state.completed[Stage.MASKED])))

    def _unmask(self, index: int, body: secagg_pb2.SecAggUnmask) -> Message[Any]:
        st = self.state
        u2 = st.completed[Stage.SHARE]
        u3 = st.completed[Stage.MASKED]
        holds = [j for j in self.plan.holders(index) if j in u2]  # owners whose shares `index` may hold
        check_count("self_mask_shares", body.self_mask_shares, len(holds))
        check_count("mask_key_shares", body.mask_key_shares, len(holds))
        b_shares: dict[int, int] = {}
        s_shares: dict[int, int] = {}
        for kind, items, allowed, out in (("self-mask", body.self_mask_shares, u3, b_shares),
                                          ("mask-key", body.mask_key_shares, u2 - u3, s_shares)):
            for r in items:
                check_index(f"{kind} share owner", r.owner, self.plan.n)
                if r.owner not in holds or r.owner not in allowed or r.owner in out:
                    raise BadMessage(f"user {index} revealed a {kind} share of user {r.owner}, which it may not "
                                     f"reveal (not its neighbour, wrong survivor status, or twice)", code="malformed")
                check_bytes(f"{kind} share", r.share, shamir.SHARE_BYTES)
                try:
                    out[r.owner] = shamir.decode(r.share)
                except ValueError as e:
                    raise BadMessage(f"user {index}: {e}", code="malformed") from e
        st.revealed[index] = (b_shares, s_shares)
        self._maybe_ready()
        return Message(secagg_pb2.SecAggUnmaskReply(accepted=len(b_shares) + len(s_shares)))

    # -- the stage machine --------------------------------------------------------------------
    def _share_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        b: dict[int, int] = {}
        s: dict[int, int] = {}
        for bs, ss in self.state.revealed.values():
            for o in bs:
                b[o] = b.get(o, 0) + 1
            for o in ss:
                s[o] = s.get(o, 0) + 1
        return b, s

    def _unmask_complete(self) -> bool:
        t = self.plan.threshold
        need_b, need_s = unmask.needed(self.plan, self.state)
        b, s = self._share_counts()
        everyone = set(self.state.revealed) >= self.state.completed[Stage.MASKED]
        if self._want_all:  # a corrupt share was seen: wait for every share there may be
            return everyone
        enough = all(b.get(u, 0) >= t for u in need_b) and all(s.get(v, 0) >= t for v in need_s)
        return enough or everyone

    def _abort(self, reason: str) -> SecAggAborted:
        st = self.state
        st.status = Status.ABORTED
        st.abort_reason = reason
        for ev in self._closed.values():
            ev.set()
        survivors = len(st.arrived(st.stage))
        logger.warning("secagg run %s round %s aborted at %s: %s", self.plan.session.run_id,
                       self.plan.session.round, st.stage.label, reason)
        return SecAggAborted(st.stage.label, reason, survivors)

    def _check_stage(self, stage: Stage, done: frozenset[int]) -> None:
        """The threshold check after `stage`; raise `SecAggAborted` when it fails."""
        t = self.plan.threshold
        if stage is Stage.UNMASK:
            need_b, need_s = unmask.needed(self.plan, self.state)
            b, s = self._share_counts()
            short = [f"self mask of user {u} ({b.get(u, 0)} shares)" for u in need_b if b.get(u, 0) < t]
            short += [f"mask key of dropped user {v} ({s.get(v, 0)} shares)" for v in need_s if s.get(v, 0) < t]
            if short:
                raise self._abort(f"{len(done)} users revealed shares; {len(short)} secret(s) lack the {t} shares "
                                  f"needed: {', '.join(short[:3])}")
            return
        if len(done) < t:
            raise self._abort(f"{len(done)} of {self.plan.n} users completed stage {stage.label}; the threshold is {t}")
        if stage in (Stage.ADVERTISE, Stage.SHARE) and not self.plan.complete:
            # SecAgg+: each survivor's secrets must still have t holders that can reveal them.
            for u in sorted(done):
                live = sum(1 for j in self.plan.holders(u) if j in done)
                if live < t:
                    raise self._abort(f"user {u} has {live} live share holders after stage {stage.label}; the "
                                      f"threshold is {t}")

    async def _wait_ready(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), max(0.0, timeout))

    async def run(self) -> SecAggResult:
        """Drive the stages to the end; return the sum or raise `SecAggAborted`."""
        st = self.state
        loop = asyncio.get_running_loop()
        try:
            for stage in STAGES:
                st.stage, st.open = stage, True
                self._ready.clear()
                deadline = loop.time() + self.plan.settings.timeouts.of(stage)
                await self._wait_ready(deadline - loop.time())
                st.open = False
                done = frozenset(st.arrived(stage))
                st.completed[stage] = done
                self._check_stage(stage, done)
                if stage is not Stage.UNMASK:
                    self._closed[stage].set()
            secrets = await self._reconstruct_all(deadline)
            finish = functools.partial(unmask.unmask_sum, self.plan, self.state, secrets)
            result, spent = await loop.run_in_executor(None, cpu_call, finish)
            self._cpu.seconds += spent
            result.compute_s = self._cpu.seconds
            st.status = Status.DONE
            self._closed[Stage.UNMASK].set()
            return result
        except SecAggAborted:
            raise
        except BaseException as e:
            if st.status is Status.RUNNING:
                self._abort(f"{type(e).__name__}: {e}" if not isinstance(e, asyncio.CancelledError) else "cancelled")
            raise

    async def _reconstruct_all(self, deadline: float) -> unmask.Secrets:
        """Reconstruct every needed secret; on a corrupt share, reopen the stage for more shares until the deadline.

        Runs on the event loop (Shamir and X25519 only; cheap), so no late share is lost meanwhile.
        """
        st = self.state
        loop = asyncio.get_running_loop()
        while True:
            try:
                with self._cpu.timed():
                    return unmask.recover_secrets(self.plan, self.state)
            except unmask.ReconstructionFailed as e:
                pending = set(st.completed[Stage.MASKED]) - set(st.revealed)
                if not pending or loop.time() >= deadline:
                    raise self._abort(str(e)) from None
                logger.warning("secagg: %s; waiting for the shares of %d more user(s)", e, len(pending))
                self._want_all = True
                st.open = True
                self._ready.clear()
                await self._wait_ready(deadline - loop.time())
                st.open = False
                st.completed[Stage.UNMASK] = frozenset(st.revealed)
