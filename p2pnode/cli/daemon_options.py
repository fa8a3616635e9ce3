"""Click options of the node-local daemon settings (`DaemonSettings`), shared by `run` and `join`.

`daemon_options` adds the options; `settings_from_options` turns the parsed options into validated
settings. It reads ``state_dir`` and ``json_logs`` from the node options, and takes the default of
every daemon option that a command does not declare.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from p2pnode.cli.options import byzantine_options, config_fields, node_options, schema_options, training_options
from p2pnode.config import schema
from p2pnode.daemon.settings import DaemonSettings, parse_gpu_memory
from p2pnode.errors import ConfigError

F = Callable[..., Any]


def daemon_options(f: F) -> F:
    """Options of checkpoints, state sync, quorum, metrics, progress and resource limits: one per
    `DaemonSettings` field (generated from its `Setting`), plus ``--max-gpu-memory`` for the two GPU caps."""
    names = [fl.name for fl, meta in schema(DaemonSettings) if meta.option]
    f = click.option("--max-gpu-memory", default=None, metavar="GIB|FRACTION",
                     help="Cap on this process's GPU memory: GiB (8, 8GiB) or a fraction (0.5, 50%).")(f)
    return schema_options(names, DaemonSettings)(f)


def run_options(f: F) -> F:
    """Every option of `p2pnode run`: node, training, Byzantine and daemon options. `join`, `config show` and
    `config check` take exactly the same, so that what `config check` accepts is what `run` accepts."""
    return node_options(training_options(byzantine_options(daemon_options(f))))


def settings_from_options(kw: dict[str, Any]) -> DaemonSettings:
    """Build and validate `DaemonSettings` from the options of `run`/`join`.

    :raises ConfigError: a value is invalid (the message names the option's key).
    """
    defaults = DaemonSettings()
    gib: float | None = None
    fraction: float | None = None
    if kw.get("max_gpu_memory"):
        gib, fraction = parse_gpu_memory(str(kw["max_gpu_memory"]))
    state_dir = kw.get("state_dir")
    progress = kw.get("progress") or defaults.progress
    if kw.get("json_logs") and progress == "auto":
        progress = "off"  # JSON lines on stderr are for machines; a live display would garble them
    try:
        return DaemonSettings(
            state_dir=Path(state_dir) if state_dir is not None else None,
            max_gpu_memory_gib=gib, max_gpu_memory_fraction=fraction,
            **{**config_fields(kw, DaemonSettings), "progress": progress},
        ).validate()
    except TypeError as e:  # a value of the wrong type from a caller that bypassed click
        raise ConfigError(f"daemon settings: {e}") from e


__all__ = ["daemon_options", "run_options", "settings_from_options"]
