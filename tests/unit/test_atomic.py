"""Atomic writes of the state dir: a file under its final name is complete or absent, with its mode."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from p2pnode.daemon.atomic import atomic_file, write_atomic
from p2pnode.daemon.identity import IDENTITY_FILE, IDENTITY_MODE, load_or_create_identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_replaces_whole_with_mode_0600_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    assert write_atomic(target, b"old") is True
    assert write_atomic(target, b"new content") is True
    assert target.read_bytes() == b"new content"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_crash_in_the_middle_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.bin"
    write_atomic(target, b"A" * 1000)
    with pytest.raises(RuntimeError, match="crash"), atomic_file(target) as f:
        f.write(b"B" * 500)  # half of the new content is written...
        raise RuntimeError("crash")  # ...when the writer dies
    assert target.read_bytes() == b"A" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def test_crash_before_the_first_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"partial")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_create_once_keeps_an_existing_file_and_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "key"
    assert write_atomic(target, b"first", mode=0o400, replace=False) is True
    assert _mode(target) == 0o400
    assert write_atomic(target, b"second", mode=0o400, replace=False) is False
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_failed_rename_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()  # a directory holding a file: replace() over it fails
    (target / "x").write_text("x")
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert (target / "x").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_identity_key_is_0400_and_written_once(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    assert _mode(path) == IDENTITY_MODE == 0o400
    content = path.read_bytes()
    again = load_or_create_identity(tmp_path)
    assert again.peer_id == first.peer_id and not again.created
    assert path.read_bytes() == content
