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

from p2pnode.cli.options import byzantine_options, node_options, training_options
from p2pnode.daemon.settings import PROGRESS_MODES, DaemonSettings, parse_gpu_memory
from p2pnode.errors import ConfigError

F = Callable[..., Any]


def daemon_options(f: F) -> F:
    """Options of checkpoints, state sync, quorum, metrics, progress and resource limits."""
    opts = [
        click.option("--resume/--no-resume", default=True, show_default=True,
                     help="Resume from the newest valid checkpoint in the state dir (--no-resume starts at round "
                          "0 and moves this run's old checkpoints aside)."),
        click.option("--checkpoint-every", default=1, show_default=True, type=int, metavar="ROUNDS",
                     help="Write a checkpoint every this many rounds (0: never)."),
        click.option("--keep-checkpoints", default=3, show_default=True, type=int,
                     help="Checkpoints kept in the state dir, newest first."),
        click.option("--sync/--no-sync", "sync_on_join", default=True, show_default=True,
                     help="At start, fetch the model and round from peers that are ahead."),
        click.option("--min-merge", default=1, show_default=True, type=int, metavar="N",
                     help="Quorum: a round that merged fewer than N models (own included) is partial and its "
                          "merge is not applied."),
        click.option("--metrics-port", default=None, type=int,
                     help="Serve Prometheus metrics on this port (0: any free port) [default: off]."),
        click.option("--metrics-host", default="127.0.0.1", show_default=True,
                     help="Address of the metrics endpoint."),
        click.option("--max-gpu-memory", default=None, metavar="GIB|FRACTION",
                     help="Cap on this process's GPU memory: GiB (8, 8GiB) or a fraction (0.5, 50%)."),
        click.option("--cpu-threads", default=None, type=int, help="CPU threads for training [torch default]."),
        click.option("--max-upload-mbps", default=None, type=float,
                     help="Cap on the average upload rate to peers, in Mbit/s [default: none]."),
        click.option("--signed-records/--unsigned-records", default=True, show_default=True,
                     help="Sign this node's DHT records with its identity key and ignore unsigned ones (all "
                          "peers of a run must agree)."),
        click.option("--progress", default="auto", show_default=True, type=click.Choice(list(PROGRESS_MODES)),
                     help="Live progress display on stderr (auto: when stderr is a terminal and logs are text)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


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
            resume=kw.get("resume", defaults.resume),
            checkpoint_every=kw.get("checkpoint_every", defaults.checkpoint_every),
            keep_checkpoints=kw.get("keep_checkpoints", defaults.keep_checkpoints),
            sync_on_join=kw.get("sync_on_join", defaults.sync_on_join),
            min_merge=kw.get("min_merge", defaults.min_merge),
            metrics_port=kw.get("metrics_port", defaults.metrics_port),
            metrics_host=kw.get("metrics_host", defaults.metrics_host),
            max_gpu_memory_gib=gib, max_gpu_memory_fraction=fraction,
            cpu_threads=kw.get("cpu_threads", defaults.cpu_threads),
            max_upload_mbps=kw.get("max_upload_mbps", defaults.max_upload_mbps),
            signed_records=kw.get("signed_records", defaults.signed_records),
            progress=progress,
        ).validate()
    except TypeError as e:  # a value of the wrong type from a caller that bypassed click
        raise ConfigError(f"daemon settings: {e}") from e


__all__ = ["daemon_options", "run_options", "settings_from_options"]
