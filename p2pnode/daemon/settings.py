"""Node-local settings of the daemon: state dir, checkpoints, state sync, quorum, metrics, resource limits.

These are local to one machine (they are not part of the run's config hash): two peers of one run may
checkpoint at different rates or cap their upload differently. `DaemonSettings.validate` checks every
value once and raises `ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pnode.config import setting
from p2pnode.errors import ConfigError

#: Values of `DaemonSettings.progress`.
PROGRESS_MODES = ("auto", "on", "off")
#: Smallest and largest chunk of a state-sync transfer, in bytes (4 KiB .. 64 MiB).
MIN_SYNC_CHUNK_BYTES = 4 << 10
MAX_SYNC_CHUNK_BYTES = 64 << 20


@dataclass
class DaemonSettings:
    """Everything a daemon needs beyond the run's `NodeConfig`.

    The defaults are those of ``p2pnode run``; `DaemonSettings.in_memory` gives those of a node that
    persists nothing and does not sync (the simulator's and most tests').
    """

    #: Where the node keeps its identity key, checkpoints, lock and ``control.json``. None: nothing is
    #: persisted (a fresh identity every start, no checkpoints).
    state_dir: Path | None = setting(
        default=None, section="daemon", help="Where the node keeps its control address and token (--state-dir).",
        option=False)
    #: Resume from the newest valid checkpoint in the state dir at start (default True).
    resume: bool = setting(
        default=True, section="daemon",
        help="Resume from the newest valid checkpoint in the state dir (--no-resume starts at round 0 and moves this "
             "run's old checkpoints aside).",
        flag="--resume/--no-resume")
    #: Write a checkpoint every this many rounds (default 1; 0: never).
    checkpoint_every: int = setting(
        default=1, section="daemon", help="Write a checkpoint every this many rounds (0: never).", metavar="ROUNDS")
    #: Checkpoints kept in the state dir, newest first (default 3; at least 1).
    keep_checkpoints: int = setting(
        default=3, section="daemon", help="Checkpoints kept in the state dir, newest first.")
    #: Sign this node's DHT records with its identity key and refuse unsigned records (default True).
    #: All peers of a run must agree: a signed directory ignores unsigned records and vice versa.
    signed_records: bool = setting(
        default=True, section="daemon",
        help="Sign this node's DHT records with its identity key and ignore unsigned ones (all peers of a run must "
             "agree).",
        flag="--signed-records/--unsigned-records")
    #: When joining through initial peers, let p2pd check first that no other peer uses this node's
    #: identity (default True; costs one extra short-lived p2pd at start).
    check_identity_free: bool = setting(
        default=True, section="daemon",
        help="When joining, check first that no other peer uses this node's identity (one short-lived p2pd).",
        flag="--check-identity-free/--no-check-identity-free")
    #: At start, fetch the model and round from the most advanced peers when they are ahead of this
    #: node's checkpoint (default True).
    sync_on_join: bool = setting(
        default=True, section="daemon", help="At start, fetch the model and round from peers that are ahead.",
        param="sync_on_join", flag="--sync/--no-sync")
    #: Serve this node's model to joining peers (default True).
    serve_state: bool = setting(
        default=True, section="daemon", help="Serve this node's model to joining peers.",
        flag="--serve-state/--no-serve-state")
    #: Longest wait for peers to appear in the directory before syncing, when initial peers are
    #: given, in seconds (default 15).
    sync_wait_s: float = setting(
        default=15.0, section="daemon", help="Longest wait for peers to appear before syncing, in seconds.")
    #: Longest whole state sync, in seconds (default 300); then the node starts from its own model.
    sync_timeout_s: float = setting(
        default=300.0, section="daemon",
        help="Longest whole state sync, in seconds; then the node starts from its own model.")
    #: Size of one state-sync chunk, in bytes (default 1 MiB).
    sync_chunk_bytes: int = setting(default=1 << 20, section="daemon", help="Size of one state-sync chunk, in bytes.")
    #: Most peers asked for their manifest, most advanced first (default 4).
    sync_sources: int = setting(
        default=4, section="daemon", help="Most peers asked for their manifest, most advanced first.")
    #: Chunk requests in flight at once during a sync (default 4).
    sync_parallel: int = setting(default=4, section="daemon", help="Chunk requests in flight at once during a sync.")
    #: Time allowed for one manifest or chunk request, in seconds (default 15).
    sync_request_timeout_s: float = setting(
        default=15.0, section="daemon", help="Seconds allowed for one manifest or chunk request of a sync.")
    #: Quorum: a round that merged fewer models than this (own included) is partial: it is reported,
    #: counted, and its merge is not applied (default 1: every merge counts).
    min_merge: int = setting(
        default=1, section="daemon",
        help="Quorum: a round that merged fewer than N models (own included) is partial and its merge is not applied.",
        metavar="N")
    #: Port of the Prometheus endpoint (``/metrics``); None (default): no endpoint; 0: any free port.
    metrics_port: int | None = setting(
        default=None, section="daemon", help="Serve Prometheus metrics on this port (0: any free port) [default: off].")
    #: Address of the Prometheus endpoint (default 127.0.0.1).
    metrics_host: str = setting(default="127.0.0.1", section="daemon", help="Address of the metrics endpoint.")
    #: Cap on the GPU memory this process may allocate, in GiB (default: no cap).
    max_gpu_memory_gib: float | None = setting(
        default=None, section="daemon", help="Cap on GPU memory in GiB (--max-gpu-memory 8).", option=False)
    #: Cap on the GPU memory this process may allocate, as a fraction of the device's memory in (0, 1]
    #: (default: no cap). At most one of the two caps may be set.
    max_gpu_memory_fraction: float | None = setting(
        default=None, section="daemon", help="Cap on GPU memory as a fraction (--max-gpu-memory 0.5).", option=False)
    #: Intra-op CPU threads of torch in the daemon process (default: torch's choice).
    cpu_threads: int | None = setting(default=None, section="daemon", help="CPU threads for training [torch default].")
    #: Cap on the average upload rate to peers, in Mbit/s (default: no cap).
    max_upload_mbps: float | None = setting(
        default=None, section="daemon", help="Cap on the average upload rate to peers, in Mbit/s [default: none].")
    #: Live progress display on stderr: ``auto`` (default: when stderr is a terminal and logs are
    #: text), ``on`` (when stderr is a terminal) or ``off``.
    progress: str = setting(
        default="auto", section="daemon",
        help="Live progress display on stderr (auto: when stderr is a terminal and logs are text).",
        choices=PROGRESS_MODES)

    @classmethod
    def in_memory(cls, **overrides: Any) -> DaemonSettings:
        """Settings of a node that persists nothing, does not sync and serves no state (simulator, tests)."""
        base: dict[str, Any] = {"state_dir": None, "resume": False, "checkpoint_every": 0,
                                "sync_on_join": False, "serve_state": False, "signed_records": False}
        base.update(overrides)
        return cls(**base).validate()

    def validate(self) -> DaemonSettings:
        """Check every value; raise `ConfigError` naming the key and the allowed values. Returns self."""
        if self.state_dir is not None:
            self.state_dir = Path(self.state_dir).expanduser()
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every}: must be >= 0 rounds (0: never)")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        for key in ("sync_wait_s", "sync_timeout_s", "sync_request_timeout_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}={value}: must be a number of seconds >= 0")
        if not MIN_SYNC_CHUNK_BYTES <= self.sync_chunk_bytes <= MAX_SYNC_CHUNK_BYTES:
            raise ConfigError(f"sync_chunk_bytes={self.sync_chunk_bytes}: must be in "
                              f"{MIN_SYNC_CHUNK_BYTES}..{MAX_SYNC_CHUNK_BYTES} bytes")
        for key in ("sync_sources", "sync_parallel", "min_merge"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port={self.metrics_port}: must be in 0..65535 (0: any free port), "
                              "or unset for no endpoint")
        if self.max_gpu_memory_gib is not None and self.max_gpu_memory_fraction is not None:
            raise ConfigError("max_gpu_memory_gib and max_gpu_memory_fraction are both set; allowed: one of them")
        if self.max_gpu_memory_gib is not None and not (math.isfinite(self.max_gpu_memory_gib)
                                                        and self.max_gpu_memory_gib > 0):
            raise ConfigError(f"max_gpu_memory_gib={self.max_gpu_memory_gib}: must be > 0 GiB")
        if self.max_gpu_memory_fraction is not None and not 0 < self.max_gpu_memory_fraction <= 1:
            raise ConfigError(f"max_gpu_memory_fraction={self.max_gpu_memory_fraction}: must be in (0, 1]")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads={self.cpu_threads}: must be >= 1 (or unset for torch's default)")
        if self.max_upload_mbps is not None and not (math.isfinite(self.max_upload_mbps)
                                                     and self.max_upload_mbps > 0):
            raise ConfigError(f"max_upload_mbps={self.max_upload_mbps}: must be > 0 Mbit/s (or unset: no cap)")
        if self.progress not in PROGRESS_MODES:
            raise ConfigError(f"progress={self.progress!r}; allowed: {', '.join(PROGRESS_MODES)}")
        return self

    @property
    def upload_bytes_per_s(self) -> float | None:
        """`max_upload_mbps` in bytes per second (None: no cap)."""
        return None if self.max_upload_mbps is None else self.max_upload_mbps * 1e6 / 8

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state_dir"] = None if self.state_dir is None else str(self.state_dir)
        return out


def parse_gpu_memory(text: str) -> tuple[float | None, float | None]:
    """Parse ``--max-gpu-memory``: ``"8GiB"``/``"8G"``/``"8"`` (GiB when > 1) or ``"0.5"``/``"50%"`` (fraction).

    :returns: ``(gib, fraction)``, exactly one of them set.
    :raises ConfigError: the text is neither form.
    """
    raw = text.strip()
    lowered = raw.lower()
    try:
        if lowered.endswith("%"):
            return None, float(lowered[:-1]) / 100
        for suffix in ("gib", "gb", "g"):
            if lowered.endswith(suffix):
                return float(lowered[: -len(suffix)]), None
        value = float(lowered)
    except ValueError:
        raise ConfigError(f"max_gpu_memory={text!r}: expected GiB (8, 8GiB) or a fraction (0.5, 50%)") from None
    return (value, None) if value > 1 else (None, value)


__all__ = ["PROGRESS_MODES", "DaemonSettings", "parse_gpu_memory"]
