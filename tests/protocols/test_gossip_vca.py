"""Gossip with variance-corrected averaging: what peers exchange, and the variance the merge restores."""

from __future__ import annotations

import asyncio

import torch

from p2pnode.aggregation import aggregate_states
from p2pnode.daemon.build import build_trainer
from p2pnode.transport.clock import run_virtual
from simutil import make_config, running_group

OVERRIDES: dict[str, object] = {"rule": "vca", "model_seed_mode": "independent", "local_steps": 5, "lr": 0.2}


def _var(t: torch.Tensor) -> float:
    return float(torch.var(t.double(), correction=0))


def test_peers_merge_the_freshly_trained_models_and_take_their_variance() -> None:
    """Two nodes, one round: each merges its trained model with the other's trained model (not its start)."""
    # The same nodes trained alone for one round: what each should send.
    alone = [build_trainer(make_config(i, 2, **OVERRIDES)) for i in range(2)]
    initial = [t.state() for t in alone]
    for t in alone:
        t.train(5)
    trained = [t.state() for t in alone]

    async def main() -> list[dict[str, torch.Tensor]]:
        async with running_group(2, **OVERRIDES) as group:
            reports = await asyncio.gather(*(n.run_round() for n in group.nodes))
            assert all(r.combined >= 2 for r in reports)
            states = [n.trainer.state() for n in group.nodes]
        return states

    merged = run_virtual(main())
    for i in range(2):
        other = trained[1 - i]
        # Received copies are all the other node's trained model, so their mean is that model.
        want = aggregate_states("vca", [trained[i], other], self_index=0)
        for name, value in want.items():
            torch.testing.assert_close(merged[i][name], value, rtol=1e-5, atol=1e-6)
        for name in ("1.weight", "3.weight"):
            # The target is the variance the peer's model has after training, not its initial one
            # (serving the pre-training model would pin every layer at its initial variance).
            assert abs(_var(merged[i][name]) - _var(other[name])) <= 1e-6 * _var(other[name])
            assert abs(_var(other[name]) - _var(initial[1 - i][name])) > 1e-3 * _var(other[name])
