"""Per-peer suspicion: how far a peer's models fall from the robust aggregate, decayed over rounds.

Each time a node aggregates (a gossip merge, a MoDeST aggregation) it measures, for every input ``i``,
the L2 distance ``d_i`` between the input and the aggregate it just computed and, when the round's
reference model is known (gossip: the node's model at the start of the round; MoDeST: the base
version), the cosine ``c_i`` between the input's update ``u_i = input - reference`` and the aggregate's
update ``z = aggregate - reference``. In high dimension the honest inputs' distances concentrate around
a common value, and their updates point roughly the way of the aggregate, so the *normalised
deviation* of one input is

    x_i = min(cap, |ln(d_i / median_j d_j)| + max(0, median_j c_j - c_i))

(medians over all inputs of that aggregation, the node's own included; the cosine term is 0 without a
reference). The distance term is 0 for "as far as a typical input", ln 2 = 0.69 for "twice or half as
far". It is two-sided on purpose: boosted or random updates sit far out (``scaled`` x100 gives about
ln 100 = 4.6), while colluding updates crafted to hide in the crowd (ALIE) sit unusually *close* to the
aggregate, which honest updates, each with its own noise, never do. The direction term catches updates
that point against the others (sign flipping, inner-product manipulation: cosine near -1 where honest
ones are positive, a term up to 2). A peer's score is an exponential moving average over the rounds in
which it was observed:

    s_p <- x  (first observation);   s_p <- decay * s_p + (1 - decay) * x  (later ones)

Defaults: ``decay`` 0.8 (an observation's weight halves in about 3 observations), ``cap`` 5
(a factor of e^5 = 148 in distance), a suspect is a peer with ``s_p > threshold`` (default 1.0, a factor
of e = 2.7 from the typical distance; honest peers of an IID run score about 0.05 to 0.3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from statistics import median

import torch

#: Largest deviation one observation can contribute.
DEFAULT_CAP = 5.0
#: Weight of the old score in each update.
DEFAULT_DECAY = 0.8
#: Score above which a peer is a suspect.
DEFAULT_THRESHOLD = 1.0
#: Most peers a tracker remembers (the least recently observed is forgotten first).
MAX_PEERS = 4096


def state_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """L2 distance between two states over their common floating-point entries (float64 accumulation)."""
    total = 0.0
    for k, va in a.items():
        vb = b.get(k)
        if vb is None or not va.is_floating_point():
            continue
        diff = va.detach().to(torch.float64) - vb.detach().to(va.device, torch.float64)
        total += float(torch.dot(diff.reshape(-1), diff.reshape(-1)))
    return math.sqrt(total)


def update_cosine(state: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor],
                  reference: Mapping[str, torch.Tensor]) -> float:
    """Cosine between ``state - reference`` and ``aggregate - reference`` (0 when either is zero)."""
    dot = na = nb = 0.0
    for k, ref in reference.items():
        if not ref.is_floating_point() or k not in state or k not in aggregate:
            continue
        r = ref.detach().to(torch.float64)
        u = state[k].detach().to(r.device, torch.float64) - r
        z = aggregate[k].detach().to(r.device, torch.float64) - r
        dot += float(torch.dot(u.reshape(-1), z.reshape(-1)))
        na += float(torch.dot(u.reshape(-1), u.reshape(-1)))
        nb += float(torch.dot(z.reshape(-1), z.reshape(-1)))
    return dot / math.sqrt(na * nb) if na > 0.0 and nb > 0.0 else 0.0


def deviations(distances: Sequence[float], cap: float = DEFAULT_CAP,
               cosines: Sequence[float] | None = None) -> list[float]:
    """``min(cap, |ln(d_i / median d)| + max(0, median c - c_i))`` per input (see the module docstring).

    A zero median distance (most inputs equal the aggregate) scores zero distances 0 and the others `cap`.
    Without `cosines` the direction term is 0.
    """
    if not distances:
        return []
    if cosines is not None and len(cosines) != len(distances):
        raise ValueError(f"{len(cosines)} cosines for {len(distances)} distances")
    m = median(distances)
    mc = median(cosines) if cosines else 0.0
    out = []
    for i, d in enumerate(distances):
        if m <= 0.0:
            x = 0.0 if d <= 0.0 else cap
        elif d <= 0.0:
            x = cap
        else:
            x = abs(math.log(d / m))
        if cosines:
            x += max(0.0, mc - cosines[i])
        out.append(min(cap, x))
    return out


class SuspicionTracker:
    """The suspicion scores of the peers one node has aggregated (see the module docstring).

    :param decay: weight of the old score, in [0, 1) (default 0.8).
    :param cap: largest deviation of one observation (default 5).
    :param max_peers: peers remembered (default 4096).
    """

    def __init__(self, decay: float = DEFAULT_DECAY, cap: float = DEFAULT_CAP, max_peers: int = MAX_PEERS) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"suspicion decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.cap = cap
        self.max_peers = max_peers
        self._scores: dict[str, float] = {}
        self._seen: dict[str, int] = {}

    def observe_states(self, peers: Mapping[str, Mapping[str, torch.Tensor]], aggregate: Mapping[str, torch.Tensor],
                       *, others: Sequence[Mapping[str, torch.Tensor]] = (),
                       reference: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """`observe` from the models themselves: `peers` (peer id -> model), the `aggregate`, inputs that are
        no peer's (`others`), and the round's `reference` model (None: no direction term)."""
        dist = {p: state_distance(s, aggregate) for p, s in peers.items()}
        other_d = [state_distance(s, aggregate) for s in others]
        if reference is None:
            return self.observe(dist, other_d)
        cos = {p: update_cosine(s, aggregate, reference) for p, s in peers.items()}
        other_c = [update_cosine(s, aggregate, reference) for s in others]
        return self.observe(dist, other_d, cos, other_c)

    def observe(self, distances: Mapping[str, float], others: Iterable[float] = (),
                cosines: Mapping[str, float] | None = None, other_cosines: Iterable[float] = ()) -> dict[str, float]:
        """Score one aggregation: `distances` of the peers' inputs to the aggregate, plus the distances of
        inputs that are no peer's (the node's own model) in `others`; optionally the update cosines of both
        (`cosines` must then name every peer of `distances`). Returns this observation's deviations."""
        peers = list(distances)
        all_d = [distances[p] for p in peers] + list(others)
        all_c = [cosines[p] for p in peers] + list(other_cosines) if cosines is not None else None
        if all_c is not None and len(all_c) != len(all_d):
            raise ValueError("give a cosine for every distance, or none")
        devs = deviations(all_d, self.cap, all_c)[:len(peers)]
        for p, x in zip(peers, devs, strict=True):
            old = self._scores.pop(p, None)
            self._scores[p] = x if old is None else self.decay * old + (1.0 - self.decay) * x
            self._seen[p] = self._seen.pop(p, 0) + 1
        while len(self._scores) > self.max_peers:  # forget the least recently observed
            oldest = next(iter(self._scores))
            del self._scores[oldest]
            self._seen.pop(oldest, None)
        return dict(zip(peers, devs, strict=True))

    def score(self, peer: str) -> float | None:
        """The peer's score, or None if it was never observed."""
        return self._scores.get(peer)

    def observations(self, peer: str) -> int:
        return self._seen.get(peer, 0)

    def scores(self) -> dict[str, float]:
        """All scores, by peer id."""
        return dict(self._scores)

    def suspects(self, threshold: float) -> set[str]:
        """Peers whose score is above `threshold`."""
        return {p for p, s in self._scores.items() if s > threshold}

    def top(self, k: int) -> list[tuple[str, float]]:
        """The `k` highest scores, highest first (ties by peer id)."""
        return sorted(self._scores.items(), key=lambda kv: (-kv[1], kv[0]))[:max(0, k)]
