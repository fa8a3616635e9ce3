"""MoDeST: decentralized sampling that emulates federated learning without a server.

Spec: ``algorithms.md`` section 3 (de Vos, Dhasade, Kermarrec, Lavoie, Pouwelse, Sharma: "MoDeST:
Mostly-Consistent Decentralized Sampling Training", arXiv 2302.13837; the latest variant of the authors'
code, with aggregator acknowledgements and the liveness rule). Protocol notes and design choices:
``docs/protocols.md``.

Rounds. Round ``k`` is model version ``k``. Version 0 is the run's common initial model. The sample
``S_k`` (``sample_size`` nodes) trains version ``k``; each trainer sends its trained model to the
aggregators ``A_{k+1}`` (``aggregators`` nodes), which combine ``floor(success_fraction * s)`` of them
with the configured rule (and the optional outer optimizer) into version ``k+1``, send it to
``S_{k+1}``, and acknowledge the trainers. Both lists come from one pure function,
`candidate_order` (SHA-256 of peer id and round), over the node's population view
(`p2pnode.protocols.membership.View`), skipping candidates that do not answer a ping.

Nodes are reactive: a node only works when a model reaches it. `ModestProtocol.run_round` therefore
waits for the next model (at most ``idle_timeout_s``), trains it, uploads it, waits for the
acknowledgement, and returns; a node that gets no model returns an idle report after the timeout. The
aggregator role runs in the background, driven by the uploads it receives. Where the spec leaves the
swarm stuck, aggregators *top up* (`aggregator`) and trainers *relaunch* (`trainer`).

Sample grinding. Peer ids are self-chosen, so a Sybil could pick ids that hash to the top of future
orderings. With ``sample_key="model"`` (default) the order of round ``k >= 3`` is keyed by the SHA-256
of model version ``k-2``, which nobody knows before aggregation ``k-2`` completes; an id must be in the
views before then (a join takes effect at the next model send), so ids cannot be chosen against the key.
The trainers of ``k-1`` (their model carries its parent's digest) and the aggregators of ``k`` (every
update carries it) derive the same key, so samples stay consistent; two rounds back rather than one so
that two versions ``k-1`` split off one version ``k-2`` still meet at the same aggregator of ``k``.
The aggregator of ``k-2`` could still grind its model's bytes to steer round ``k``: see docs/protocols.md.

DiLoCo and compression. With ``outer_lr`` the aggregator of ``k+1`` steps the outer optimizer from
version ``k`` (``theta0``) on the pseudo-gradient ``theta0 - rule(trained models)``; its momentum travels
with the model. With a lossy ``compression`` trainers upload ``model - base`` with error feedback (topk
allowed) and aggregators send each version in ``model_compression`` (int8 under topk by default), keeping
it as decoded so that every holder has the same digest; version 0 is held as decoded too, so base pulls,
top-ups and relaunches re-encode a held version to the same values and travel compressed as well (`compress_exact`;
docs/protocols.md, docs/compression.md).

Map of the package (each module imports only those above it in this list, never a sibling role):

- `settings`: `ModestSettings` (and `fl_settings`: ``fl`` is MoDeST with one fixed aggregator).
- `state`: records (`AggregationEvent`, the models and aggregations a node holds) and `Core` (the node's
  shared state and small helpers). The seams tests and the simulator set are the protocol's
  `p2pnode.protocols.base.ProtocolHooks`, handed to the roles that call them.
- `wire`: method names, limits, and the checks of what peers send.
- `combine`: pure functions from received models (or secure sums) and the base to the next version.
- `sampling`: `candidate_order`, `model_digest` (the ordering keys), and `Sampler` (pings).
- `membership`: the view, JOIN/LEAVE advertisements, pings answered, directory reads.
- `identity`: secagg identity keys read from signed directory records.
- `versions`: held model versions served to other aggregators, and bases (with their momentum) pulled.
- `trainer`: the trainer role (inbox, training, upload and resend, watch and relaunch).
- `aggregator`: the aggregator role (collect, deadline and top-up, combine, send on, acknowledge).
- `spread`: secure groups spread over the aggregators, and the exchange of their sums.
- `secure_trainer`, `secure`: secure aggregation wrapped around the trainer and the aggregator roles.
- `protocol`: `ModestProtocol`, which composes them and hands each role its callbacks.
"""

from p2pnode.protocols.base import State
from p2pnode.protocols.modest.protocol import ModestProtocol
from p2pnode.protocols.modest.sampling import candidate_order, model_digest
from p2pnode.protocols.modest.settings import ModestSettings, fl_settings
from p2pnode.protocols.modest.state import AggregationEvent
from p2pnode.protocols.modest.state import Incoming as _Incoming
from p2pnode.protocols.modest.wire import (
    BASE,
    GROUP_SUMS,
    MAX_PEER_ID,
    MAX_SAMPLE,
    MEMBERSHIP,
    MODEL,
    OUTER_PREFIX,
    PING,
    UPDATE,
    WRONG_SAMPLE,
)

__all__ = [
    "BASE",
    "GROUP_SUMS",
    "MAX_PEER_ID",
    "MAX_SAMPLE",
    "MEMBERSHIP",
    "MODEL",
    "OUTER_PREFIX",
    "PING",
    "UPDATE",
    "WRONG_SAMPLE",
    "AggregationEvent",
    "ModestProtocol",
    "ModestSettings",
    "State",
    "_Incoming",
    "candidate_order",
    "fl_settings",
    "model_digest",
]
