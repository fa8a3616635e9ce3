"""The virtual-clock event loop: virtual sleeps, timeouts, determinism, deadlock detection."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from p2pnode.transport.clock import VirtualClockLoop, run_virtual


def test_hour_long_sleep_is_instant_and_advances_virtual_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop)
        t0 = loop.time()
        await asyncio.sleep(3600)
        return t0, loop.time()

    wall = time.perf_counter()
    t0, t1 = run_virtual(main())
    assert time.perf_counter() - wall < 1.0
    assert t0 == 0.0
    assert t1 == 3600.0


def test_start_time() -> None:
    async def main() -> float:
        await asyncio.sleep(2.5)
        return asyncio.get_running_loop().time()

    assert run_virtual(main(), start_time=100.0) == 102.5


def test_start_time_near_the_unix_epoch_still_runs_due_timers() -> None:
    # At 1.7e9 s one float ulp is ~2.4e-7 s, far above the wall clock's 1 ns resolution.
    async def main() -> float:
        for _ in range(5):
            await asyncio.sleep(0.001)
        return asyncio.get_running_loop().time()

    assert run_virtual(main(), start_time=1.7e9) == pytest.approx(1.7e9 + 0.005, abs=1e-6)


def test_cpu_work_takes_no_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sum(i * i for i in range(200_000))
        return loop.time() - t0

    assert run_virtual(main()) == 0.0


def test_wait_for_times_out_in_virtual_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(100), timeout=7.0)
        t_timeout = loop.time()
        # A result that comes before the timeout is returned, at its own time.
        assert await asyncio.wait_for(_after(2.0, "ok"), timeout=5.0) == "ok"
        return t_timeout, loop.time()

    assert run_virtual(main()) == (7.0, 9.0)


def test_asyncio_timeout_context_uses_virtual_time() -> None:
    async def main() -> float:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.Event().wait()
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == 30.0


async def _after(delay: float, value: str) -> str:
    await asyncio.sleep(delay)
    return value


def _trace() -> list[tuple[float, str]]:
    async def main() -> list[tuple[float, str]]:
        loop = asyncio.get_running_loop()
        events: list[tuple[float, str]] = []

        async def worker(name: str, delays: list[float]) -> None:
            for d in delays:
                await asyncio.sleep(d)
                events.append((loop.time(), name))

        # Ties (several workers due at the same virtual instant) included on purpose.
        await asyncio.gather(*(worker(f"w{i}", [0.5 * ((i * 7 + j) % 3) + 0.25 for j in range(6)])
                               for i in range(8)))
        return events

    return run_virtual(main())


def test_timer_order_is_deterministic_and_chronological() -> None:
    a, b = _trace(), _trace()
    assert a == b
    assert [t for t, _ in a] == sorted(t for t, _ in a)
    assert len(a) == 48


def test_deadlock_raises_a_clear_error() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()  # nobody will ever resolve it

    with pytest.raises(RuntimeError, match="simulation deadlock"):
        run_virtual(main())


def test_deadlock_after_time_has_passed_names_the_time() -> None:
    async def main() -> None:
        await asyncio.sleep(12.0)
        await asyncio.Event().wait()

    with pytest.raises(RuntimeError, match=r"simulation deadlock: at virtual time 12\.0"):
        run_virtual(main())


def test_call_soon_threadsafe_from_the_loop_thread() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        loop.call_soon_threadsafe(fut.set_result, 42)
        return await fut

    assert run_virtual(main()) == 42


def test_call_soon_threadsafe_from_another_thread_wakes_the_loop() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        thread = threading.Thread(target=lambda: loop.call_soon_threadsafe(fut.set_result, 7))
        thread.start()
        # The loop does not wait for threads (it would call that a deadlock), so keep a timer pending
        # while the other thread posts its callback through the self-pipe.
        while not fut.done():
            assert loop.time() < 1e7, "the callback from the other thread never arrived"
            await asyncio.sleep(1.0)
        thread.join()
        return await fut

    assert run_virtual(main()) == 7


def test_run_in_executor_runs_inline_in_zero_virtual_time() -> None:
    async def main() -> tuple[int, float, str]:
        loop = asyncio.get_running_loop()
        caller = threading.get_ident()
        result = await asyncio.to_thread(lambda: 6 * 7)
        ident = await loop.run_in_executor(None, threading.get_ident)
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_executor(None, lambda: 1 / 0)
        return result, loop.time(), "same" if ident == caller else "other"

    assert run_virtual(main()) == (42, 0.0, "same")


def test_leftover_tasks_are_cancelled_and_loop_closed() -> None:
    cancelled: list[bool] = []
    loops: list[asyncio.AbstractEventLoop] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(1e9)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> str:
        loops.append(asyncio.get_running_loop())
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(1)
        return "done"

    assert run_virtual(main()) == "done"
    assert cancelled == [True]
    assert loops[0].is_closed()


def test_exception_propagates() -> None:
    async def main() -> None:
        await asyncio.sleep(1)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_virtual(main())


def test_refuses_to_nest_in_a_running_loop() -> None:
    async def outer() -> None:
        inner = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="running event loop"):
            run_virtual(inner)

    asyncio.run(outer())
