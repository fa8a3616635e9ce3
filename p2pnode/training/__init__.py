"""Training layer: tasks (model, data, metric, optimizer), the split among nodes, device choice, the trainer."""

from p2pnode.training.data import ArrayDataset, split_indices
from p2pnode.training.device import select_device
from p2pnode.training.tasks import Optimizers, Task, available_tasks, get_task, seeded
from p2pnode.training.trainer import Trainer

__all__ = [
    "ArrayDataset",
    "Optimizers",
    "Task",
    "Trainer",
    "available_tasks",
    "get_task",
    "seeded",
    "select_device",
    "split_indices",
]
