"""Tasks: what a run trains (a model architecture, its data and its loss), by name.

Built-in tasks:

- ``digits-mlp``: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download) and a
  64-64-10 MLP. Small enough to run 64 nodes in one process in seconds; the tests' workhorse.
- ``cifar10-resnet18``: CIFAR-10 (downloaded once to ``data_dir``) and a ResNet-18 for 32x32 images.
- ``tiny-lm``: a small causal transformer language model on a shipped public-domain English text
  (`p2pnode.training.lm`); its metric is perplexity and its optimizer AdamW with warm-up and cosine decay.

A user task is named ``"package.module:factory"``: `get_task` imports the module and calls
``factory(**options)``, which must return a `Task`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from p2pnode.errors import ConfigError
from p2pnode.training.cifar import ensure_cifar10, load_cifar10, random_crop_flip
from p2pnode.training.data import ArrayDataset, dataset_size, fetch_batch, split_indices
from p2pnode.training.models import MLP, ResNet18

__all__ = ["CifarResNetTask", "DigitsMLPTask", "Optimizers", "Task", "available_tasks", "get_task", "seeded"]

#: What `Task.make_optimizer` returns: the optimizer and an optional learning-rate scheduler that the
#: trainer steps once after every local step.
Optimizers: TypeAlias = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]

DEFAULT_DATA_DIR = Path("~/.cache/p2pnode/data")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global CPU random generator seeded by ``seed``, then restore it.

    Model constructors draw their initial weights from the global generator; wrapping them in this
    makes the weights a function of ``seed`` alone and leaves the caller's random stream untouched.
    """
    # devices=[]: models are built on the CPU, and forking every CUDA generator would be slow and warn.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        yield


class Task(ABC):
    """A model architecture, its training and test data, and its loss.

    Subclasses set the class attributes and implement `build_model` and `datasets`. The trainer
    fetches batches with `p2pnode.training.data.fetch_batch`, so a dataset returns ``(input, label)``
    pairs, or better is an `ArrayDataset` (fast batched fetch).

    Attributes:
        name: the task's name, as given to `get_task`.
        num_classes: number of classes (labels are ``0 .. num_classes-1``).
        default_lr: learning rate used when the run sets none.
        default_batch_size: examples per local step used when the run sets none.
        default_local_steps: local steps a node runs per round before combining models with peers.
        default_momentum: SGD momentum of the default `make_optimizer` (default 0.9).
        default_weight_decay: L2 penalty of the default `make_optimizer` (default 0).
        eval_batch_size: examples per forward pass in `Trainer.evaluate` (default 1000).
        metric: name of the evaluation metric that `Trainer.evaluate` returns besides the loss and that
            logs, status, metrics and simulator results show (default ``"accuracy"``); computed by
            `metric_sum` or, when that returns None, by `metric_from_loss`.
        higher_is_better: whether a larger `metric` is better (default true; false for perplexity).
    """

    name: str
    num_classes: int
    default_lr: float
    default_batch_size: int
    default_local_steps: int
    default_momentum: float = 0.9
    default_weight_decay: float = 0.0
    eval_batch_size: int = 1000
    metric: str = "accuracy"
    higher_is_better: bool = True

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialized model on the CPU; the same ``seed`` gives the same weights.

        Must not disturb the caller's global random state: build inside ``with seeded(seed):``.
        """

    @abstractmethod
    def datasets(self) -> tuple[Dataset, Dataset]:
        """``(train, test)``. Load once per process and cache: a simulator asks once per node."""

    def train_labels(self) -> torch.Tensor:
        """Labels of the training set as a 1-D int64 tensor (used to split it among nodes).

        The default reads a ``targets`` attribute of the train dataset when it has one, else fetches
        every example once; override it when that would be slow.
        """
        train, _ = self.datasets()
        targets = getattr(train, "targets", None)
        if targets is not None:
            return torch.as_tensor(targets, dtype=torch.int64)
        indices = torch.arange(dataset_size(train))
        return fetch_batch(train, indices)[1]

    def split(self, num_nodes: int, seed: int, alpha: float | None = None) -> Sequence[Sequence[int] | torch.Tensor]:
        """Indices of the training examples of each of ``num_nodes`` nodes (disjoint shards).

        The default is `split_indices` over `train_labels` (IID, or Dirichlet(alpha) over classes).
        Override it for data without classes (the language-model task cuts its token stream into
        contiguous chunks). Every node computes it alike, so it must depend on its arguments only.
        """
        return split_indices(self.train_labels(), num_nodes, seed, alpha)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch; cross entropy of logits ``outputs (B, C)`` and labels ``targets (B,)``.

        `Trainer.evaluate` weights each batch's mean by ``targets.numel()``: a task whose targets are
        sequences (``(B, T)``) averages over every target element.
        """
        return nn.functional.cross_entropy(outputs, targets)

    def metric_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Sum of the metric over the batch's ``targets.numel()`` targets; the metric is its mean.

        The default counts correct top-1 predictions (accuracy). Return None to derive the metric
        from the mean loss instead (`metric_from_loss`).
        """
        return (outputs.argmax(dim=1) == targets).sum()

    def metric_from_loss(self, mean_loss: float) -> float:
        """The metric from the mean evaluation loss, for tasks whose `metric_sum` returns None."""
        raise NotImplementedError(f"task {self.name!r}: metric_sum returned None but metric_from_loss is missing")

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> Optimizers:
        """The local optimizer of the model's ``params`` at learning rate ``lr``, and its scheduler or None.

        Default: SGD with `default_momentum` and `default_weight_decay`, no scheduler. The optimizer
        and scheduler state stay on the node (`Trainer.load_state` replaces weights only) and are kept
        by checkpoints; a scheduler is stepped after every local step.
        """
        optimizer = torch.optim.SGD(params, lr=lr, momentum=self.default_momentum,
                                    weight_decay=self.default_weight_decay)
        return optimizer, None

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random training-time transformation of a batch (identity by default).

        Random draws must come from ``generator`` (a CPU generator seeded by the trainer), so that
        training stays reproducible; the work may run on ``inputs.device``.
        """
        del generator
        return inputs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------- digits

#: Fraction of the 1,797 digits held out as the common test set, and the seed of that split. The
#: seed is fixed, not the run's: every node of every run evaluates on the same 360 images.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@functools.cache
def _digits_data() -> tuple[ArrayDataset, ArrayDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixels are counts 0..16; scaling to [0, 1] keeps SGD steps well conditioned.
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return (
        ArrayDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        ArrayDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
    )


class DigitsMLPTask(Task):
    """scikit-learn's 8x8 digits (1,437 train / 360 test images, 10 classes) and an MLP 64-h-10.

    Defaults (lr 0.05, batch 32, 10 local steps, momentum 0.9) are tuned for both uses: one node with
    all the data passes 0.95 test accuracy within about 250-300 steps, and 64 nodes with about 22
    examples each (so batches of their whole shard) pass 0.9 after 5 rounds of train-then-average
    and 0.95 after about 20 (measured curve in docs/tasks.md).

    Args:
        hidden: width of the hidden layer (default 64).
    """

    name = "digits-mlp"
    num_classes = 10
    default_lr = 0.05
    default_batch_size = 32
    default_local_steps = 10

    def __init__(self, hidden: int = 64) -> None:
        if hidden < 1:
            raise ConfigError(f"digits-mlp: hidden must be >= 1, got {hidden}")
        self.hidden = hidden

    def build_model(self, seed: int) -> nn.Module:
        with seeded(seed):
            return MLP([64, self.hidden, self.num_classes])

    def datasets(self) -> tuple[Dataset, Dataset]:
        return _digits_data()

    def train_labels(self) -> torch.Tensor:
        return _digits_data()[0].targets


# ---------------------------------------------------------------------------------------------- cifar


@functools.cache
def _cifar_data(data_dir: Path, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    return load_cifar10(ensure_cifar10(data_dir, download=download))


class CifarResNetTask(Task):
    """CIFAR-10 (50,000 train / 10,000 test 32x32 colour images) and `ResNet18`.

    Training batches get a random 32x32 crop of the 4-pixel padded image and a random horizontal
    flip. Defaults: lr 0.05, batch 64, 50 local steps, momentum 0.9, weight decay 5e-4 (the usual
    CIFAR ResNet recipe scaled to batch 64).

    Args:
        data_dir: folder holding (or to receive) ``cifar-10-batches-bin/``
            (default ``~/.cache/p2pnode/data``).
        download: fetch the archive when the folder is missing (default true).
        norm: ``"batch"`` (default) or ``"group"``; see `ResNet18`.
    """

    name = "cifar10-resnet18"
    num_classes = 10
    default_lr = 0.05
    default_batch_size = 64
    default_local_steps = 50
    default_weight_decay = 5e-4
    eval_batch_size = 500

    def __init__(
        self, data_dir: str | Path = DEFAULT_DATA_DIR, download: bool = True, norm: str = "batch"
    ) -> None:
        if norm not in ("batch", "group"):
            raise ConfigError(f"cifar10-resnet18: norm must be 'batch' or 'group', got {norm!r}")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.download = download
        self.norm = norm

    def build_model(self, seed: int) -> nn.Module:
        with seeded(seed):
            return ResNet18(self.num_classes, norm=self.norm)

    def datasets(self) -> tuple[Dataset, Dataset]:
        return _cifar_data(self.data_dir, self.download)

    def train_labels(self) -> torch.Tensor:
        return _cifar_data(self.data_dir, self.download)[0].targets

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_crop_flip(inputs, generator)


# ------------------------------------------------------------------------------------------- registry

_BUILTIN: dict[str, Callable[..., Task]] = {
    DigitsMLPTask.name: DigitsMLPTask,
    CifarResNetTask.name: CifarResNetTask,
}
#: Built-in tasks defined in modules that import this one: name -> (module, class), imported on use.
_LAZY: dict[str, tuple[str, str]] = {
    "tiny-lm": ("p2pnode.training.lm", "TinyLMTask"),
}


def available_tasks() -> list[str]:
    """Names of the built-in tasks (a user task ``module:factory`` is accepted besides these)."""
    return sorted([*_BUILTIN, *_LAZY])


def _check_options(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some callables (builtins) have no introspectable signature
        return
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"task {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )


def _load_user_task(name: str, options: dict[str, Any]) -> Task:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task {name!r}: a user task is written 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"task {name!r}: cannot import module {module_name!r} ({exc}); is it installed or on PYTHONPATH?"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"task {name!r}: module {module_name!r} has no callable {attr!r}")
    _check_options(name, factory, options)
    try:
        task = factory(**options)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"task {name!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise ConfigError(
            f"task {name!r}: the factory returned {type(task).__name__}, not a p2pnode.training.Task"
        )
    return task


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name``, built with ``options``.

    Args:
        name: a built-in name (see `available_tasks`) or ``"package.module:factory"``.
        options: keyword arguments of the task, e.g. ``data_dir="/data"`` for ``cifar10-resnet18``,
            ``hidden=128`` for ``digits-mlp``, ``size="tiny"`` for ``tiny-lm``, anything a user factory accepts.

    Raises:
        ConfigError: unknown name, option the task does not accept, module that cannot be imported,
            or a factory that fails or returns something other than a `Task`.
    """
    if ":" in name:
        return _load_user_task(name, options)
    factory = _BUILTIN.get(name)
    if factory is None and name in _LAZY:
        module, attr = _LAZY[name]
        factory = getattr(importlib.import_module(module), attr)
    if factory is None:
        raise ConfigError(
            f"unknown task {name!r}; built-in tasks: {', '.join(available_tasks())}, "
            "or a user task 'package.module:factory'"
        )
    _check_options(name, factory, options)
    return factory(**options)
