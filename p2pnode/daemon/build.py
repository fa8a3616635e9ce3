"""Builds the parts of a node from its config; shared by the daemon and the simulator (one code path)."""

from __future__ import annotations

import copy
import dataclasses
import random
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.config import NodeConfig
from p2pnode.discovery import PeerDirectory
from p2pnode.errors import ConfigError
from p2pnode.protocols import (
    DpsgdProtocol,
    DpsgdSettings,
    FLProtocol,
    GossipProtocol,
    GossipSettings,
    ModestProtocol,
    ModestSettings,
    RoundProtocol,
)
from p2pnode.protocols.adversary import Attacker, HonestOracle
from p2pnode.protocols.compute import Compute
from p2pnode.secagg import SecAggSettings, StageTimeouts
from p2pnode.secagg import keys as secagg_keys
from p2pnode.secagg.randomness import Randomness, SeededRandomness
from p2pnode.training.tasks import Task, get_task
from p2pnode.training.trainer import Trainer
from p2pnode.transport import Transport
from p2pnode.transport.admission import Admission


def build_admission(config: NodeConfig) -> Admission | None:
    """The node's admission policy (``config.admission``), or None for an open run."""
    if config.admission == "open":
        return None
    return Admission.create(config.admission_key_bytes(), config.allow_peers or None)


def apply_admission(config: NodeConfig, transport: Transport, directory: PeerDirectory) -> Admission | None:
    """Install the node's admission policy in its transport and its directory (both check it); return it."""
    admission = build_admission(config)
    transport.admission = admission
    directory.admission = admission
    return admission


def build_attacker(config: NodeConfig, *, peer_id: str = "", population: int | None = None, colluders: int = 1,
                   oracle: HonestOracle | None = None) -> Attacker | None:
    """The node's `Attacker` when ``config.attack`` is set, else None (see `p2pnode.protocols.adversary`)."""
    if config.attack is None:
        return None
    return Attacker(config.attack, config.attack_params, seed=config.seed, peer_id=peer_id, population=population,
                    colluders=colluders, oracle=oracle)


def build_trainer(config: NodeConfig, task: Task | None = None, *, node_index: int | None = None,
                  num_nodes: int | None = None, device: str | None = None) -> Trainer:
    """The node's trainer: its shard of the task's data and the run's initial model.

    With ``model_seed_mode = "shared"`` every node starts from the model built with the run's seed;
    with ``"independent"`` each node builds its own from ``seed + 1000 + shard index``. A node with
    ``attack = "label_flip"`` trains on flipped labels.
    """
    task = task or get_task(config.task, **config.task_options)
    index, count = config.shard
    index = index if node_index is None else node_index
    count = count if num_nodes is None else num_nodes
    model_seed = config.seed if config.model_seed_mode == "shared" else config.seed + 1000 + index
    attacker = build_attacker(config)
    num_classes = getattr(task, "num_classes", None)
    label_map = attacker.label_map(num_classes) if attacker is not None and isinstance(num_classes, int) else None
    if attacker is not None and attacker.attack == "label_flip" and label_map is None:
        raise ConfigError(f"label_flip needs a classification task with num_classes; {task.name!r} has none")
    return Trainer(task, node_index=index, num_nodes=count, seed=config.seed, alpha=config.alpha,
                   device=device or config.device, batch_size=config.batch_size, lr=config.lr,
                   model_seed=model_seed, label_map=label_map)


def settings_from_config(config: NodeConfig, cls: Any, **explicit: Any) -> dict[str, Any]:
    """Keyword arguments of the protocol settings class `cls`: every `NodeConfig` field of the same name
    (copied, so that the protocol never shares a mutable value with the config), then `explicit`.

    A setting added to `NodeConfig` (the schema) and to a protocol's settings under the same name
    reaches the protocol with no further line; ``config_hash`` is passed as well.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config)
                           if f.name in names}
    if "config_hash" in names:
        out["config_hash"] = config.config_hash
    out.update(explicit)
    return out


def build_protocol(config: NodeConfig, *, trainer: Trainer, transport: Transport, directory: PeerDirectory,
                   compute: Compute, rng: random.Random, step_cost_s: float = 0.0,
                   secagg_randomness: Randomness | None = None, attacker: Attacker | None = None,
                   secagg_identity: Ed25519PrivateKey | None = None) -> RoundProtocol:
    """The round protocol named by ``config.topology``.

    `secagg_randomness`: secret randomness of secure aggregation (default None: the OS CSPRNG); the
    simulator passes a seeded stream so that its runs are reproducible.
    `secagg_identity`: the node's long-term Ed25519 key that binds its secagg keys end to end (default
    None: the transport's binding only); the daemon keeps it in the state dir, the simulator derives it
    with `seeded_secagg_identity`.
    `attacker`: the node's forging; None (default) builds it from ``config.attack`` (no oracle).
    """
    local_steps = config.local_steps or trainer.task.default_local_steps
    # The run's wire format; "none" leaves the transport's own default (`Transport.compression`) in force.
    compression = config.compression if config.compression != "none" else None
    if attacker is None:
        attacker = build_attacker(config, peer_id=transport.peer_id)
    if config.topology == "gossip":
        settings = GossipSettings(**settings_from_config(config, GossipSettings, local_steps=local_steps,
                                                         step_cost_s=step_cost_s))
        return GossipProtocol(settings, transport=transport, directory=directory, trainer=trainer,
                              compute=compute, rng=rng, attacker=attacker, compression=compression)
    if config.topology in ("modest", "fl"):
        modest = ModestSettings(**settings_from_config(config, ModestSettings, local_steps=local_steps,
                                                       step_cost_s=step_cost_s, secagg=secagg_settings(config)))
        if config.topology == "fl":
            modest.fixed_aggregator = config.fl_server
            return FLProtocol(modest, transport=transport, directory=directory, trainer=trainer, compute=compute,
                              rng=rng, secagg_randomness=secagg_randomness, attacker=attacker,
                              secagg_identity=secagg_identity)
        return ModestProtocol(modest, transport=transport, directory=directory, trainer=trainer, compute=compute,
                              rng=rng, secagg_randomness=secagg_randomness, attacker=attacker,
                              secagg_identity=secagg_identity)
    if config.topology == "dpsgd":
        dpsgd = DpsgdSettings(run_id=config.run_id, config_hash=config.config_hash, local_steps=local_steps,
                              sync_warmup_steps=config.sync_warmup_steps,
                              sync_warmup_local_steps=config.sync_warmup_local_steps,
                              sync_warmup_outer=config.sync_warmup_outer,
                              graph=config.dpsgd_graph, degree=config.dpsgd_degree, seed=config.seed,
                              rule=config.rule, rule_params=dict(config.rule_params),
                              exchange_timeout_s=config.exchange_timeout_s, eval_every=config.eval_every,
                              step_cost_s=step_cost_s, outer_lr=config.outer_lr,
                              outer_momentum=config.outer_momentum, outer_nesterov=config.outer_nesterov)
        return DpsgdProtocol(dpsgd, transport=transport, directory=directory, trainer=trainer, compute=compute,
                             rng=rng, attacker=attacker, compression=compression)
    raise ValueError(f"unknown topology {config.topology!r}")  # config.validate() refuses it earlier


def seeded_secagg_identity(seed: int, peer_id: str) -> Ed25519PrivateKey:
    """A node's secagg identity key derived from the run's `seed` and its `peer_id` (simulator and tests).

    Deterministic, so that simulations stay reproducible byte for byte; never for a real node: anyone
    who knows the seed and the peer id could sign in its name.
    """
    return secagg_keys.identity_from_bytes(
        SeededRandomness(str(seed).encode(), b"secagg identity/" + peer_id.encode()).token_bytes(secagg_keys.KEY_BYTES))


def secagg_settings(config: NodeConfig) -> SecAggSettings | None:
    """The secure-aggregation settings of a modest or fl run, or None when ``config.secagg`` is off.

    Stage timeouts derive from ``aggregation_timeout_s`` (T) and ``ping_timeout_s`` (P): advertise T/2 + P
    (trainers find the aggregator by pinging candidates, and each dead one ahead of it costs a ping
    timeout, so the first claim can open the instance well before the last trainer gets there), share
    and unmask T/4, masked T (it covers local training, which runs after the share stage). Users retry
    for T/2 + P while the aggregator has not opened the instance, and allow ``exchange_timeout_s`` for a
    reply on the wire. Every stage closes early once every expected trainer has sent its message.
    """
    if not config.secagg:
        return None
    t, ping = config.aggregation_timeout_s, config.ping_timeout_s
    return SecAggSettings(threshold=config.secagg_threshold, neighbours=config.secagg_neighbours,
                          clip=config.secagg_clip,
                          timeouts=StageTimeouts(advertise_s=t / 2 + ping, share_s=t / 4, masked_s=t, unmask_s=t / 4),
                          open_timeout_s=t / 2 + ping, grace_s=config.exchange_timeout_s)
