"""Checkpoint files: round trip, atomic writes, retention, and fallback past damaged files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from p2pnode.config import NodeConfig
from p2pnode.daemon.build import build_trainer
from p2pnode.daemon.checkpoint import (
    MAGIC,
    CheckpointMismatch,
    CheckpointStore,
    CorruptCheckpoint,
    read,
)
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.daemon.trainer_state import capture, restore
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.training.trainer import Trainer
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import MemoryNetwork
from simutil import make_config, memory_node


def _trainer(seed: int = 3, **overrides: object) -> Trainer:
    return build_trainer(make_config(0, 1, seed=seed, **overrides))


def _take(trainer: Trainer, round_: int, config: NodeConfig | None = None):  # type: ignore[no-untyped-def]
    config = config or make_config(0, 1)
    return capture(trainer, round_=round_, config_hash=config.config_hash, run_id=config.run_id,
                   task=config.task, peer_id="peer-x")


def _same_model(a: Trainer, b: Trainer) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_restores_model_momentum_and_steps(tmp_path: Path) -> None:
    a = _trainer()
    a.train(7)
    store = CheckpointStore.in_state_dir(tmp_path)
    path = store.write(_take(a, 4))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes()[:8] == MAGIC
    back = read(path)
    assert (back.round, back.peer_id, back.steps_done) == (4, "peer-x", 7)
    assert back.optimizer and all("momentum_buffer" in s for s in back.optimizer.values())

    b = _trainer(seed=99)  # another initial model: everything must come from the file
    assert not _same_model(a, b)
    restore(b, back)
    assert _same_model(a, b) and b.steps_done == 7
    # Same model, same momentum: the next steps are identical.
    for name, s in a.optimizer.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"], b.optimizer.state_dict()["state"][name]["momentum_buffer"])


def test_keeps_the_newest_k_and_no_temporary_files(tmp_path: Path) -> None:
    t = _trainer()
    store = CheckpointStore.in_state_dir(tmp_path, keep=3)
    for r in range(1, 7):
        store.write(_take(t, r))
    assert [r for r, _, _ in store.files()] == [6, 5, 4]
    assert sorted(p.name for p in store.directory.iterdir() if not p.name.startswith("ckpt-")) == []


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "zero_tail":  # what a crash can leave on file systems without ordered writes
        data[-4096:] = bytes(4096)
        path.write_bytes(bytes(data))
    elif how == "magic":
        data[:8] = b"NOTACKPT"
        path.write_bytes(bytes(data))
    elif how == "trailer":
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped", "zero_tail", "magic", "trailer"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, how: str) -> None:
    t = _trainer()
    config = make_config(0, 1)
    store = CheckpointStore.in_state_dir(tmp_path)
    for r in (1, 2, 3):
        t.train(1)
        store.write(_take(t, r, config))
    newest = store.files()[0][2]
    _corrupt(newest, how)
    with pytest.raises(CorruptCheckpoint):
        read(newest)
    ckpt = store.load_latest(config.config_hash)
    assert ckpt is not None and ckpt.round == 2
    assert store.corrupt_skipped == 1


def test_all_damaged_means_start_fresh(tmp_path: Path) -> None:
    t = _trainer()
    config = make_config(0, 1)
    store = CheckpointStore.in_state_dir(tmp_path)
    for r in (1, 2):
        store.write(_take(t, r, config))
    for _, _, p in store.files():
        _corrupt(p, "truncated")
    assert store.load_latest(config.config_hash) is None
    assert store.corrupt_skipped == 2


def test_renamed_file_is_not_trusted(tmp_path: Path) -> None:
    """The file name says round 9 but the verified header says round 1: skipped, not resumed as round 9."""
    t = _trainer()
    config = make_config(0, 1)
    store = CheckpointStore.in_state_dir(tmp_path)
    path = store.write(_take(t, 1, config))
    os.rename(path, store.directory / store.file_name(config.config_hash, 9))
    assert store.load_latest(config.config_hash) is None


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    t = _trainer()
    old = make_config(0, 1, run_id="old-run")
    new = make_config(0, 1, run_id="new-run")
    store = CheckpointStore.in_state_dir(tmp_path)
    store.write(_take(t, 5, old))
    with pytest.raises(CheckpointMismatch, match=r"another run config.*'old-run'.*--no-resume"):
        store.load_latest(new.config_hash, run_id=new.run_id, task=new.task)
    # --no-resume on the new run leaves the old run's files alone, and the new run resumes its own later.
    store.write(_take(t, 1, new))
    ckpt = store.load_latest(new.config_hash)
    assert ckpt is not None and ckpt.round == 1
    assert [r for r, h, _ in store.files(old.config_hash)] == [5]


def test_model_of_another_shape_is_refused_with_nothing_loaded(tmp_path: Path) -> None:
    small = _trainer()
    ckpt = _take(small, 2)
    ckpt.model["1.weight"] = torch.zeros(3, 3)
    other = _trainer(seed=8)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match="shape"):
        restore(other, ckpt)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_temporary_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    t = _trainer()
    config = make_config(0, 1)
    store = CheckpointStore.in_state_dir(tmp_path)
    store.write(_take(t, 1, config))
    leftover = store.directory / f".{store.file_name(config.config_hash, 2)}.999.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert [r for r, _, _ in store.files()] == [1]
    assert store.remove_temporary() == [leftover]


def test_node_resumes_round_and_model_from_its_state_dir(tmp_path: Path) -> None:
    """A memory-network node with checkpoints runs 3 rounds and stops; a new node on the same state dir
    resumes at round 3 with the same model and momentum; --no-resume starts over and moves the old files
    aside."""

    def node(resume: bool) -> Node:
        settings = DaemonSettings.in_memory(checkpoint_every=1, keep_checkpoints=2, resume=resume)
        return memory_node(MemoryNetwork(seed=0), MemoryRegistry(), 0, 1, settings,
                           CheckpointStore.in_state_dir(tmp_path, keep=2), eval_every=0)

    async def first() -> dict[str, torch.Tensor]:
        n = node(True)
        await n.start()
        await n.run(rounds=3)
        await n.shutdown()
        return n.trainer.state()

    async def again(resume: bool) -> tuple[int, dict[str, torch.Tensor], str]:
        n = node(resume)
        await n.start()
        out = (n.round, n.trainer.state(), n.resumed_from)
        n.stop()
        await n.shutdown()
        return out

    state = run_virtual(first())
    assert [r for r, _, _ in CheckpointStore.in_state_dir(tmp_path).files()] == [3, 2]
    round_, resumed, source = run_virtual(again(True))
    assert (round_, source) == (3, "checkpoint")
    assert all(torch.equal(state[k], resumed[k]) for k in state)
    round_, _, source = run_virtual(again(False))
    assert (round_, source) == (0, "fresh")
    assert CheckpointStore.in_state_dir(tmp_path).files() == []
    assert any(p.name.startswith("replaced-") for p in (tmp_path / "checkpoints").iterdir())
