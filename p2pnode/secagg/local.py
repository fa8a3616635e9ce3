"""The real protocol among many peers in one process, over the in-memory network on a virtual clock.

`run_local` is the public entry point for research and tests: ``len(inputs)`` users and one aggregator,
each with its own `MemoryTransport`, run exactly the code a daemon runs (`SecAggHost`, `SecAggUser`),
and the function returns what the aggregator obtains. `run_instance` is the same inside a running event
loop, with every knob and the full outcome.

Randomness is derived from `seed` (`SeededRandomness`), so runs are reproducible; that makes these
keys public, which is fine for a simulation and wrong for anything else.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnode.secagg.aggregator import MaskedObserver, SecAggAggregator
from p2pnode.secagg.errors import SecAggAborted
from p2pnode.secagg.protocol import SecAggHost
from p2pnode.secagg.randomness import SeededRandomness
from p2pnode.secagg.settings import SecAggSettings, Session
from p2pnode.secagg.stages import Stage
from p2pnode.secagg.state import Contribution, SecAggResult, UserReport
from p2pnode.secagg.user import SecAggUser
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import MemoryNetwork

AGGREGATOR = "aggregator"


def user_id(i: int, n: int) -> str:
    """Peer id of the user with 0-based input index `i` among `n` (sorted ids follow the input order)."""
    return f"user-{i:0{len(str(n - 1))}d}"


@dataclass
class LocalOutcome:
    """Everything one local instance produced.

    Attributes:
        result: the aggregator's result, or None when it aborted.
        error: the abort, or None.
        reports: each user's report, in input order.
        network: the in-memory network (traffic totals).
        elapsed_s: virtual seconds from the start to the aggregator's result or abort.
        aggregator: the aggregator, with its final state (what it saw and what it was sent).
    """

    result: SecAggResult | None
    error: SecAggAborted | None
    reports: list[UserReport]
    network: MemoryNetwork
    elapsed_s: float
    aggregator: SecAggAggregator


def _silent_from(drop: Mapping[str, Sequence[int]] | None, n: int) -> dict[int, Stage]:
    out: dict[int, Stage] = {}
    for name, indices in (drop or {}).items():
        stage = Stage.parse(name)
        for i in indices:
            if not 0 <= i < n:
                raise ValueError(f"drop[{name!r}] names peer {i}, but there are {n} peers (0..{n - 1})")
            out[i] = min(stage, out.get(i, stage))
    return out


async def run_instance(
    inputs: Sequence[torch.Tensor],
    settings: SecAggSettings,
    *,
    drop: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    extras: Sequence[torch.Tensor] | None = None,
    network: MemoryNetwork | None = None,
    identities: bool = False,
    on_masked_input: MaskedObserver | None = None,
    run_id: str = "local",
    round_: int = 0,
) -> LocalOutcome:
    """Run one instance among ``len(inputs)`` users and an aggregator in the running event loop.

    :param inputs: one float tensor per user, all of one shape.
    :param settings: the instance's settings.
    :param drop: stage label -> 0-based user indices that go silent from that stage on.
    :param seed: seed of all randomness (keys, seeds, Shamir coefficients, rounding).
    :param weights: per-user weights (default: all 1.0).
    :param extras: per-user extra coordinates (default: none).
    :param network: the in-memory network to use (default: a fresh `MemoryNetwork()`).
    :param identities: give every user an Ed25519 identity key and require signed keys (default False).
    :param on_masked_input: observer of the masked inputs the aggregator accepts.
    :param run_id: run id of the session (default "local").
    :param round_: round of the session (default 0).
    """
    n = len(inputs)
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 inputs, got {n}")
    shape = inputs[0].shape
    if any(x.shape != shape for x in inputs):
        raise ValueError("all inputs must have the same shape")
    silent = _silent_from(drop, n)
    net = network if network is not None else MemoryNetwork()
    ids = [user_id(i, n) for i in range(n)]
    n_extras = 0 if extras is None else int(extras[0].numel())
    session = Session(run_id, round_, AGGREGATOR, tuple(ids), dim=int(inputs[0].numel()), extras=n_extras)
    signing = {p: Ed25519PrivateKey.from_private_bytes(
        SeededRandomness(str(seed).encode(), b"identity/" + p.encode()).token_bytes(32)) for p in ids}
    identity_keys = {p: k.public_key().public_bytes_raw() for p, k in signing.items()} if identities else None
    host = SecAggHost(net.transport(AGGREGATOR))
    users = [
        SecAggUser(session, settings, net.transport(p), identity=signing[p] if identities else None,
                   identity_keys=identity_keys, randomness=SeededRandomness(str(seed).encode(), p.encode()),
                   stop_before=silent.get(i))
        for i, p in enumerate(ids)
    ]
    loop = asyncio.get_running_loop()
    start = loop.time()
    aggregator = host.open(session, settings, identity_keys=identity_keys, on_masked_input=on_masked_input)
    agg = asyncio.ensure_future(aggregator.run())
    tasks = [
        asyncio.ensure_future(u.run(Contribution(x, 1.0 if weights is None else weights[i],
                                                 None if extras is None else extras[i])))
        for i, (u, x) in enumerate(zip(users, inputs, strict=True))
    ]
    result: SecAggResult | None = None
    error: SecAggAborted | None = None
    try:
        result = await agg
    except SecAggAborted as e:
        error = e
    finally:
        host.close(session)
    elapsed = loop.time() - start
    reports = list(await asyncio.gather(*tasks))
    return LocalOutcome(result, error, reports, net, elapsed, aggregator)


def run_local(
    inputs: Sequence[torch.Tensor],
    threshold: int,
    drop: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    *,
    settings: SecAggSettings | None = None,
) -> torch.Tensor:
    """Run the real protocol among ``len(inputs)`` peers in memory; return the sum the aggregator obtains.

    :param inputs: one float tensor per peer, all of one shape; values are clipped to
        ``[-settings.clip, settings.clip]`` (default 8.0) and quantized with step 2 clip / levels.
    :param threshold: with the complete graph (the default up to 32 peers), the classic SecAgg ``t``:
        the sum is recovered whenever at least ``t`` peers remain at unmasking. It must be a strict
        majority of the ``k + 1`` share holders (`ConfigError` otherwise).
    :param drop: maps a stage name (``advertise``, ``share``, ``masked``, ``unmask``) to 0-based peer
        indices that go silent from that stage on. Peers dropped at ``unmask`` have sent their masked
        input, so their inputs are in the sum; peers dropped earlier are not.
    :param seed: seed of all the protocol's randomness (default 0); runs are reproducible.
    :param settings: other settings (default `SecAggSettings()`); `threshold` overrides its threshold.

    Returns the sum over the peers whose input counts, float64, of the inputs' shape. Raises
    `SecAggAborted` when too few peers remain (nothing about any single input is revealed then).
    """
    s = dataclasses.replace(settings if settings is not None else SecAggSettings(), threshold=threshold)
    outcome = run_virtual(run_instance(inputs, s, drop=drop, seed=seed))
    if outcome.error is not None:
        raise outcome.error
    assert outcome.result is not None
    return outcome.result.weighted_sum.reshape(inputs[0].shape)
