"""Secure aggregation inside each sample of modest and fl (`SecaggSettings`; algorithms.md 5, docs/secagg.md)."""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode.config.schema import setting


@dataclass
class SecaggSettings:
    """Section ``secagg``: secure aggregation; hashed only when it is on (see `NodeConfig.run_fields`)."""

    #: Secure aggregation inside each sample: the aggregator learns only the sum of the trainers' updates
    #: (SecAgg / SecAgg+ with dropout recovery). Needs topology modest or fl and rule mean or vca (default off).
    secagg: bool = setting(
        default=False, section="secagg", hashed=True,
        help="modest/fl: secure aggregation inside each sample; the aggregator learns only the sum of the updates "
             "(rule mean or vca).",
        topologies=("modest", "fl"), flag="--secagg/--no-secagg")
    #: ``k``: other trainers each trainer masks and shares with (default None: all of the sample up to 32
    #: trainers, else the smallest k of docs/secagg.md, about O(log n)); even unless it covers the sample.
    secagg_neighbours: int | None = setting(
        default=None, section="secagg", hashed=True,
        help="secagg: trainers each trainer masks and shares with, k [the whole sample up to 32, else about O(log n)].",
        topologies=("modest", "fl"))
    #: ``t``: shares needed to reconstruct a trainer's secrets, a strict majority of its k + 1 holders
    #: (default None: the smallest integer above 2/3 of them, 7 of 10). A round with fewer than ``t``
    #: trainers left is aborted, counted and reported; its updates are not applied.
    secagg_threshold: int | None = setting(
        default=None, section="secagg", hashed=True,
        help="secagg: shares needed to recover a trainer's secrets, t [above 2/3 of k + 1]; a round with fewer "
             "trainers left is aborted.",
        topologies=("modest", "fl"))
    #: Coordinates of the (model - base) update are clipped to [-clip, clip] before the fixed-point
    #: encoding with 2^22 levels (default 8.0: step 3.8e-6).
    secagg_clip: float = setting(
        default=8.0, section="secagg", hashed=True,
        help="secagg: updates are clipped to [-C, C] before the fixed-point encoding.", topologies=("modest", "fl"))
    #: ``G``: split each sample into G secure groups, member i (in the sample's order) in group i mod G
    #: (default 1: one instance per sample). The aggregator learns the G group means instead of one sum
    #: and combines them with ``rule``, which may then be robust (median, krum, ...) if it tolerates
    #: ``f`` (default 1) Byzantine groups among G. Needs secagg and sample_size >= secagg_min_group * G.
    #: With ``aggregators`` a > 1 (modest) the groups are spread over the aggregators (G >= a), which
    #: exchange their group sums: each trainer uploads once (docs/secagg.md).
    secagg_groups: int = setting(
        default=1, section="secagg", hashed=True,
        help="secagg: split each sample into G secure groups (member i in group i mod G); the aggregator combines the "
             "G group means with --rule, which may then be robust.",
        topologies=("modest", "fl"))
    #: With ``secagg_groups > 1``: fewest members a secure group may have (default 5, at least 2). The
    #: aggregator learns each group's mean, so a small group says much about each member; the config is
    #: refused when ``floor(sample_size / G)`` is smaller, and at run time a trainer whose group came out
    #: smaller (peers missing from the sample) does not train that version (``secagg_small_group``).
    secagg_min_group: int = setting(
        default=5, section="secagg", hashed=True,
        help="secagg with --secagg-groups: fewest members of a group (>= 2); the aggregator learns each group's mean, "
             "so small groups say much about each member.",
        topologies=("modest", "fl"))
