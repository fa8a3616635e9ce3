"""Byzantine attacks for tests and the simulator.

Public API:

- `available_attacks()`, `forge(attack, honest, n_byzantine, seed=0, **params)`, `attack_info(attack)`,
  `AttackInfo` (registry.py): forged updates of colluding attackers (model attacks).
- `flip_labels(labels, num_classes)` (data.py): the ``label_flip`` data attack, applied to an attacker's
  training labels.

Modules: model.py (sign_flip, gaussian, scaled, alie, ipm, random), data.py (label_flip),
registry.py. Sources and defaults: docs/aggregation.md.
"""

from p2pnode.attacks.data import flip_labels
from p2pnode.attacks.model import alie_z
from p2pnode.attacks.registry import AttackInfo, attack_info, available_attacks, forge

__all__ = ["AttackInfo", "alie_z", "attack_info", "available_attacks", "flip_labels", "forge"]
