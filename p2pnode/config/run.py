"""The run a node takes part in (`RunSettings`) and how this node takes part (`NodeSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from p2pnode.config.schema import setting


@dataclass
class RunSettings:
    """Section ``run``: which run. Run-wide (hashed): peers of different runs never talk to each other."""

    #: Name of the run; peers of different runs never talk to each other.
    run_id: str = setting(default="default", section="run", help="Name of the run to take part in.", hashed=True)


@dataclass
class NodeSettings:
    """Section ``node``: this node's share of the data, its device, and its pace (local, never hashed)."""

    #: This node's data shard: (index, count). (0, 1) means all of the task's training data.
    shard: tuple[int, int] = setting(
        default=(0, 1), section="node", help="This node's share of the task's training data, INDEX/COUNT.")
    #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = setting(default="auto", section="node", help="auto, cpu, cuda or cuda:N.")
    #: Rounds to run; None runs until stopped.
    rounds: int | None = setting(default=None, section="node", help="Rounds to run (default: until stopped).")
    #: Shortest wall time of one round, in seconds (default 0; ``run`` paces a real swarm with 1).
    min_round_time_s: float = setting(
        default=0.0, section="node", help="Shortest round, in seconds (paces the swarm).", flag_default=1.0)
    #: Time allowed for one model exchange with a peer, in seconds.
    exchange_timeout_s: float = setting(default=30.0, section="node", help="Seconds allowed for one model exchange.")
    #: Evaluate the model on the held-out test split every this many rounds (0: never).
    eval_every: int = setting(
        default=1, section="node", help="Evaluate on the held-out test split every this many rounds (0: never).")
