"""Data attacks: applied to a Byzantine peer's training data, not to the updates it sends.

``label_flip``: every label ``y`` becomes ``num_classes - 1 - y`` (all classes flipped at once), the
variant used by Karimireddy, He, Jaggi ("Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022); Tolpegin et al. (ESORICS 2020) flip one source class to one target class
instead. The peer then trains honestly on the flipped labels, so its update
looks statistically like an honest one.
"""

from __future__ import annotations

import torch

from p2pnode.errors import AggregationError


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return ``num_classes - 1 - labels`` (a new tensor, same dtype and device).

    Raises:
        AggregationError: labels are not integers or fall outside ``[0, num_classes)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise AggregationError(f"label_flip: num_classes must be an integer >= 1, got {num_classes!r}")
    if not isinstance(labels, torch.Tensor):
        raise AggregationError(f"label_flip: labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise AggregationError(f"label_flip: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise AggregationError(
            f"label_flip: labels must be in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return (num_classes - 1) - labels
