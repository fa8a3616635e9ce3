"""Secure aggregation (SecAgg, Bonawitz et al. CCS'17; SecAgg+, Bell et al. CCS'20) inside one sample.

The round's aggregator learns the (weighted) sum of the surviving trainers' vectors and nothing else
about any single one, even when trainers drop out mid-protocol. Spec: ``algorithms.md`` section 5;
design, parameters and the integration API: ``docs/secagg.md``.

Public API:

- `SecAggSettings`, `StageTimeouts`, `Session`, `plan` (settings.py): what a run configures, one
  instance, and the parameters every party derives from them; `check_rule_compatible`.
- `SecAggHost` (protocol.py): serves the aggregator side on a node's transport; `SecAggHost.aggregate`
  runs one instance as its server and returns a `SecAggResult`; `SecAggHost.on_unopened` tells an
  aggregator about an instance its users have started (`SessionClaim`).
- `SecAggUser` (user.py): a trainer's side of one instance; `SecAggUser.run` takes a `Contribution`
  (or an awaitable of it) and returns a `UserReport`.
- `run_local`, `run_instance` (local.py): the real protocol among many peers over the in-memory network.
- `layer_variances`, `variance_correct`, `split_layers` (compose.py): composition with VCA.
- `SecAggError`, `SecAggAborted` (errors.py).

Building blocks: shamir.py (secret sharing over GF(2^256 + 297)), prg.py (AES-256-CTR / ChaCha20
mask generator), keys.py (X25519, HKDF, ChaCha20-Poly1305, Ed25519 binding), quantize.py (fixed
point and the overflow bound), graph.py (Harary graph and parameter choice), stages.py and state.py
(the state machine), wire.py (message checks), aggregator.py (the server role), unmask.py (its last
step: secrets reconstructed from the shares, masks removed from the sum).
"""

from p2pnode.secagg.compose import layer_variances, split_layers, variance_correct
from p2pnode.secagg.errors import SecAggAborted, SecAggError
from p2pnode.secagg.local import LocalOutcome, run_instance, run_local
from p2pnode.secagg.protocol import SecAggHost, SessionClaim
from p2pnode.secagg.settings import (
    Plan,
    SecAggSettings,
    Session,
    StageTimeouts,
    check_rule_compatible,
    plan,
)
from p2pnode.secagg.stages import STAGES, Stage, Status
from p2pnode.secagg.state import Contribution, SecAggResult, UserReport
from p2pnode.secagg.user import SecAggUser

__all__ = [
    "STAGES",
    "Contribution",
    "LocalOutcome",
    "Plan",
    "SecAggAborted",
    "SecAggError",
    "SecAggHost",
    "SecAggResult",
    "SecAggSettings",
    "SecAggUser",
    "Session",
    "SessionClaim",
    "Stage",
    "StageTimeouts",
    "Status",
    "UserReport",
    "check_rule_compatible",
    "layer_variances",
    "plan",
    "run_instance",
    "run_local",
    "split_layers",
    "variance_correct",
]
