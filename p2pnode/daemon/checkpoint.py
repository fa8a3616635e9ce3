"""Checkpoints: the node's model, optimizer momentum and round on disk, written atomically, read back verified.

File layout (``<state dir>/checkpoints/ckpt-<config hash>-<round, 10 digits>.p2pc``)::

    b"P2PNCKPT" | u32 format (1) | message | SHA-256 of everything before (32 bytes)

where ``message`` is a wire-codec message (`p2pnode.transport.codec`): ``u32 length | Envelope |
raw tensor bytes``, whose body is a `CheckpointInfo` (round, run, config hash, ...) and whose tensors
are ``model/<state_dict name>`` (every entry of the model's ``state_dict``) and
``optim/<parameter index>/<key>`` (the optimizer's per-parameter tensors: SGD momentum; AdamW's
``exp_avg``, ``exp_avg_sq`` and ``step``) and ``sched/<key>`` (the numeric entries of the learning-rate
scheduler's ``state_dict``, when the task has one: ``last_epoch``, ``base_lrs``, ...) and ``outer/<key>``
(the DiLoCo outer optimizer's state where it is the node's own, gossip and dpsgd: ``steps`` and
``momentum/<state_dict name>``; `OuterOptimizer.state_dict`). Files written before ``outer/`` entries
existed read as having no outer state: the node then starts its momentum afresh. Nothing is ever
unpickled: tensors are raw little-endian bytes with a dtype from the codec's allowlist and a shape.

Writing: the bytes go to a temporary file in the same directory (created 0600), which is fsynced and
then renamed over the final name, and the directory is fsynced; a crash at any moment leaves either
the previous set of files or the new one complete, never a half-written checkpoint under a final name.
The newest `keep` checkpoints of the config are kept, older ones are deleted after a new one is in place.

Reading: the trailing SHA-256 covers every byte, so a truncated, zero-filled or bit-flipped file is
detected; `CheckpointStore.load_latest` then logs it and falls back to the next older checkpoint.
A checkpoint written under another run config is refused (`CheckpointMismatch`) rather than loaded.

Taking a `Checkpoint` of a trainer and loading one back into it is `p2pnode.daemon.trainer_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2pnode.daemon.atomic import atomic_file, fsync_dir
from p2pnode.errors import BadMessage, P2PNodeError
from p2pnode.proto import statesync_pb2
from p2pnode.transport import codec

logger = logging.getLogger(__name__)

#: First bytes of every checkpoint file.
MAGIC = b"P2PNCKPT"
#: Version of the layout written; a reader refuses other versions.
FORMAT = 1
#: Subdirectory of the state dir that holds the checkpoints.
CHECKPOINT_DIR = "checkpoints"
#: Method name written in the checkpoint's envelope (not a peer method; it marks the message's kind).
ENVELOPE_METHOD = "p2pnode.checkpoint"
SUFFIX = ".p2pc"
_PREFIX = struct.Struct("<8sI")
_DIGEST_BYTES = 32
_NAME = re.compile(r"^ckpt-([0-9a-f]{1,64})-(\d{10})\.p2pc$")
_MODEL = "model/"
_OPTIM = "optim/"
_SCHED = "sched/"
_OUTER = "outer/"


class CheckpointError(P2PNodeError):
    """A checkpoint cannot be written, or the node cannot resume from the checkpoints it has."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file is truncated, damaged or not a checkpoint (its hash or layout is wrong)."""


class CheckpointMismatch(CheckpointError):
    """The state dir holds checkpoints of another run config (or of a model of another shape)."""


@dataclass
class Checkpoint:
    """One node's resumable state.

    :param round: rounds completed when it was taken.
    :param config_hash: the run config hash (`NodeConfig.config_hash`) it belongs to.
    :param model: every ``state_dict`` entry of the model (CPU tensors).
    :param optimizer: per-parameter optimizer tensors (SGD: ``momentum_buffer``), by parameter index.
    :param scheduler: numeric entries of the learning-rate scheduler's ``state_dict`` as CPU tensors
        (int64 for integers, float64 for floats, 1-D for lists); empty when the task has no scheduler.
    :param outer: the DiLoCo outer optimizer's state (`OuterOptimizer.state_dict`: ``steps``, an int64
        scalar, and ``momentum/<model entry>`` buffers) where the protocol keeps it on the node
        (`LocalOuterState`); empty otherwise, and in checkpoints written before it was saved.
    :param steps_done: local SGD steps run so far.
    :param created: when it was taken, seconds since the Unix epoch.
    :param path: the file it was read from or written to, if any.
    """

    round: int
    config_hash: str
    run_id: str
    task: str
    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    scheduler: dict[str, torch.Tensor] = field(default_factory=dict)
    outer: dict[str, torch.Tensor] = field(default_factory=dict)
    steps_done: int = 0
    peer_id: str = ""
    created: float = 0.0
    path: Path | None = None


# ---------------------------------------------------------------------------------------- encoding
def encode(ckpt: Checkpoint) -> list[memoryview]:
    """The bytes of a checkpoint file, as buffers to write in order (the trailing hash not included)."""
    info = statesync_pb2.CheckpointInfo(format=FORMAT, round=ckpt.round, run_id=ckpt.run_id,
                                        config_hash=ckpt.config_hash, task=ckpt.task, created=ckpt.created,
                                        peer_id=ckpt.peer_id, steps_done=ckpt.steps_done)
    tensors = {_MODEL + name: t for name, t in ckpt.model.items()}
    for index, state in sorted(ckpt.optimizer.items()):
        for key, t in state.items():
            tensors[f"{_OPTIM}{index}/{key}"] = t
    for key, t in sorted(ckpt.scheduler.items()):
        tensors[_SCHED + key] = t
    for key, t in sorted(ckpt.outer.items()):
        tensors[_OUTER + key] = t
    return [memoryview(_PREFIX.pack(MAGIC, FORMAT)), *codec.encode(ENVELOPE_METHOD, info, tensors)]


def decode(data: bytes | bytearray | memoryview, path: Path | None = None) -> Checkpoint:
    """Parse and verify the bytes of a checkpoint file.

    :raises CorruptCheckpoint: wrong magic or format, hash mismatch (truncated or damaged), or a layout
        the wire codec refuses.
    """
    view = memoryview(data)
    where = str(path) if path is not None else "checkpoint"
    if view.nbytes < _PREFIX.size + codec.HEADER.size + _DIGEST_BYTES:
        raise CorruptCheckpoint(f"{where}: {view.nbytes} bytes is too short to be a checkpoint (truncated?)")
    magic, version = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptCheckpoint(f"{where}: not a p2pnode checkpoint (wrong magic bytes)")
    if version != FORMAT:
        raise CorruptCheckpoint(f"{where}: checkpoint format {version}; this version reads format {FORMAT}")
    body, digest = view[:-_DIGEST_BYTES], bytes(view[-_DIGEST_BYTES:])
    if hashlib.sha256(body).digest() != digest:
        raise CorruptCheckpoint(f"{where}: SHA-256 mismatch (the file is truncated or damaged)")
    try:
        env, tensors = codec.decode(body[_PREFIX.size:], max_message_bytes=view.nbytes)
        if env.method != ENVELOPE_METHOD:
            raise BadMessage(f"envelope method {env.method!r}", code="malformed")
        info = codec.parse_body(env, statesync_pb2.CheckpointInfo)
    except BadMessage as e:  # a correct hash over a bad layout: written by something else
        raise CorruptCheckpoint(f"{where}: {e}") from e
    model: dict[str, torch.Tensor] = {}
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    scheduler: dict[str, torch.Tensor] = {}
    outer: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(_MODEL):
            model[name[len(_MODEL):]] = t
        elif name.startswith(_OPTIM):
            index, _, key = name[len(_OPTIM):].partition("/")
            if not index.isdigit() or not key:
                raise CorruptCheckpoint(f"{where}: bad optimizer entry {name!r}")
            optimizer.setdefault(int(index), {})[key] = t
        elif name.startswith(_SCHED) and len(name) > len(_SCHED) and t.dim() <= 1:
            scheduler[name[len(_SCHED):]] = t
        elif name.startswith(_OUTER) and len(name) > len(_OUTER):
            outer[name[len(_OUTER):]] = t
        else:
            raise CorruptCheckpoint(f"{where}: unknown entry {name!r}")
    return Checkpoint(round=info.round, config_hash=info.config_hash, run_id=info.run_id, task=info.task,
                      model=model, optimizer=optimizer, scheduler=scheduler, outer=outer, steps_done=info.steps_done,
                      peer_id=info.peer_id,
                      created=info.created, path=path)


def read(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file. :raises CorruptCheckpoint: see `decode`; also unreadable files."""
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(data)
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot read: {e.strerror or e}") from e
    return decode(memoryview(data)[:n], path)


# ---------------------------------------------------------------------------------------- the store
class CheckpointStore:
    """The checkpoints of one state dir.

    :param directory: where the files live (created 0700 if missing), normally ``<state dir>/checkpoints``.
    :param keep: how many checkpoints of one config to keep, newest first (default 3, at least 1).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).expanduser()
        self.keep = keep
        #: Checkpoint files found damaged and skipped since this store was made.
        self.corrupt_skipped = 0

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str], keep: int = 3) -> CheckpointStore:
        return cls(Path(state_dir).expanduser() / CHECKPOINT_DIR, keep)

    def _ensure_dir(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    @staticmethod
    def file_name(config_hash: str, round_: int) -> str:
        return f"ckpt-{config_hash}-{round_:010d}{SUFFIX}"

    def files(self, config_hash: str | None = None) -> list[tuple[int, str, Path]]:
        """``(round, config hash, path)`` of the checkpoint files, newest round first; only of
        `config_hash` when given. Temporary files and other names are ignored."""
        out: list[tuple[int, str, Path]] = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        for p in entries:
            m = _NAME.match(p.name)
            if m and (config_hash is None or m.group(1) == config_hash):
                out.append((int(m.group(2)), m.group(1), p))
        out.sort(key=lambda item: (item[0], item[2].name), reverse=True)
        return out

    def write(self, ckpt: Checkpoint) -> Path:
        """Write `ckpt` atomically, then delete this config's checkpoints beyond the newest `keep`.

        :returns: the path of the new file.
        :raises CheckpointError: the file could not be written (disk full, permissions); nothing under a
            final name was changed then.
        """
        try:
            self._ensure_dir()
        except OSError as e:
            raise CheckpointError(f"cannot create {self.directory}: {e.strerror or e}") from e
        final = self.directory / self.file_name(ckpt.config_hash, ckpt.round)
        digest = hashlib.sha256()
        try:
            # Created 0600: nobody else can read the model; a fresh temporary name, never a stale file.
            with atomic_file(final) as f:
                for part in encode(ckpt):
                    view = part.cast("B") if part.format != "B" else part
                    digest.update(view)
                    f.write(view)
                f.write(digest.digest())
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}") from e
        ckpt.path = final
        self.prune(ckpt.config_hash)
        return final

    def prune(self, config_hash: str) -> list[Path]:
        """Delete this config's checkpoints beyond the newest `keep`; return the deleted paths."""
        removed = []
        for _, _, path in self.files(config_hash)[self.keep:]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        if removed:
            fsync_dir(self.directory)
        return removed

    def remove_temporary(self) -> list[Path]:
        """Delete temporary files left by a writer that was killed; call only while no writer runs."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.directory.glob(".ckpt-*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
        return removed

    def valid(self, config_hash: str | None = None, *, exclude: str | None = None) -> Iterator[Checkpoint]:
        """Verified checkpoints (of `config_hash` if given, not of `exclude`), newest first; damaged files
        are logged, counted and skipped."""
        for round_, file_hash, path in self.files(config_hash):
            if file_hash == exclude:
                continue
            try:
                ckpt = read(path)
            except CorruptCheckpoint as e:
                self.corrupt_skipped += 1
                logger.warning("skipping a damaged checkpoint: %s", e,
                               extra={"event": {"event": "checkpoint_corrupt", "path": str(path),
                                                "reason": str(e)}})
                continue
            if ckpt.round != round_ or ckpt.config_hash != file_hash:
                self.corrupt_skipped += 1
                logger.warning("skipping %s: its header says round %d config %s", path, ckpt.round,
                               ckpt.config_hash, extra={"event": {"event": "checkpoint_corrupt", "path": str(path),
                                                                  "reason": "name and header differ"}})
                continue
            yield ckpt

    def load_latest(self, config_hash: str, *, run_id: str = "", task: str = "") -> Checkpoint | None:
        """The newest valid checkpoint of `config_hash`, or None when there is none.

        :raises CheckpointMismatch: there is none of this config but there are valid checkpoints of
            another one: the state dir belongs to another run (resuming it would mix two runs).
        """
        for ckpt in self.valid(config_hash):
            return ckpt
        for other in self.valid(exclude=config_hash):
            raise CheckpointMismatch(
                f"the state dir {self.directory.parent} holds checkpoints of another run config (round "
                f"{other.round} of run {other.run_id!r}, task {other.task!r}, config hash {other.config_hash}); "
                f"this node runs {run_id!r}, task {task!r}, config hash {config_hash}. Start with the same "
                "run settings to resume it, use another --state-dir, or pass --no-resume to start this run "
                "from round 0 next to the old checkpoints")
        return None

    def set_aside(self, config_hash: str) -> Path | None:
        """Move this config's checkpoints into ``replaced-<unix time>/`` (used by ``--no-resume``, so
        that a later restart does not resume the old run); return that directory, or None if none."""
        files = self.files(config_hash)
        if not files:
            return None
        target = self.directory / f"replaced-{int(time.time())}"
        target.mkdir(mode=0o700, exist_ok=True)
        for _, _, path in files:
            os.replace(path, target / path.name)
        fsync_dir(self.directory)
        return target


__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "MAGIC",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatch",
    "CheckpointStore",
    "CorruptCheckpoint",
    "decode",
    "encode",
    "read",
]
