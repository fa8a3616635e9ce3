"""The secure aggregation protocol end to end over the in-memory network: the sum under dropouts at every
stage, loud aborts below the threshold with nothing revealed, uniform masked inputs, SecAgg+ graphs,
identity keys, timeouts and the integration paths."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from p2pnode.errors import ConfigError
from p2pnode.proto import secagg_pb2
from p2pnode.secagg import (
    Contribution,
    SecAggAborted,
    SecAggHost,
    SecAggResult,
    SecAggSettings,
    SecAggUser,
    Session,
    SessionClaim,
    Status,
    run_instance,
    run_local,
)
from p2pnode.secagg.errors import SecAggError
from p2pnode.secagg.local import LocalOutcome
from p2pnode.secagg.quantize import FixedPoint
from p2pnode.secagg.randomness import SeededRandomness
from p2pnode.transport.clock import run_virtual
from p2pnode.transport.memory import MemoryNetwork

N = 10
T = 7
D = 16
STEP = FixedPoint(dim=1).step  # 2 * 8 / 2^22


def inputs(n: int = N, d: int = D, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) * 2 for _ in range(n)]


def plain_sum(xs: list[torch.Tensor], keep: list[int]) -> torch.Tensor:
    return torch.stack([xs[i].double() for i in keep]).sum(0)


def instance(xs: list[torch.Tensor], settings: SecAggSettings | None = None, **kw: object) -> LocalOutcome:
    s = settings if settings is not None else SecAggSettings(threshold=T)
    return run_virtual(run_instance(xs, s, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("stage", ["advertise", "share", "masked", "unmask"])
@pytest.mark.parametrize("dropped", range(N - T + 1))
def test_sum_equals_plain_sum_for_every_stage_and_dropout_count(stage: str, dropped: int) -> None:
    xs = inputs(seed=dropped)
    gone = random.Random(f"{stage}{dropped}").sample(range(N), dropped)
    got = run_local(xs, threshold=T, drop={stage: gone}, seed=dropped)
    # Peers dropped at unmask have sent their masked input: their inputs are in the sum.
    keep = list(range(N)) if stage == "unmask" else [i for i in range(N) if i not in gone]
    assert got.shape == xs[0].shape and got.dtype == torch.float64
    assert float((got - plain_sum(xs, keep)).abs().max()) <= len(keep) * STEP


def test_dropouts_spread_over_stages_and_survivor_accounting() -> None:
    xs = inputs()
    # t = 6 of 10 tolerates 4 dropouts in all, here one per stage.
    out = instance(xs, SecAggSettings(threshold=6), drop={"advertise": [0], "share": [3], "masked": [5],
                                                          "unmask": [8]})
    assert out.result is not None
    keep = [i for i in range(N) if i not in (0, 3, 5)]
    assert out.result.survivors == tuple(f"user-{i}" for i in keep)
    assert out.result.dropped == {"advertise": ("user-0",), "share": ("user-3",), "masked": ("user-5",),
                                  "unmask": ("user-8",)}
    assert out.result.fraction == pytest.approx(0.7)
    assert float((out.result.weighted_sum - plain_sum(xs, keep)).abs().max()) <= len(keep) * STEP
    assert float((out.result.mean() - plain_sum(xs, keep) / len(keep)).abs().max()) <= STEP
    status = {r.index - 1: r.status for r in out.reports}
    assert status[0] is Status.RUNNING and status[8] is Status.RUNNING  # told to go silent
    assert all(status[i] is Status.DONE for i in keep if i != 8)


@pytest.mark.parametrize("stage", ["advertise", "share", "masked", "unmask"])
def test_below_threshold_aborts_loudly_and_reveals_nothing(stage: str) -> None:
    xs = inputs()
    gone = list(range(N - T + 1))  # one more than can be tolerated
    with pytest.raises(SecAggAborted, match=f"aborted at stage '{stage}'"):
        run_local(xs, threshold=T, drop={stage: gone})
    out = instance(xs, drop={stage: gone})
    assert out.result is None and out.error is not None and out.error.stage == stage
    st = out.aggregator.state
    # Fewer than t users revealed anything: no secret of any user can be reconstructed.
    counts: dict[tuple[str, int], int] = {}
    for b_shares, s_shares in st.revealed.values():
        assert not set(b_shares) & set(s_shares)  # never both secrets of one user from one holder
        for o in b_shares:
            counts[("b", o)] = counts.get(("b", o), 0) + 1
        for o in s_shares:
            counts[("s", o)] = counts.get(("s", o), 0) + 1
    assert all(c < T for c in counts.values())
    if stage != "unmask":
        assert not st.revealed  # nobody was asked to unmask
    for r in out.reports:
        if r.index - 1 not in gone:
            # Before unmask the waiting users learn of the abort; at unmask they had done their part.
            assert r.status is (Status.DONE if stage == "unmask" else Status.ABORTED)


def test_users_refuse_to_unmask_below_threshold_even_if_asked() -> None:
    # A survivor list shorter than t makes an honest user stop before revealing anything.
    user = SecAggUser(Session("r", 0, "agg", ("a", "b", "c"), dim=4), SecAggSettings(threshold=2),
                      MemoryNetwork().transport("a"))
    st, _ = user._start()
    st.partners = (2, 3)
    with pytest.raises(SecAggError, match="threshold"):
        user._on_survivors(st, secagg_pb2.SecAggMaskedReply(survivors=[1]))
    with pytest.raises(SecAggError, match="omits this user"):
        user._on_survivors(st, secagg_pb2.SecAggMaskedReply(survivors=[2, 3]))


def test_masked_input_seen_by_the_aggregator_is_uniform() -> None:
    n, d = 3, 8192
    xs = [torch.zeros(d) for _ in range(n)]  # the most regular input there is
    seen: dict[int, np.ndarray] = {}
    out = instance(xs, SecAggSettings(threshold=2), on_masked_input=lambda i, w: seen.setdefault(i, w.copy()))
    assert out.result is not None and float(out.result.weighted_sum.abs().max()) <= n * STEP
    words = seen[1]
    assert words.dtype == np.uint32 and words.shape == (d + 1,)
    counts = np.bincount(words.view(np.uint8), minlength=256)
    assert chisquare(counts).pvalue > 1e-3
    top = np.bincount((words >> 24).astype(np.uint8), minlength=256)  # the high byte of each word too
    assert chisquare(top).pvalue > 1e-3
    # Without masks the same input is one constant word: the test does tell the difference.
    plain = FixedPoint(dim=d).encode(torch.zeros(d))
    assert chisquare(np.bincount(plain.view(np.uint8), minlength=256)).pvalue < 1e-100


def test_seeded_runs_send_the_same_bytes_and_other_seeds_do_not() -> None:
    xs = [x.clamp(-7.9, 7.9) for x in inputs(n=4, d=5000)]  # nothing clipped by the encoding

    def masked(seed: int) -> tuple[dict[int, bytes], torch.Tensor]:
        seen: dict[int, bytes] = {}
        out = instance(xs, SecAggSettings(threshold=3), seed=seed,
                       on_masked_input=lambda i, w: seen.setdefault(i, w.tobytes()))
        assert out.result is not None
        for r in out.reports:  # the CPU after the input is a part of the total, apart from the masks'
            assert 0 < r.input_s and 0 < r.mask_s and r.input_s + r.mask_s <= r.compute_s + 1e-9
        return seen, out.result.weighted_sum

    a, sum_a = masked(1)
    b, sum_b = masked(1)
    c, _ = masked(2)
    assert len(a) == 4 and a == b and torch.equal(sum_a, sum_b)
    assert all(a[i] != c[i] for i in a)
    assert float((sum_a - plain_sum(xs, list(range(4)))).abs().max()) <= 4 * STEP


def test_secagg_plus_graph_with_dropouts() -> None:
    n = 40
    xs = inputs(n=n, d=8)
    settings = SecAggSettings(neighbours=8)  # k = 8: 9 holders, threshold 7
    out = instance(xs, settings, drop={"share": [1, 2], "masked": [10, 20], "unmask": [30]})
    assert out.result is not None
    assert out.result.neighbours == 8 and out.result.threshold == 7
    keep = [i for i in range(n) if i not in (1, 2, 10, 20)]
    assert float((out.result.weighted_sum - plain_sum(xs, keep)).abs().max()) <= n * STEP
    assert all(r.partners <= 8 for r in out.reports)


def test_secagg_plus_aborts_when_one_neighbourhood_loses_too_many() -> None:
    n = 20
    settings = SecAggSettings(neighbours=4)  # 5 holders, threshold 4
    out = instance(inputs(n=n, d=4), settings)
    assert out.result is not None
    nb = out.aggregator.plan.graph[0]
    # Two of user 1's four neighbours drop at unmask: its self mask keeps only 3 < 4 live holders.
    out = instance(inputs(n=n, d=4), settings, drop={"share": [nb[0] - 1, nb[1] - 1]})
    assert out.error is not None and "live share holders" in out.error.reason


def test_identity_keys_sign_advertisements() -> None:
    xs = inputs(n=5, d=8)
    out = instance(xs, SecAggSettings(threshold=4), identities=True)
    assert out.result is not None
    assert float((out.result.weighted_sum - plain_sum(xs, list(range(5)))).abs().max()) <= 5 * STEP


@pytest.mark.parametrize(("prg", "bits"), [("chacha20", 32), ("aes-256-ctr", 64)])
def test_other_mask_generator_and_modulus(prg: str, bits: int) -> None:
    xs = inputs(n=4, d=8)
    out = instance(xs, SecAggSettings(threshold=3, prg=prg, modulus_bits=bits), drop={"masked": [2]})
    assert out.result is not None and out.result.word_bits == bits
    assert float((out.result.weighted_sum - plain_sum(xs, [0, 1, 3])).abs().max()) <= 3 * STEP


def test_stage_timeouts_run_on_the_virtual_clock() -> None:
    xs = inputs(n=4, d=8)
    settings = SecAggSettings(threshold=3)
    fast = instance(xs, settings)
    assert fast.elapsed_s < 1.0  # every stage closed as soon as all users were in
    slow = instance(xs, settings, drop={"advertise": [0]})
    assert settings.timeouts.advertise_s <= slow.elapsed_s < settings.timeouts.advertise_s + 1.0


def test_masked_quorum_closes_the_masked_stage_early() -> None:
    async def main() -> tuple[float, list[str]]:
        net = MemoryNetwork()
        ids = [f"u{i}" for i in range(5)]
        session = Session("run", 3, "agg", tuple(ids), dim=4)
        settings = SecAggSettings(threshold=3, masked_quorum=4)
        host = SecAggHost(net.transport("agg"))
        loop = asyncio.get_running_loop()

        async def slow_training() -> Contribution:
            await asyncio.sleep(500.0)  # a straggler still training long after the others
            return Contribution(torch.ones(4))

        agg = asyncio.ensure_future(host.aggregate(session, settings))
        users = [SecAggUser(session, settings, net.transport(p), randomness=SeededRandomness(p.encode()))
                 for p in ids]
        tasks = [asyncio.ensure_future(u.run(Contribution(torch.ones(4)) if i else slow_training()))
                 for i, u in enumerate(users)]
        result = await agg
        elapsed = loop.time()
        reports = await asyncio.gather(*tasks)
        assert reports[0].status is Status.ABORTED  # too late: its input does not count
        return elapsed, list(result.survivors)

    elapsed, survivors = run_virtual(main())
    assert elapsed < 5.0 and survivors == ["u1", "u2", "u3", "u4"]


def test_users_wait_for_an_aggregator_that_opens_late_and_one_that_is_also_a_user() -> None:
    async def main() -> list[float]:
        net = MemoryNetwork()
        ids = ["a", "b", "c", "d"]
        session = Session("run", 1, "c", tuple(ids), dim=3)  # "c" aggregates and trains
        settings = SecAggSettings(threshold=3)
        host = SecAggHost(net.transport("c"))
        transports = {p: (host.transport if p == "c" else net.transport(p)) for p in ids}
        users = [SecAggUser(session, settings, transports[p], local=host.dispatch,
                            randomness=SeededRandomness(p.encode())) for p in ids]
        tasks = [asyncio.ensure_future(u.run(Contribution(torch.full((3,), float(i)))))
                 for i, u in enumerate(users)]
        await asyncio.sleep(3.0)  # the aggregator decides late; users retry meanwhile
        result = await host.aggregate(session, settings)
        reports = await asyncio.gather(*tasks)
        assert all(r.status is Status.DONE for r in reports)
        return result.weighted_sum.tolist()

    total = run_virtual(main())
    assert total == pytest.approx([6.0, 6.0, 6.0], abs=4 * STEP)


def test_aggregator_opens_the_instance_from_its_users_claim() -> None:
    async def main() -> tuple[list[float], list[SessionClaim]]:
        net = MemoryNetwork()
        ids = ("a", "b", "c")
        settings = SecAggSettings(threshold=2)
        host = SecAggHost(net.transport("agg"))
        claims: list[SessionClaim] = []
        opened: list[asyncio.Task[SecAggResult]] = []

        def on_unopened(claim: SessionClaim) -> None:
            claims.append(claim)
            # A MoDeST aggregator checks the claim against what it knows (its sample, the model size).
            if not opened and claim.sender in claim.users and claim.dim == 2:
                session = Session(claim.run_id, claim.round, "agg", claim.users, dim=claim.dim)
                opened.append(asyncio.ensure_future(host.aggregate(session, settings)))

        host.on_unopened = on_unopened
        session = Session("run", 5, "agg", ids, dim=2)
        users = [SecAggUser(session, settings, net.transport(p), randomness=SeededRandomness(p.encode()))
                 for p in ids]
        reports = await asyncio.gather(*(u.run(Contribution(torch.ones(2))) for u in users))
        assert all(r.status is Status.DONE for r in reports)
        return (await opened[0]).weighted_sum.tolist(), claims

    total, claims = run_virtual(main())
    assert total == pytest.approx([3.0, 3.0], abs=3 * STEP)
    assert claims[0].users == ("a", "b", "c") and claims[0].round == 5


def test_weighted_mean() -> None:
    xs = inputs(n=4, d=8)
    w = [1.0, 2.0, 3.0, 4.0]
    out = instance(xs, SecAggSettings(threshold=3, max_weight=4.0), weights=w)
    assert out.result is not None
    ref = sum(wi * x.double() for wi, x in zip(w, xs, strict=True)) / sum(w)
    assert out.result.weight_sum == pytest.approx(10.0)
    assert float((out.result.mean() - ref).abs().max()) <= 4 * STEP * 4.0 / 10.0 + 1e-9


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="strict majority"):
        run_local(inputs(), threshold=5)
    with pytest.raises(ConfigError, match=r"\[6, 10\]"):
        run_local(inputs(), threshold=11)
    with pytest.raises(ConfigError, match="at least 2 users"):
        Session("r", 0, "a", ("x",), dim=3)
    with pytest.raises(ConfigError, match="even"):
        run_local(inputs(n=40, d=2), threshold=5, settings=SecAggSettings(neighbours=7))
    with pytest.raises(ValueError, match="stage"):
        run_local(inputs(), threshold=7, drop={"later": [1]})
    settings = SecAggSettings(threshold=7)
    assert dataclasses.replace(settings, levels=2**22).levels == 2**22
