"""Federated learning (FedAvg with client sampling) as a baseline: one fixed aggregator, the server.

It is a configuration of `p2pnode.protocols.modest` (`fl_settings`): the same code with one fixed
aggregator, as the authors' FL baseline does ("a fixed aggregator with unlimited slots"):

- the server is ``fixed_aggregator`` or, when that is None, the lowest peer id of the initial view (all
  nodes that start together agree on it; set it explicitly in a real swarm that nodes join later);
- the server never trains; each round it samples ``s`` trainers among the other peers, in the order of
  `p2pnode.protocols.modest.candidate_order` (skipping those that do not answer a ping), and waits for
  ``floor(sf * s)`` trained models;
- trainers always upload to the server: there is no other aggregator to resend to;
- if the whole sample disappears, the server sends its model again to a fresh sample.

Traffic per round: ``2 s`` model transfers, the reference for MoDeST's ``2 a s``.
"""

from __future__ import annotations

import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.discovery import PeerDirectory
from p2pnode.protocols.adversary import Attacker
from p2pnode.protocols.compute import Compute
from p2pnode.protocols.modest import ModestProtocol, ModestSettings, fl_settings
from p2pnode.secagg.randomness import Randomness
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Transport


class FLProtocol(ModestProtocol):
    """FedAvg with a server among the peers (see the module docstring): `ModestProtocol` on `fl_settings`."""

    def __init__(self, settings: ModestSettings, *, transport: Transport, directory: PeerDirectory,
                 trainer: Trainer, compute: Compute, rng: random.Random,
                 secagg_randomness: Randomness | None = None, attacker: Attacker | None = None,
                 secagg_identity: Ed25519PrivateKey | None = None) -> None:
        super().__init__(fl_settings(settings), transport=transport, directory=directory, trainer=trainer,
                         compute=compute,
                         rng=rng, secagg_randomness=secagg_randomness, attacker=attacker,
                         secagg_identity=secagg_identity)
