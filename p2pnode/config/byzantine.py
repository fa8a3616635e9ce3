"""Byzantine peers: the attack a test node runs, and the suspicion scores that leave attackers out
(`ByzantineSettings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pnode.config.schema import setting


@dataclass
class ByzantineSettings:
    """Section ``byzantine`` (local: never hashed, so an attacker is indistinguishable by its config)."""

    #: Attack this node runs (``p2pnode.attacks.available_attacks()``), or None (default) for an honest node.
    #: For testing a swarm's defences only: the node forges what it sends.
    attack: str | None = setting(
        default=None, section="byzantine",
        help="Run as an ATTACKER that sends forged models (testing only; logged loudly): sign_flip, gaussian, scaled, "
             "alie, ipm, random or label_flip.",
        metavar="NAME")
    #: Parameters of the attack (for example ``{"factor": 10}``).
    attack_params: dict[str, Any] = setting(
        default_factory=dict, section="byzantine", help="Parameter of the attack (repeatable), for example factor=10.",
        flag="--attack-param", metavar="KEY=VALUE")
    #: gossip: merges over which received models are kept for the rule (None, the default: 4 for a robust
    #: rule, 1 otherwise). See docs/protocols.md for the trade-off.
    robust_window: int | None = setting(
        default=None, section="byzantine",
        help="gossip: merges over which received models are kept for the rule [4 for a robust rule, else 1].",
        topologies=("gossip",))
    #: Weight of the old suspicion score in each update, in [0, 1) (default 0.8).
    suspicion_decay: float = setting(
        default=0.8, section="byzantine", help="Weight of the old suspicion score in each update, in [0, 1).")
    #: Leave out peers whose suspicion exceeds `suspect_threshold`: gossip does not pick or merge them, a
    #: MoDeST aggregator does not combine their models (default False).
    exclude_suspects: bool = setting(
        default=False, section="byzantine",
        help="Leave out peers whose suspicion score exceeds --suspect-threshold (gossip: not picked or merged; modest:"
             " their models not aggregated).",
        flag="--exclude-suspects")
    #: Suspicion score above which a peer is a suspect (default 1.0).
    suspect_threshold: float = setting(
        default=1.0, section="byzantine", help="Suspicion score above which a peer is a suspect.")
