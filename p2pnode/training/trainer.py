"""The local trainer of one node: its data shard, its copy of the model, SGD steps and evaluation.

Protocols see a node's model only through `Trainer.state` / `Trainer.load_state` (the floating-point
entries of the model's ``state_dict``: the parameters and float buffers such as BatchNorm running
statistics) and advance it with `Trainer.train`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from p2pnode.errors import ConfigError
from p2pnode.training.data import dataset_size, fetch_batch
from p2pnode.training.device import select_device
from p2pnode.training.tasks import Task, seeded

__all__ = ["Trainer"]

_SAMPLER_STREAM = 0x5A4D_91E5


class Trainer:
    """Trains one node's copy of a task's model on the node's shard of the training set.

    Args:
        task: what to train (`p2pnode.training.tasks.get_task`).
        node_index: this node's shard, ``0 <= node_index < num_nodes``.
        num_nodes: number of shards the training set is split into (see `split_indices`).
        seed: run seed. Fixes the split, the initial model (unless ``model_seed`` is given) and, with
            ``node_index``, the order in which this node visits its examples.
        alpha: ``None`` (default) for an IID split, else the Dirichlet concentration of a non-IID one.
        device: ``"auto"`` (default: a CUDA GPU if present, else CPU), ``"cpu"``, ``"cuda[:N]"`` or a
            `torch.device`.
        batch_size: examples per SGD step (default ``task.default_batch_size``); capped at the shard
            size.
        lr: SGD learning rate (default ``task.default_lr``).
        model_seed: seed of the initial weights (default ``seed``, so that all nodes of a run start
            from the same model; give each node its own for independent initializations).
        label_map: applied to every training batch's labels before the loss (e.g. a label-flipping
            attack); never to the test labels.
        max_eval_examples: `evaluate` uses the first this many test examples (default: all).

    The optimizer is the task's (`Task.make_optimizer`: SGD with the task's momentum and weight decay
    by default, AdamW with a warm-up and cosine schedule for ``tiny-lm``); its scheduler, if any, is
    stepped after every local step. On CUDA the forward pass runs under float16 autocast with a
    gradient scaler (mixed precision). Optimizer and scheduler state are local: `load_state` replaces
    the weights and keeps them, as in local SGD.
    """

    def __init__(
        self,
        task: Task,
        *,
        node_index: int,
        num_nodes: int,
        seed: int,
        alpha: float | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        lr: float | None = None,
        model_seed: int | None = None,
        label_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_eval_examples: int | None = None,
    ) -> None:
        if not 0 <= node_index < num_nodes:
            raise ConfigError(f"node_index must be in [0, {num_nodes}), got {node_index}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"lr must be a positive number, got {lr}")
        if max_eval_examples is not None and max_eval_examples < 1:
            raise ConfigError(f"max_eval_examples must be >= 1 or None, got {max_eval_examples}")
        self.task = task
        self.node_index = node_index
        self.num_nodes = num_nodes
        self.seed = seed
        if isinstance(device, torch.device) and device.type != "cuda":
            self.device: torch.device = device
        else:  # names, and CUDA devices, go through the check that the GPU exists
            self.device = select_device(str(device))
        self.label_map = label_map
        self.max_eval_examples = max_eval_examples

        self._train_set, self._test_set = task.datasets()
        shard = task.split(num_nodes, seed, alpha)[node_index]
        self._indices = torch.as_tensor(shard, dtype=torch.int64)
        self.num_examples: int = int(self._indices.numel())
        self.batch_size = min(batch_size or task.default_batch_size, self.num_examples)
        self.lr = lr if lr is not None else task.default_lr
        self.steps_done: int = 0

        init_seed = model_seed if model_seed is not None else seed
        # `seeded` also guards against a user task whose build_model forgets to fix its own seed.
        with seeded(init_seed):
            self.model = task.build_model(init_seed)
        self.model.to(self.device)
        self.model.train()
        self._exchanged = [
            name for name, value in self.model.state_dict().items() if torch.is_floating_point(value)
        ]
        # The task's optimizer (SGD with its momentum and weight decay unless it says otherwise) and
        # optional learning-rate scheduler, stepped once per local step.
        self.optimizer, self.scheduler = task.make_optimizer(self.model.parameters(), self.lr)
        self._amp = self.device.type == "cuda"
        self._scaler = torch.amp.GradScaler("cuda", enabled=self._amp)

        sampler_seed = np.random.SeedSequence([seed % 2**64, node_index, _SAMPLER_STREAM]).generate_state(1)
        self._generator = torch.Generator().manual_seed(int(sampler_seed[0]))
        self._order = torch.empty(0, dtype=torch.int64)  # remaining positions of the current epoch

    # -------------------------------------------------------------------------------- model exchange

    @property
    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The exchanged entries: name -> (shape, dtype) of every floating-point ``state_dict`` entry."""
        sd = self.model.state_dict()
        return {name: (tuple(sd[name].shape), sd[name].dtype) for name in self._exchanged}

    def state(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the exchanged entries; later training does not change them."""
        sd = self.model.state_dict()
        return {name: sd[name].detach().to("cpu", copy=True) for name in self._exchanged}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the model in place (moved to its device, cast to its dtypes).

        Raises:
            ValueError: names differ from `spec` (missing or extra), or a shape differs. Nothing is
                copied then.
        """
        sd = self.model.state_dict()
        expected = set(self._exchanged)
        missing = sorted(expected - set(state))
        extra = sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name in self._exchanged:
            if tuple(state[name].shape) != tuple(sd[name].shape):
                raise ValueError(
                    f"state entry {name!r} has shape {tuple(state[name].shape)}, the model's is "
                    f"{tuple(sd[name].shape)}"
                )
        with torch.no_grad():
            for name in self._exchanged:
                sd[name].copy_(state[name])

    # ------------------------------------------------------------------------------------ training

    def _next_positions(self, count: int) -> torch.Tensor:
        """The next ``count`` positions in the shard, from a reshuffled permutation per epoch."""
        parts = []
        while count > 0:
            if self._order.numel() == 0:
                self._order = torch.randperm(self.num_examples, generator=self._generator)
            take = self._order[:count]
            self._order = self._order[count:]
            parts.append(take)
            count -= take.numel()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def align_schedule(self, step: int) -> bool:
        """Put the learning-rate schedule at local step ``step`` (0-based): the next step runs at its rate.

        By default the schedule follows this trainer's own step count, which is the run's when the node
        trains every round (gossip, dpsgd). A MoDeST node trains only the versions whose sample it is in,
        so its own count lags the swarm's; the protocol aligns it to the version it trains instead, as
        DiLoCo's workers follow the outer step count. Only a `LambdaLR` (a closed form of the step, as the
        ``tiny-lm`` task's warm-up and cosine) can be moved; other schedulers keep their own count.

        Returns:
            Whether the schedule was moved (False: no scheduler, or one that is not a `LambdaLR`).

        Raises:
            ValueError: ``step < 0``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        sched = self.scheduler
        if type(sched) is not torch.optim.lr_scheduler.LambdaLR:  # subclasses may not be closed forms
            return False
        sched.last_epoch = step
        for group, base_lr, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base_lr * factor(step)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports
        return True

    def train(self, steps: int) -> float:
        """Run ``steps`` SGD steps on minibatches of the local shard; return their mean training loss.

        Batches walk through a fresh permutation of the shard each epoch (batches may straddle two
        epochs), drawn from a generator seeded by the run seed and node index: on the CPU, the same
        seeds give the same result. The loss is NaN or inf if training diverged. The scheduler, if
        any, steps after every step (see `align_schedule`).

        Raises:
            ValueError: ``steps < 1``.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model.train()
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            positions = self._next_positions(self.batch_size)
            inputs, targets = fetch_batch(self._train_set, self._indices[positions])
            if self.label_map is not None:
                targets = self.label_map(targets)
            inputs = self.task.augment(inputs.to(self.device, non_blocking=True), self._generator)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                loss = self.task.loss(self.model(inputs), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self._scaler.scale(loss).backward()
            self._scaler.step(self.optimizer)
            self._scaler.update()
            if self.scheduler is not None:
                self.scheduler.step()
            total += loss.detach().float()
            self.steps_done += 1
        # One device-to-host sync per call, not per step.
        return float(total.item()) / steps

    @property
    def metric(self) -> str:
        """Name of the second value of `evaluate` (the task's `Task.metric`, e.g. ``"accuracy"``)."""
        return self.task.metric

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """``(mean loss, metric)`` on the test set (its first ``max_eval_examples``).

        The metric is the task's (`metric`): accuracy in [0, 1] for the image tasks, perplexity for
        ``tiny-lm``. Loss and metric are means over every target element (an image's label, a
        sequence's tokens). The model is put in eval mode (BatchNorm uses its running statistics) and
        back in train mode.
        """
        n = dataset_size(self._test_set)
        if self.max_eval_examples is not None:
            n = min(n, self.max_eval_examples)
        if n == 0:
            raise ValueError(f"task {self.task.name!r} has an empty test set")
        self.model.eval()
        try:
            loss_sum = torch.zeros((), device=self.device)
            metric_sum: torch.Tensor | None = torch.zeros((), dtype=torch.float64, device=self.device)
            count = 0
            for start in range(0, n, self.task.eval_batch_size):
                indices = torch.arange(start, min(n, start + self.task.eval_batch_size))
                inputs, targets = fetch_batch(self._test_set, indices)
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                with self._autocast():
                    outputs = self.model(inputs)
                    loss = self.task.loss(outputs, targets)
                loss_sum += loss.float() * targets.numel()
                count += targets.numel()
                batch_metric = self.task.metric_sum(outputs, targets) if metric_sum is not None else None
                metric_sum = None if batch_metric is None or metric_sum is None else metric_sum + batch_metric
        finally:
            self.model.train()
        mean_loss = float(loss_sum.item()) / count
        if metric_sum is None:
            return mean_loss, float(self.task.metric_from_loss(mean_loss))
        return mean_loss, float(metric_sum.item()) / count

    def __repr__(self) -> str:
        return (
            f"Trainer(task={self.task.name!r}, node={self.node_index}/{self.num_nodes}, "
            f"examples={self.num_examples}, device={self.device}, steps_done={self.steps_done})"
        )
