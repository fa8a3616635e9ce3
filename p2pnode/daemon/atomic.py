"""Atomic file writes for the state dir: a file under its final name is complete or absent, never half-written.

`atomic_file` writes to a temporary file in the same directory (``.<name>.<random>.tmp``, created
with mode 0600 so that a secret is never readable by others, not even for a moment), flushes and
fsyncs it, sets its final mode, then renames it over the final name (or, with ``replace=False``,
links it there only if the name is free) and fsyncs the directory, so that the rename survives a
power cut. An exception inside the ``with`` block, or a failed rename, removes the temporary file
and leaves whatever was under the final name untouched. Used by checkpoints, identity keys,
``control.json`` and the pid file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: Mode of the temporary file, and default mode of the final one: readable by the owner only.
PRIVATE_MODE = 0o600


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory entry change (a rename, a link, an unlink) to disk; not all file systems allow it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicFile:
    """What `atomic_file` yields: the open temporary file, and whether the final name was written."""

    def __init__(self, file: BinaryIO, tmp: Path) -> None:
        self.file = file
        self.tmp = tmp
        #: True once the content is under the final name (False with ``replace=False`` if the name was taken).
        self.written = False

    def write(self, data: bytes | memoryview) -> int:
        """Write `data` to the temporary file; return the number of bytes written."""
        return self.file.write(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, mode: int = PRIVATE_MODE, replace: bool = True
                ) -> Iterator[AtomicFile]:
    """Write the file at `path` atomically: what the ``with`` block writes appears there whole, or not at all.

    Args:
        path: the final name; its directory must exist.
        mode: the final file's permission bits (default 0600; identity keys use 0400).
        replace: True (default) renames over an existing file; False keeps an existing file and leaves
            ``AtomicFile.written`` False (create-once: a file created meanwhile by another process is
            never overwritten).

    Yields:
        An `AtomicFile`; write the content with its ``write`` method.

    Raises:
        OSError: creating, writing, syncing or renaming failed; the temporary file is gone then, and the
            file under `path` is as it was. An exception raised inside the block leaves it so too.
    """
    final = Path(path)
    directory = final.parent
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp")  # mode 0600
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            out = AtomicFile(f, tmp)
            yield out
            f.flush()
            os.fsync(f.fileno())
        if mode != PRIVATE_MODE:
            os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, final)
            out.written = True
        else:
            try:
                os.link(tmp, final)  # fails if the name exists: never overwrites
                out.written = True
            except FileExistsError:
                pass
    finally:
        # After a rename the temporary name is gone (suppressed); after a link or a failure it is removed.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(directory)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE_MODE,
                 replace: bool = True) -> bool:
    """Write `data` to `path` by `atomic_file`; return whether it is now under `path` (False: ``replace``
    was False and the name was taken)."""
    with atomic_file(path, mode=mode, replace=replace) as f:
        f.write(data)
    return f.written


__all__ = ["PRIVATE_MODE", "AtomicFile", "atomic_file", "fsync_dir", "write_atomic"]
