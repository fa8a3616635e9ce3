"""Run and node configuration: one typed dataclass, validated once at start."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from p2pnode.errors import ConfigError

TOPOLOGIES = ("gossip",)
#: Keys that must be equal on all peers of a run: a peer whose hash of these differs is not used.
RUN_KEYS = ("run_id", "task", "topology", "rule", "model_seed_mode")


@dataclass
class NodeConfig:
    """Everything one node needs to take part in a run.

    Run-wide keys (equal on every peer, hashed into `config_hash`): `run_id`, `task`, `topology`, `rule`,
    `model_seed_mode`. The rest is local to the node.
    """

    #: Name of the run; peers of different runs never talk to each other.
    run_id: str = "default"
    #: Task name (``digits-mlp``, ``cifar10-resnet18`` or ``package.module:factory``).
    task: str = "digits-mlp"
    #: Who exchanges with whom: ``gossip``.
    topology: str = "gossip"
    #: Aggregation rule used to merge models (see `p2pnode.aggregation.available_rules()`).
    rule: str = "mean"
    #: Extra parameters of the rule (for example ``{"trim": 1}``).
    rule_params: dict[str, Any] = field(default_factory=dict)
    #: ``shared``: every node starts from the model built with `seed`; ``independent``: each node its own.
    model_seed_mode: str = "shared"
    #: Seed of the run: initial model, data split, peer choice.
    seed: int = 0
    #: This node's data shard: (index, count). (0, 1) means all of the task's training data.
    shard: tuple[int, int] = (0, 1)
    #: Dirichlet concentration for a non-IID split; None for IID.
    alpha: float | None = None
    #: Local SGD steps per round; None takes the task's default.
    local_steps: int | None = None
    #: Learning rate and batch size; None takes the task's default.
    lr: float | None = None
    batch_size: int | None = None
    #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"
    #: Rounds to run; None runs until stopped.
    rounds: int | None = None
    #: Shortest wall time of one round, in seconds (paces a real swarm; 0 in the simulator).
    min_round_time_s: float = 0.0
    #: Time allowed for one model exchange with a peer, in seconds.
    exchange_timeout_s: float = 30.0
    #: Evaluate the model on the held-out test split every this many rounds (0: never).
    eval_every: int = 1
    #: Listen address and port (0 picks a free port) of the libp2p host.
    host: str = "127.0.0.1"
    port: int = 0
    #: Multiaddrs of peers to join.
    initial_peers: list[str] = field(default_factory=list)
    #: Before the first round, wait until this many peers are visible (0: start at once).
    wait_for_peers: int = 0
    #: Longest wait for `wait_for_peers`, in seconds; then the node starts with whom it sees.
    wait_timeout_s: float = 60.0
    #: Seconds a directory record lives unless refreshed.
    announce_ttl_s: float = 60.0
    #: Largest message sent or accepted, in bytes.
    max_message_bytes: int = 1 << 30

    def validate(self) -> NodeConfig:
        """Check every value once; raise `ConfigError` naming the key and the allowed values."""
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"topology={self.topology!r} is not supported; allowed: {', '.join(TOPOLOGIES)}")
        if self.model_seed_mode not in ("shared", "independent"):
            raise ConfigError(f"model_seed_mode={self.model_seed_mode!r}; allowed: shared, independent")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard={index}/{count}: need 0 <= index < count")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha}: must be > 0 (or unset for IID)")
        for key in ("local_steps", "batch_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key}={v}: must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if self.rounds is not None and self.rounds < 0:
            raise ConfigError(f"rounds={self.rounds}: must be >= 0")
        for key in ("exchange_timeout_s", "announce_ttl_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be > 0")
        if self.wait_for_peers < 0:
            raise ConfigError(f"wait_for_peers={self.wait_for_peers}: must be >= 0")
        if self.min_round_time_s < 0:
            raise ConfigError(f"min_round_time_s={self.min_round_time_s}: must be >= 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port}: must be in 0..65535")
        from p2pnode.aggregation import available_rules  # local: config is a leaf module

        if self.rule not in available_rules():
            raise ConfigError(f"rule={self.rule!r} is unknown; allowed: {', '.join(available_rules())}")
        return self

    @property
    def config_hash(self) -> str:
        """SHA-256 (hex, first 16 chars) of the run-wide keys."""
        run = {k: getattr(self, k) for k in RUN_KEYS}
        run["rule_params"] = self.rule_params
        blob = json.dumps(run, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
