"""Choice of the torch device a node trains on: its GPU when it has one, otherwise the CPU."""

from __future__ import annotations

import re

import torch

from p2pnode.errors import ConfigError

__all__ = ["select_device"]

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def select_device(requested: str = "auto") -> torch.device:
    """Resolve a device name from the configuration into a `torch.device`.

    Args:
        requested: ``"auto"`` (default): the first CUDA GPU when torch sees one, else the CPU;
            ``"cpu"``; ``"cuda"`` or ``"cuda:N"``: that GPU, which must exist.

    Raises:
        ConfigError: a CUDA device was requested but torch sees no GPU (or not that many), or the
            name is not one of the above. The message says how to fix it.
    """
    name = requested.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(name)
    if match is None:
        raise ConfigError(f"unknown device {requested!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = (
            "this torch build has no CUDA support (a CPU-only wheel)"
            if built is None
            else f"torch (built for CUDA {built}) finds no usable GPU or driver"
        )
        raise ConfigError(
            f"device {requested!r} requested, but {why}; run with device 'cpu' (or 'auto' to use a GPU "
            "only when one is present), or install a CUDA build of torch and the NVIDIA driver "
            "(in Docker: start the container with --gpus all)"
        )
    index = int(match.group(1)) if match.group(1) is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device {requested!r} requested, but torch sees only {count} GPU(s) "
            f"(cuda:0 .. cuda:{count - 1}); pick one of those or 'auto'"
        )
    return torch.device("cuda", index)
