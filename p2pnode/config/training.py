"""What is trained and how models are merged (`TrainingSettings`), and the outer optimizer and wire
compression that apply to every topology (`DilocoSettings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pnode.config.choices import SYNC_WARMUP_OUTER, TOPOLOGIES
from p2pnode.config.schema import setting


@dataclass
class TrainingSettings:
    """Section ``training``: task, topology, aggregation rule and the local training schedule.

    Run-wide (hashed into `NodeConfig.config_hash`): `task`, `task_options`, `topology`, `rule`, `rule_params`,
    `model_seed_mode`, and the synchronisation warm-up (and `sync_warmup_outer`) when set. The rest is local to
    the node.
    """

    #: Task name (``digits-mlp``, ``cifar10-resnet18`` or ``package.module:factory``).
    task: str = setting(
        default="digits-mlp", section="training",
        help="Task: digits-mlp, cifar10-resnet18, tiny-lm, or package.module:factory.", hashed=True)
    #: Options of the task, passed to its factory (for example ``{"size": "tiny"}`` for ``tiny-lm``). Run-wide:
    #: every node must build the same model from the same data; hashed only when given, so that the hash of
    #: runs without options stays as it was.
    task_options: dict[str, Any] = setting(
        default_factory=dict, section="training",
        help="Option of the task (repeatable), for example size=tiny for tiny-lm.", hashed=True,
        hash_when="task_options", flag="--task-option", metavar="KEY=VALUE")
    #: Who exchanges with whom: ``gossip`` (push-pull with random peers), ``modest`` (a sample of trainers and
    #: aggregators per round), ``fl`` (federated learning with one fixed server, a baseline) or ``dpsgd``
    #: (every node averages with its graph neighbours every round, a baseline). See docs/protocols.md.
    topology: str = setting(
        default="gossip", section="training",
        help="Who exchanges with whom: gossip, modest (sampled trainers and aggregators), fl (one fixed server; "
             "baseline), dpsgd (neighbour averaging; baseline).",
        hashed=True, choices=TOPOLOGIES)
    #: Aggregation rule used to merge models (see `p2pnode.aggregation.available_rules()`).
    rule: str = setting(default="mean", section="training", help="Aggregation rule for merging models.", hashed=True)
    #: Extra parameters of the rule (for example ``{"trim": 1}``).
    rule_params: dict[str, Any] = setting(
        default_factory=dict, section="training", help="Parameter of the rule (repeatable), for example trim=1.",
        hashed=True, flag="--rule-param", metavar="KEY=VALUE")
    #: ``shared``: every node starts from the model built with `seed`; ``independent``: each node its own.
    model_seed_mode: str = setting(
        default="shared", section="training", help="One initial model for all nodes, or one per node.", hashed=True,
        param="init", choices=("shared", "independent"))
    #: Seed of the run: initial model, data split, peer choice.
    seed: int = setting(default=0, section="training", help="Seed of the run.")
    #: Dirichlet concentration for a non-IID split; None for IID.
    alpha: float | None = setting(
        default=None, section="training", help="Dirichlet alpha for a non-IID split (unset: IID).")
    #: Local SGD steps per round; None takes the task's default.
    local_steps: int | None = setting(
        default=None, section="training", help="Local SGD steps per round [task default].")
    #: Synchronisation warm-up (`p2pnode.training.round_schedule`): the first ``sync_warmup_steps`` local
    #: steps of the run go in rounds of ``sync_warmup_local_steps`` each, then rounds of `local_steps`
    #: (DiLoCo: frequent merges while the model moves fast, rare ones later). 0 (default): no warm-up. Not
    #: the learning-rate warm-up of a task (``--task-option warmup_steps=``). Run-wide: every peer must agree
    #: on the length of each round; hashed only when set, so that runs without it keep their hash.
    sync_warmup_steps: int = setting(
        default=0, section="training",
        help="Synchronisation warm-up: the first N local steps of the run train in rounds of "
             "--sync-warmup-local-steps, then rounds of --local-steps (0: none); run-wide.",
        hashed=True, hash_when="sync_warmup_steps", metavar="N")
    #: Local steps of a warm-up round (>= 1); needed when `sync_warmup_steps` > 0.
    sync_warmup_local_steps: int | None = setting(
        default=None, section="training",
        help="Local SGD steps per round during the synchronisation warm-up (needed with --sync-warmup-steps).",
        hashed=True, hash_when="sync_warmup_steps", metavar="H0")
    #: What the DiLoCo outer step (`outer_lr`) does in the warm-up rounds (`p2pnode.aggregation.WARMUP_OUTER`):
    #: ``outer`` the outer step after every round, momentum carried into the long rounds; ``reset``
    #: the same, momentum reset at the first round after the warm-up; ``sgd`` the outer step with momentum 0
    #: in warm-up rounds (momentum from the first long round on); ``plain`` the plain merge in warm-up rounds
    #: (as plain averaging at H0), the outer step only in the long rounds (default: on gossip the outer step
    #: in the short pairwise rounds ends 8-13 % above plain averaging, and on modest it is seed-dependent;
    #: docs/benchmarks.md, "The outer step in the warm-up"). Every topology (gossip and dpsgd:
    #: each node's step; modest and fl: the aggregator's step of a version trained in a warm-up round). No
    #: effect without `outer_lr` or without a warm-up. Run-wide; hashed with the warm-up (when
    #: `sync_warmup_steps` > 0), so that runs without a warm-up keep their hash.
    sync_warmup_outer: str = setting(
        default="plain", section="training",
        help="DiLoCo during the synchronisation warm-up: plain (plain merge in warm-up rounds, the outer step "
             "after), outer (the outer step every round), reset (momentum reset after the warm-up), sgd (outer "
             "step without momentum in warm-up rounds); run-wide.",
        hashed=True, hash_when="sync_warmup_steps", choices=SYNC_WARMUP_OUTER)
    #: Learning rate and batch size; None takes the task's default.
    lr: float | None = setting(default=None, section="training", help="Learning rate [task default].")
    batch_size: int | None = setting(default=None, section="training", help="Batch size [task default].")


@dataclass
class DilocoSettings:
    """Section ``diloco``: the DiLoCo outer optimizer and the wire compression (every topology; docs/protocols.md,
    docs/compression.md)."""

    #: Outer optimizer (DiLoCo-style Nesterov SGD on the pseudo-gradient ``theta0 - merged``): its learning
    #: rate, or None (default) for none; its momentum (default 0.9) and Nesterov flag (default True). Every
    #: topology: gossip and dpsgd step it on each node after the merge (buffers local to the node), modest and fl
    #: on the aggregator (buffers travel with the model). Hashed for modest/fl always (as they were), for
    #: gossip/dpsgd only when outer_lr is set (runs without it keep their hash).
    outer_lr: float | None = setting(
        default=None, section="diloco",
        help="DiLoCo: learning rate of the outer Nesterov optimizer on the pseudo-gradient (round-start model minus "
             "the merge), stepped after every merge (unset: none, plain merge).",
        hashed=True, topologies=TOPOLOGIES, hash_when="outer_lr", hash_always=("modest", "fl"))
    outer_momentum: float = setting(
        default=0.9, section="diloco", help="DiLoCo: momentum of the outer optimizer, in [0, 1).", hashed=True,
        topologies=TOPOLOGIES, hash_when="outer_lr", hash_always=("modest", "fl"))
    outer_nesterov: bool = setting(
        default=True, section="diloco", help="DiLoCo: Nesterov momentum in the outer optimizer.", hashed=True,
        topologies=TOPOLOGIES, flag="--outer-nesterov/--no-outer-nesterov", hash_when="outer_lr",
        hash_always=("modest", "fl"))
    #: Wire format of the exchanged tensors (`p2pnode.transport.compression`): ``none`` (default), ``fp16``,
    #: ``bf16``, ``int8[:<block>]`` or ``topk:<fraction>``. Run-wide: hashed when not ``none``. gossip and
    #: dpsgd send whole models (topk refused); modest and fl send updates from trainers (with error feedback,
    #: topk allowed) and models from aggregators (in `model_compression`). Not with secagg (lossy).
    compression: str = setting(
        default="none", section="diloco",
        help="Wire compression of exchanged tensors: none, fp16, bf16, int8[:BLOCK] or topk:FRACTION (topk: modest/fl "
             "trainer updates only); run-wide.",
        hashed=True, hash_when="compression", metavar="FORMAT")
    #: Wire format of the whole models that modest/fl aggregators send (versions, top-ups, base pulls):
    #: ``auto`` (default: the run's `compression`, int8 under topk, which fits updates only), ``none``,
    #: ``fp16``, ``bf16`` or ``int8[:<block>]``. Every holder keeps a version as decoded, so digests agree
    #: whatever the format. Run-wide: hashed when not ``auto``.
    model_compression: str = setting(
        default="auto", section="diloco",
        help="modest/fl: wire format of the models aggregators send: auto (the run's compression; int8 under "
             "topk), none, fp16, bf16 or int8[:BLOCK]; run-wide.",
        hashed=True, topologies=("modest", "fl"), hash_when="model_compression", metavar="FORMAT")
