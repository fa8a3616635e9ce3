"""Model architectures of the built-in tasks."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLP", "ResNet18"]


class MLP(nn.Sequential):
    """Fully connected network with ReLU between layers: ``sizes[0] -> ... -> sizes[-1]`` (logits)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


NormFactory = Callable[[int], nn.Module]


def _norm_factory(norm: str) -> NormFactory:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        # 32 groups is the usual GroupNorm default; every width of ResNet-18 (64..512) divides by it.
        return lambda channels: nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (CIFAR): a 3x3 stride-1 stem and no max-pool, so the four stages
    work on 32, 16, 8 and 4 pixel maps instead of the 8..1 that the ImageNet stem would leave.

    Args:
        num_classes: size of the output logits (default 10).
        norm: ``"batch"`` (default) for BatchNorm, ``"group"`` for GroupNorm with 32 groups.
            BatchNorm trains fastest when nodes hold similar data; its running mean and variance are
            floating-point buffers, so they are exchanged and averaged like the weights. GroupNorm has
            no running statistics and is known to degrade less when nodes hold very different
            (non-IID) data.
    """

    def __init__(self, num_classes: int = 10, norm: str = "batch") -> None:
        super().__init__()
        make_norm = _norm_factory(norm)
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(64)
        stages: list[nn.Module] = []
        in_channels = 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    _BasicBlock(in_channels, out_channels, stride, make_norm),
                    _BasicBlock(out_channels, out_channels, 1, make_norm),
                )
            )
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)
