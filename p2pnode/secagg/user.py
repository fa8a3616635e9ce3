"""The user role of one instance: a trainer of the round's sample.

A user calls the aggregator once per stage and checks every reply before it uses it:

1. **advertise**: draws two X25519 key pairs and a self-mask seed ``b_u``, commits to ``b_u``, signs the
   binding when it has an identity key; the reply lists the keys of its share holders (itself and its
   neighbours) that advertised in time.
2. **share**: Shamir-shares its mask private key and ``b_u`` t-of-(its live holders), encrypts each
   neighbour's pair; the reply relays the pairs its neighbours encrypted for it. Those neighbours are
   its mask partners.
3. **masked**: ``y_u = q_u + PRG(b_u) + sum_v +-PRG(s_{u,v})`` over its partners (+ when u > v). The
   masks and the stochastic rounding's noise do not depend on the input, so they are computed right
   after the share stage, while the input is still being produced (local training); only the encoding,
   added into the masks in the same pass, follows it. The reply lists U3, the users whose input counts.
4. **unmask**: for each partner (and itself) it reveals the self-mask share when that user is in U3,
   else the mask-key share; never both for one user.

Any inconsistency in a reply (keys that fail their signature, shares that fail authentication, a
survivor list that contradicts what the user saw) stops the user without revealing anything more.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.errors import PeerUnreachable, TransportError
from p2pnode.proto import secagg_pb2
from p2pnode.secagg import keys, shamir
from p2pnode.secagg.errors import SecAggError
from p2pnode.secagg.masking import pair_sign
from p2pnode.secagg.prg import MaskGenerator, word_dtype
from p2pnode.secagg.randomness import Randomness, SystemRandomness
from p2pnode.secagg.settings import SecAggSettings, Session, plan
from p2pnode.secagg.stages import Stage, Status
from p2pnode.secagg.state import Contribution, UserReport, UserState
from p2pnode.secagg.timing import CpuClock, cpu_call
from p2pnode.secagg.wire import MASKED_TENSOR, REPLY_TYPES, session_proto
from p2pnode.transport.base import Transport
from p2pnode.transport.codec import Message

logger = logging.getLogger(__name__)

#: Delivers a user's message straight to an aggregator in the same process: (stage, sender, message) -> reply.
LocalDispatch = Callable[[Stage, str, Message[Any]], Awaitable[Message[Any]]]


class SecAggUser:
    """One user (trainer) of one instance.

    :param session: the instance; the user is ``transport.peer_id``, which must be in ``session.users``.
    :param settings: the run's secagg settings (identical at every party).
    :param transport: this node's transport; the user only makes calls, it serves nothing.
    :param identity: this node's Ed25519 identity key, to sign its advertised keys (default None).
    :param identity_keys: raw Ed25519 public keys of the users by peer id; when given, every key list
        relayed by the aggregator must carry valid signatures, and keys relayed for a user missing from
        it stop this user (it cannot verify them) (default None: rely on the transport).
    :param randomness: source of secret randomness (default: the OS CSPRNG). Tests pass a seeded one.
    :param local: how to reach the aggregator when this node is the aggregator too (`SecAggHost.dispatch`).
    :param stop_before: go silent before this stage (fault injection: the simulator's and the tests'
        dropouts); None (default) runs to the end.
    :param context: opaque bytes (at most 64) sent with the advertisement for the aggregator's check of
        the claim before it opens the instance (`SessionClaim.context`; MoDeST: the sample's ordering
        key); default empty.
    """

    def __init__(self, session: Session, settings: SecAggSettings, transport: Transport, *,
                 identity: Ed25519PrivateKey | None = None, identity_keys: Mapping[str, bytes] | None = None,
                 randomness: Randomness | None = None, local: LocalDispatch | None = None,
                 stop_before: Stage | None = None, context: bytes = b"") -> None:
        if len(context) > 64:
            raise SecAggError(f"secagg context is {len(context)} bytes; at most 64 allowed")
        self.context = bytes(context)
        self.plan = plan(session, settings)
        self.transport = transport
        self.peer_id = transport.peer_id
        self.index = session.index(self.peer_id)
        if session.aggregator == self.peer_id and local is None:
            raise SecAggError("this node is the instance's aggregator too: pass local=host.dispatch")
        self.identity = identity
        self.identity_keys = dict(identity_keys) if identity_keys is not None else None
        self.rnd: Randomness = randomness if randomness is not None else SystemRandomness()
        self.local = local if session.aggregator == self.peer_id else None
        self.stop_before = stop_before
        self.state: UserState | None = None
        self._cpu = CpuClock()
        self._mask_s = 0.0
        self._input_at: float | None = None  # compute seconds when the input became available

    # -- internals ----------------------------------------------------------------------------
    def _report(self, status: Status, reason: str | None = None) -> UserReport:
        st = self.state
        return UserReport(peer_id=self.peer_id, index=self.index, status=status,
                          completed=st.completed if st else None, reason=reason,
                          survivors=len(st.survivors) if st else 0, partners=len(st.partners) if st else 0,
                          compute_s=self._cpu.seconds, mask_s=self._mask_s,
                          input_s=0.0 if self._input_at is None else self._cpu.seconds - self._input_at)

    async def _call(self, stage: Stage, body: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
        """Send this stage's message and return the reply body (retrying while the instance is not open)."""
        s = self.plan.settings
        timeout = s.timeouts.of(stage) + s.grace_s
        loop = asyncio.get_running_loop()
        give_up = loop.time() + s.open_timeout_s
        msg = Message(body, tensors or {})
        while True:
            try:
                if self.local is not None:
                    reply = await asyncio.wait_for(self.local(stage, self.peer_id, msg), timeout)
                else:
                    reply = await self.transport.call(self.plan.session.aggregator, stage.method, msg,
                                                      REPLY_TYPES[stage], timeout)
                return reply.body
            except TransportError as e:  # RemoteError over the network, the aggregator's own error locally
                not_open = isinstance(e, PeerUnreachable) or e.code == "unavailable"
                if not (stage is Stage.ADVERTISE and not_open and loop.time() + s.retry_interval_s < give_up):
                    raise
            await asyncio.sleep(s.retry_interval_s)

    def _silent(self, stage: Stage) -> bool:
        return self.stop_before is not None and stage >= self.stop_before

    # -- the stages -----------------------------------------------------------------------------
    def _start(self) -> tuple[UserState, secagg_pb2.SecAggKeys]:
        p = self.plan
        cipher_sk, cipher_pk = keys.generate(self.rnd)
        mask_sk, mask_pk = keys.generate(self.rnd)
        seed = self.rnd.token_bytes(32)
        commit = keys.commitment(p.digest, self.index, seed)
        st = UserState(p, self.index, cipher_sk, mask_sk, seed, commit)
        k = secagg_pb2.SecAggKeys(index=self.index, cipher_public_key=cipher_pk, mask_public_key=mask_pk,
                                  self_mask_commitment=commit)
        if self.identity is not None:
            k.signature = keys.sign(self.identity, keys.advertise_payload(p.digest, self.index, self.peer_id,
                                                                          cipher_pk, mask_pk, commit))
        return st, k

    def _on_keys(self, st: UserState, mine: secagg_pb2.SecAggKeys, reply: secagg_pb2.SecAggAdvertiseReply) -> None:
        p = self.plan
        holders = set(p.holders(self.index))
        seen: set[bytes] = set()
        for k in reply.keys:
            if k.index not in holders or k.index in st.keys:
                raise SecAggError(f"the aggregator relayed keys of user {k.index}, which is not a neighbour or "
                                  f"appears twice")
            try:
                keys.check_public_key(k.cipher_public_key)
                keys.check_public_key(k.mask_public_key)
            except ValueError as e:
                raise SecAggError(f"the aggregator relayed an unusable key of user {k.index}: {e}") from e
            if len(k.self_mask_commitment) != keys.COMMITMENT_BYTES:
                raise SecAggError(f"the aggregator relayed a malformed commitment of user {k.index}")
            pair = {k.cipher_public_key, k.mask_public_key}
            if len(pair) != 2 or pair & seen:
                raise SecAggError(f"the aggregator relayed keys of user {k.index} that repeat other keys")
            seen |= pair
            if self.identity_keys is not None:
                peer = p.session.users[k.index - 1]
                payload = keys.advertise_payload(p.digest, k.index, peer, k.cipher_public_key, k.mask_public_key,
                                                 k.self_mask_commitment)
                if peer not in self.identity_keys:
                    # Unverifiable: the aggregator relays these keys, and it could have made them up.
                    raise SecAggError(f"the aggregator relayed keys of user {k.index} ({peer}), whose identity key "
                                      f"this user does not know: it cannot verify them")
                if not keys.verify(self.identity_keys[peer], k.signature, payload):
                    raise SecAggError(f"the keys relayed for user {k.index} ({peer}) fail their identity signature: "
                                      f"forged or replayed keys")
            st.keys[k.index] = k
        if st.keys.get(self.index) != mine:
            raise SecAggError("the aggregator relayed other keys under this user's own index")
        if len(st.keys) < p.threshold:
            raise SecAggError(f"only {len(st.keys)} of this user's share holders advertised keys; the threshold is "
                              f"{p.threshold}")

    def _share(self, st: UserState) -> list[secagg_pb2.SecAggCiphertext]:
        p = self.plan
        holders = sorted(st.keys)
        key_shares = shamir.split(keys.private_to_int(st.mask_sk), holders, p.threshold, self.rnd)
        seed_shares = shamir.split(int.from_bytes(st.self_seed, "big"), holders, p.threshold, self.rnd)
        st.own_shares = (key_shares[self.index], seed_shares[self.index])
        out = []
        for j in holders:
            if j == self.index:
                continue
            shared = keys.agree(st.cipher_sk, st.keys[j].cipher_public_key)
            ct = keys.encrypt_shares(keys.share_key(shared, p.digest, self.index, j), p.digest, self.index, j,
                                     key_shares[j], seed_shares[j])
            out.append(secagg_pb2.SecAggCiphertext(sender=self.index, recipient=j, ciphertext=ct))
        return out

    def _on_shares(self, st: UserState, reply: secagg_pb2.SecAggShareReply) -> None:
        p = self.plan
        partners = []
        for c in reply.ciphertexts:
            v = c.sender
            if c.recipient != self.index or v == self.index or v not in st.keys or v in st.held:
                raise SecAggError(f"the aggregator relayed shares from user {v} for user {c.recipient}, which this "
                                  f"user did not expect")
            shared = keys.agree(st.cipher_sk, st.keys[v].cipher_public_key)
            try:
                st.held[v] = keys.decrypt_shares(keys.share_key(shared, p.digest, v, self.index), p.digest, v,
                                                 self.index, c.ciphertext)
            except ValueError as e:
                raise SecAggError(f"the shares relayed from user {v} are invalid: {e}") from e
            partners.append(v)
        st.partners = tuple(sorted(partners))

    def _premask(self, st: UserState, noise_seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Everything but the input: the masks ``PRG(b_u) + sum_v +-PRG(s_{u,v})`` over the partners,
        and the stochastic rounding's noise (from a generator seeded by `noise_seed`)."""
        p = self.plan
        gen = MaskGenerator(p.settings.prg, p.word_bits)
        acc = np.zeros(p.encoding.length, dtype=word_dtype(p.word_bits))
        masks = [(st.self_seed, 1)]
        for v in st.partners:
            seed = keys.mask_seed(keys.agree(st.mask_sk, st.keys[v].mask_public_key), p.digest, self.index, v)
            masks.append((seed, pair_sign(self.index, v)))
        gen.apply_all(acc, masks)
        noise = p.encoding.draw_noise(np.random.default_rng(noise_seed))  # rounding noise only
        return acc, noise

    def _masked(self, premask: np.ndarray, noise: np.ndarray, c: Contribution) -> torch.Tensor:
        words = self.plan.encoding.encode(c.vector, c.weight, c.extras, noise=noise, add_to=premask)
        return torch.from_numpy(words.view(np.int32 if self.plan.word_bits == 32 else np.int64))

    def _on_survivors(self, st: UserState, reply: secagg_pb2.SecAggMaskedReply) -> None:
        p = self.plan
        u3 = set(reply.survivors)
        if len(u3) != len(reply.survivors) or not all(1 <= i <= p.n for i in u3):
            raise SecAggError("the aggregator's survivor list is malformed")
        if self.index not in u3:
            raise SecAggError("the aggregator's survivor list omits this user, which sent its masked input")
        if len(u3) < p.threshold:
            raise SecAggError(f"the aggregator claims only {len(u3)} survivors; the threshold is {p.threshold}: "
                              f"revealing shares now could expose an input")
        strangers = [v for v in p.graph[self.index - 1] if v in u3 and v not in st.partners]
        if strangers:
            raise SecAggError(f"the aggregator lists users {strangers[:3]} as survivors, but they never sent shares "
                              f"to this neighbour")
        st.survivors = frozenset(u3)

    def _reveal(self, st: UserState) -> secagg_pb2.SecAggUnmask:
        body = secagg_pb2.SecAggUnmask(session=session_proto(self.plan))
        held = dict(st.held)
        held[self.index] = st.own_shares
        for owner in sorted(held):
            key_share, seed_share = held[owner]
            if owner in st.survivors:  # never both for one owner
                body.self_mask_shares.add(owner=owner, share=shamir.encode(seed_share))
            else:
                body.mask_key_shares.add(owner=owner, share=shamir.encode(key_share))
        return body

    # -- driving ------------------------------------------------------------------------------
    async def run(self, contribution: Contribution | Awaitable[Contribution]) -> UserReport:
        """Take part in the instance; return how it ended (never raises for protocol or network failures).

        :param contribution: the input, or an awaitable of it (for example the local training's future):
            the advertise and share stages and the masks run before it is awaited.
        """
        try:
            return await self._run(contribution)
        except (SecAggError, TransportError, ValueError) as e:
            logger.info("secagg user %s (run %s round %s) stopped: %s", self.peer_id[-8:],
                        self.plan.session.run_id, self.plan.session.round, e)
            return self._report(Status.ABORTED, str(e))
        finally:
            if inspect.iscoroutine(contribution) and inspect.getcoroutinestate(contribution) == "CORO_CREATED":
                contribution.close()

    async def _run(self, contribution: Contribution | Awaitable[Contribution]) -> UserReport:
        p = self.plan
        loop = asyncio.get_running_loop()
        with self._cpu.timed():
            st, mine = self._start()
        self.state = st
        if self._silent(Stage.ADVERTISE):
            return self._report(Status.RUNNING, "silent from stage advertise")
        s = p.session
        advertise = secagg_pb2.SecAggAdvertise(session=session_proto(p), keys=mine, members=s.users, dim=s.dim,
                                               extras=s.extras, context=self.context)
        reply = await self._call(Stage.ADVERTISE, advertise)
        with self._cpu.timed():
            self._on_keys(st, mine, reply)
            cts = self._share(st)
        st.completed = Stage.ADVERTISE
        if self._silent(Stage.SHARE):
            return self._report(Status.RUNNING, "silent from stage share")
        reply = await self._call(Stage.SHARE, secagg_pb2.SecAggShare(session=session_proto(p), ciphertexts=cts))
        with self._cpu.timed():
            self._on_shares(st, reply)
        st.completed = Stage.SHARE
        noise_seed = int.from_bytes(self.rnd.token_bytes(16), "big")  # drawn here: `rnd` stays on this thread
        (premask, noise), self._mask_s = await loop.run_in_executor(
            None, cpu_call, functools.partial(self._premask, st, noise_seed))
        self._cpu.seconds += self._mask_s
        if inspect.isawaitable(contribution):
            contribution = await contribution
        c: Contribution = contribution
        self._input_at = self._cpu.seconds
        masked, spent = await loop.run_in_executor(None, cpu_call,
                                                   functools.partial(self._masked, premask, noise, c))
        self._cpu.seconds += spent
        del premask, noise
        if self._silent(Stage.MASKED):
            return self._report(Status.RUNNING, "silent from stage masked")
        body = secagg_pb2.SecAggMasked(session=session_proto(p))
        reply = await self._call(Stage.MASKED, body, {MASKED_TENSOR: masked})
        del masked
        with self._cpu.timed():
            self._on_survivors(st, reply)
        st.completed = Stage.MASKED
        if self._silent(Stage.UNMASK):
            return self._report(Status.RUNNING, "silent from stage unmask")
        with self._cpu.timed():
            body = self._reveal(st)
        await self._call(Stage.UNMASK, body)
        st.completed = Stage.UNMASK
        return self._report(Status.DONE)

