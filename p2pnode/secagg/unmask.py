"""The end of an instance: reconstruct the needed secrets from their shares, then remove the masks.

algorithms.md 5.3, round 4. The aggregator needs the self-mask seed ``b_u`` of every user of U3 (masked
input received) and the mask key ``s_v`` of every user of U2 \\ U3 (shares sent, no masked input) that is
adjacent to U3. Each is reconstructed from any ``t`` of the Shamir shares the survivors revealed and
checked against what its owner advertised (the seed's commitment, the key's public key); when a share
holder sent a corrupt share, other ``t``-subsets are tried (at most `MAX_SUBSETS`), and
`ReconstructionFailed` tells the aggregator to wait for more shares. `unmask_sum` then removes every
mask from the masked sum in one pass and decodes it (the heavy part: the aggregator runs it in an
executor).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pnode.secagg import keys, shamir
from p2pnode.secagg.masking import pair_sign
from p2pnode.secagg.prg import MaskGenerator
from p2pnode.secagg.settings import Plan
from p2pnode.secagg.stages import STAGES, Stage
from p2pnode.secagg.state import AggregatorState, SecAggResult

logger = logging.getLogger(__name__)

#: Most t-subsets tried when the shares of one secret disagree with its commitment (a corrupt share).
MAX_SUBSETS = 256

#: The self-mask seeds of U3 (32 bytes each) and the mask private keys of the dropped users, by index.
Secrets = tuple[list[bytes], list[tuple[int, X25519PrivateKey]]]


class ReconstructionFailed(Exception):
    """No t-subset of a secret's shares opens its commitment (or matches its public key)."""


def needed(plan: Plan, state: AggregatorState) -> tuple[list[int], list[int]]:
    """Secrets to reconstruct: self masks of U3, mask keys of U2 \\ U3 users adjacent to U3 (user indices)."""
    u2 = state.completed[Stage.SHARE]
    u3 = state.completed[Stage.MASKED]
    dropped = [v for v in sorted(u2 - u3) if any(u in u3 for u in plan.graph[v - 1])]
    return sorted(u3), dropped


def reconstruct(plan: Plan, owner: int, shares: Mapping[int, int], check: Callable[[int], bool], what: str) -> int:
    """The secret of user `owner` from its `shares` (by share holder) that passes `check`.

    :raises ReconstructionFailed: no t-subset (of the first `MAX_SUBSETS`) gives a secret that passes.
    """
    t = plan.threshold
    xs = sorted(shares)
    for n_tried, subset in enumerate(itertools.combinations(xs, t)):
        if n_tried >= MAX_SUBSETS:
            break
        secret = shamir.combine({x: shares[x] for x in subset}, t)
        if check(secret):
            if n_tried:
                logger.warning("secagg: corrupt %s share(s) for user %d; reconstructed from another subset",
                               what, owner)
            return secret
    raise ReconstructionFailed(f"the {what} of user {owner} does not match its advertised commitment with "
                               f"any {t} of its {len(xs)} revealed shares: a share holder sent a corrupt share")


def recover_secrets(plan: Plan, state: AggregatorState) -> Secrets:
    """The self-mask seeds of U3 and the mask keys of the dropped users adjacent to U3.

    :raises ReconstructionFailed: see `reconstruct`.
    """
    digest = plan.digest
    need_b, need_s = needed(plan, state)
    b_by_owner: dict[int, dict[int, int]] = {u: {} for u in need_b}
    s_by_owner: dict[int, dict[int, int]] = {v: {} for v in need_s}
    for revealer, (bs, ss) in state.revealed.items():
        for o, v in bs.items():
            b_by_owner[o][revealer] = v
        for o, v in ss.items():
            if o in s_by_owner:
                s_by_owner[o][revealer] = v
    seeds = []
    for u in need_b:
        commit = state.keys[u].self_mask_commitment

        def opens(secret: int, u: int = u, commit: bytes = commit) -> bool:
            return secret < 2**256 and keys.commitment_matches(commit, digest, u, secret.to_bytes(32, "big"))

        seeds.append(reconstruct(plan, u, b_by_owner[u], opens, "self-mask seed").to_bytes(32, "big"))
    dropped = []
    for v in need_s:
        mask_pk = state.keys[v].mask_public_key

        def matches(secret: int, mask_pk: bytes = mask_pk) -> bool:
            try:
                return keys.public_of(keys.int_to_private(secret)) == mask_pk
            except ValueError:
                return False

        dropped.append((v, keys.int_to_private(reconstruct(plan, v, s_by_owner[v], matches, "mask key"))))
    return seeds, dropped


def unmask_sum(plan: Plan, state: AggregatorState, secrets: Secrets) -> SecAggResult:
    """Remove the masks from the masked sum and decode it: the instance's result."""
    st = state
    u3 = st.completed[Stage.MASKED]
    seeds, dropped_keys = secrets
    assert st.masked_sum is not None
    total = st.masked_sum
    gen = MaskGenerator(plan.settings.prg, plan.word_bits)
    masks = [(seed, -1) for seed in seeds]
    for v, sk in dropped_keys:
        for u in plan.graph[v - 1]:
            if u in u3:
                seed = keys.mask_seed(keys.agree(sk, st.keys[u].mask_public_key), plan.digest, u, v)
                masks.append((seed, pair_sign(v, u)))  # the term v would have added
    # One pass: each chunk loses all its masks and is decoded while in cache.
    weighted, extras, weight = plan.encoding.decode_sum(total, len(u3), ready=gen.chunks(total, masks))
    users = plan.session.users
    dropped: dict[str, tuple[str, ...]] = {}
    previous = frozenset(range(1, plan.n + 1))
    for stage in STAGES:
        now = st.completed[stage]
        dropped[stage.label] = tuple(users[i - 1] for i in sorted(previous - now))
        previous = now
    return SecAggResult(
        weighted_sum=weighted, extras_sum=extras, weight_sum=weight,
        survivors=tuple(users[i - 1] for i in sorted(u3)), dropped=dropped, users=plan.n,
        neighbours=plan.neighbours, threshold=plan.threshold, word_bits=plan.word_bits,
        rejected=dict(st.rejected))
