"""Training layer: tasks (model + data), the data split among nodes, device choice, the local trainer."""

from p2pnode.training.data import ArrayDataset, split_indices
from p2pnode.training.device import select_device
from p2pnode.training.tasks import Task, available_tasks, get_task, seeded
from p2pnode.training.trainer import Trainer

__all__ = [
    "ArrayDataset",
    "Task",
    "Trainer",
    "available_tasks",
    "get_task",
    "seeded",
    "select_device",
    "split_indices",
]
