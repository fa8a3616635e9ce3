"""The node's own DiLoCo outer momentum (gossip, dpsgd): kept across a restart, put back by an undone merge."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from p2pnode.daemon.checkpoint import CheckpointMismatch, CheckpointStore, read
from p2pnode.daemon.node import Node
from p2pnode.daemon.settings import DaemonSettings
from p2pnode.daemon.trainer_state import capture, restore
from p2pnode.discovery.memory import MemoryRegistry
from p2pnode.protocols import LocalOuterState
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import MemoryNetwork
from simutil import memory_node, running_group

State = dict[str, torch.Tensor]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                                        and torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _outer(node: Node) -> State:
    assert isinstance(node.protocol, LocalOuterState)
    return node.protocol.outer_state()


@pytest.mark.parametrize("topology", ["gossip", "dpsgd"])
def test_a_restarted_node_keeps_its_outer_momentum_bit_for_bit(tmp_path: Path, topology: str) -> None:
    def node(resume: bool = True) -> Node:
        settings = DaemonSettings.in_memory(checkpoint_every=1, keep_checkpoints=2, resume=resume)
        return memory_node(MemoryNetwork(seed=0), MemoryRegistry(), 0, 1, settings,
                           CheckpointStore.in_state_dir(tmp_path, keep=2), eval_every=0, topology=topology,
                           outer_lr=0.7, outer_momentum=0.9)

    async def first() -> State:
        n = node()
        await n.start()
        await n.run(rounds=3)
        await n.wait_for_checkpoint()
        out = _outer(n)
        await n.shutdown()
        return out

    async def again(resume: bool) -> tuple[int, State]:
        n = node(resume)
        await n.start()
        out = (n.round, _outer(n))
        n.stop()
        await n.shutdown()
        return out

    saved = run_virtual(first())
    # Alone, each round steps the outer optimizer on the node's own pseudo-gradient: 3 steps of momentum.
    assert int(saved["steps"]) == 3
    momenta = [k for k in saved if k.startswith("momentum/")]
    assert momenta and all(float(saved[k].abs().max()) > 0 for k in momenta)
    ckpt = read(CheckpointStore.in_state_dir(tmp_path).files()[0][2])
    assert _same(ckpt.outer, saved)
    round_, resumed = run_virtual(again(True))
    assert round_ == 3 and _same(resumed, saved)
    round_, fresh = run_virtual(again(False))  # --no-resume: momentum starts afresh
    assert round_ == 0 and set(fresh) == {"steps"} and int(fresh["steps"]) == 0


def test_a_checkpoint_without_outer_state_reads_and_starts_the_momentum_afresh(tmp_path: Path) -> None:
    """Files written before outer state was saved hold no ``outer/`` entries: they read, and resume, as before."""
    settings = DaemonSettings.in_memory(checkpoint_every=1, resume=True)

    def node() -> Node:
        return memory_node(MemoryNetwork(seed=0), MemoryRegistry(), 0, 1, settings,
                           CheckpointStore.in_state_dir(tmp_path), eval_every=0, outer_lr=0.7)

    async def main() -> tuple[int, State]:
        n = node()
        await n.start()
        await n.run(rounds=1)
        # The file an earlier version wrote: the same checkpoint without its outer entries.
        cfg = n.config
        old = capture(n.trainer, round_=2, config_hash=cfg.config_hash, run_id=cfg.run_id, task=cfg.task)
        assert old.outer == {}
        CheckpointStore.in_state_dir(tmp_path).write(old)
        n.stop()
        await n.shutdown()
        m = node()
        await m.start()
        out = (m.round, _outer(m))
        m.stop()
        await m.shutdown()
        return out

    round_, outer = run_virtual(main())
    assert round_ == 2 and set(outer) == {"steps"} and int(outer["steps"]) == 0


def test_outer_state_that_does_not_fit_the_model_is_refused_with_nothing_loaded(tmp_path: Path) -> None:
    async def main() -> None:
        n = memory_node(MemoryNetwork(seed=0), MemoryRegistry(), 0, 1, DaemonSettings.in_memory(), None,
                        eval_every=0, outer_lr=0.7)
        await n.start()
        await n.run(rounds=1)
        cfg = n.config
        good = _outer(n)
        name = next(k for k in good if k.startswith("momentum/"))
        before = n.trainer.state()
        for bad, why in (({**good, name: torch.zeros(2, 2)}, "has shape"),
                         ({**good, "momentum/nope": torch.zeros(2)}, "for no floating model entry"),
                         ({**good, "steps": torch.tensor(-1)}, "non-negative"),
                         ({**good, name: torch.full_like(good[name], float("nan"))}, "NaN")):
            ckpt = capture(n.trainer, round_=5, config_hash=cfg.config_hash, run_id=cfg.run_id, task=cfg.task,
                           outer=bad)
            with pytest.raises(CheckpointMismatch, match=why):
                restore(n.trainer, ckpt)
            assert all(torch.equal(before[k], n.trainer.state()[k]) for k in before)
        n.stop()
        await n.shutdown()

    run_virtual(main())


@pytest.mark.parametrize("topology", ["gossip", "dpsgd"])
@pytest.mark.parametrize("min_merge", [3, 1])
def test_an_undone_merge_leaves_the_outer_momentum_as_before_the_round(topology: str, min_merge: int) -> None:
    """Two nodes merge 2 models a round: below a quorum of 3 the merge and its outer step are undone."""

    async def main() -> None:
        async with running_group(2, topology=topology, outer_lr=0.7, outer_momentum=0.9,
                                 settings=DaemonSettings.in_memory(min_merge=min_merge)) as group:
            # A momentum from earlier rounds (loaded through the protocol's own seam), so that an undo has
            # something other than a fresh optimizer to put back.
            for i, n in enumerate(group.nodes):
                assert isinstance(n.protocol, LocalOuterState)
                g = torch.Generator().manual_seed(i)
                n.protocol.load_outer_state({"steps": torch.tensor(5, dtype=torch.int64),
                                             **{f"momentum/{k}": torch.randn(v.shape, generator=g) * 0.01
                                                for k, v in n.trainer.state().items() if v.is_floating_point()}})
            before = [_outer(n) for n in group.nodes]
            reports = await asyncio.gather(*(n.run_round() for n in group.nodes))
            after = [_outer(n) for n in group.nodes]
            for r, b, a in zip(reports, before, after, strict=True):
                assert r.pre_merge is None and r.pre_outer is None  # the node keeps no copies in its reports
                if min_merge == 3:
                    assert r.extra.get("partial") == "quorum" and r.extra.get("merge_applied") is False
                    assert _same(a, b)  # the momentum before the round, bit for bit
                else:
                    assert r.extra.get("partial") is None and int(a["steps"]) == 6
                    assert not _same({k: v for k, v in a.items() if k != "steps"},
                                     {k: v for k, v in b.items() if k != "steps"})

    run_virtual(main())
