"""A virtual-clock asyncio event loop for the simulator.

`VirtualClockLoop` is an ordinary `asyncio.SelectorEventLoop` whose `time()` returns *virtual* seconds.
Whenever the loop would block waiting for its next timer, it jumps virtual time straight to that timer
instead of sleeping, so ``await asyncio.sleep(3600)`` returns at once in wall time while
``loop.time()`` moves forward by exactly 3600. Everything that asyncio builds on ``loop.time()``
(`asyncio.sleep`, `asyncio.wait_for`, `asyncio.timeout`, ``call_later``) therefore runs in virtual time.

Rules of the virtual world:

- **CPU work takes zero virtual time.** Code that runs between two awaits does not move the clock,
  however long it takes in wall time. The simulator models compute time with explicit
  ``await asyncio.sleep(seconds)`` calls.
- **No threads.** Work handed to another thread finishes at a wall-clock moment that has no relation
  to virtual time, which would break determinism. `run_in_executor` (and therefore
  `asyncio.to_thread`) runs the function *inline*, on the loop's thread, in zero virtual time; the
  `executor` argument is ignored. Other threads calling ``call_soon_threadsafe`` still wake the loop
  (its self-pipe keeps working), but the loop does not wait for them: see the deadlock rule below.
- **Deadlock is an error.** When nothing is ready, no timer is scheduled and no file descriptor is
  readable, no task can ever make progress; a real loop would block forever. This loop raises
  ``RuntimeError("simulation deadlock: ...")`` naming the pending tasks instead.
- **Determinism.** Nothing reads the wall clock: two runs of the same program produce the same order
  of events and the same virtual timestamps.

Use `run_virtual` the way you would use `asyncio.run`; inside, ``asyncio.get_running_loop().time()``
is the virtual clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import math
import selectors
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar, TypeVarTuple

__all__ = ["VirtualClockLoop", "run_virtual", "wall_time"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Smallest tolerance (seconds) with which a timer counts as due; see `VirtualClockLoop._clock_resolution`.
_MIN_RESOLUTION_S = 1e-9


class _VirtualSelector(selectors.BaseSelector):
    """Wraps a real selector: polls real fds without blocking, then advances the virtual clock.

    The loop asks ``select(timeout)`` with `timeout` = time until its next timer (``None`` when it has
    no timer at all). Real fds (the loop's self-pipe, used by ``call_soon_threadsafe``) are polled with
    timeout 0 so that they keep working; if none is ready, the virtual clock jumps by `timeout`.
    """

    def __init__(self, loop: VirtualClockLoop, real: selectors.BaseSelector) -> None:
        self._loop = loop
        self._real = real

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready:
            # Real I/O first, without moving the clock: its callbacks may schedule earlier timers.
            return ready
        if timeout is None:
            raise RuntimeError(self._loop._deadlock_message())
        if timeout > 0:
            self._loop._advance(timeout)
        return []

    def close(self) -> None:
        self._real.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on a virtual clock that jumps to the next timer instead of sleeping.

    :param start_time: the virtual time of `time()` when the loop is created, in seconds (default 0.0).

    See the module docstring for the rules (CPU work takes zero virtual time, no threads, deadlock is
    an error, determinism).
    """

    def __init__(self, start_time: float = 0.0) -> None:
        if not math.isfinite(start_time):
            raise ValueError(f"start_time must be finite, got {start_time!r}")
        # Set before the base __init__, which reads the clock resolution.
        self._now = float(start_time)
        super().__init__(_VirtualSelector(self, selectors.DefaultSelector()))

    def time(self) -> float:
        """The current virtual time, in seconds."""
        return self._now

    def _advance(self, dt: float) -> None:
        self._now += dt

    # asyncio runs a timer when ``when < time() + _clock_resolution``. With a fixed 1 ns resolution, a
    # virtual time large enough that one float ulp exceeds 1 ns (about 8e6 s and beyond, e.g. a start
    # time near the Unix epoch) would make ``time() + resolution == time()``, and a timer due exactly
    # now would never run. Scaling the tolerance with the ulp keeps due timers due at any magnitude.
    @property
    def _clock_resolution(self) -> float:
        return max(_MIN_RESOLUTION_S, 4 * math.ulp(self._now))

    @_clock_resolution.setter
    def _clock_resolution(self, value: float) -> None:
        # The base class assigns the wall clock's resolution; the virtual clock derives its own.
        pass

    def _deadlock_message(self) -> str:
        tasks = [t for t in asyncio.all_tasks(self) if not t.done()]
        shown = "; ".join(repr(t) for t in tasks[:5])
        more = f" (and {len(tasks) - 5} more)" if len(tasks) > 5 else ""
        return (f"simulation deadlock: at virtual time {self._now:.6f} s nothing is ready, no timer is "
                f"scheduled and no I/O is pending, so no task can ever resume. {len(tasks)} pending "
                f"task(s): {shown}{more}")

    def run_in_executor(self, executor: concurrent.futures.Executor | None, func: Callable[[*Ts], T],
                        *args: *Ts) -> asyncio.Future[T]:
        """Run ``func(*args)`` inline on the loop's thread, in zero virtual time; `executor` is ignored.

        Threads would finish at wall-clock moments unrelated to virtual time and break determinism, so
        the virtual loop never starts one. The returned future is already done (result or exception).
        """
        if self.is_closed():
            raise RuntimeError("Event loop is closed")
        fut: asyncio.Future[T] = self.create_future()
        try:
            fut.set_result(func(*args))
        except Exception as e:
            fut.set_exception(e)
        return fut

    def set_default_executor(self, executor: concurrent.futures.Executor) -> None:
        """Accepted for compatibility; the executor is never used (see `run_in_executor`)."""


def wall_time() -> float:
    """The time of day of the world the caller runs in, in seconds.

    On a `VirtualClockLoop` this is the virtual clock (``loop.time()``), so that timestamps that peers
    compare (for example an envelope's ``sent_at``) agree with the simulation's other timers and the run
    stays deterministic; anywhere else (no running loop, or an ordinary loop) it is ``time.time()``.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return time.time()
    return loop.time() if isinstance(loop, VirtualClockLoop) else time.time()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for t in tasks:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception in a task left over by run_virtual()",
                "exception": t.exception(),
                "task": t,
            })


def run_virtual(main: Coroutine[Any, Any, T], *, start_time: float = 0.0) -> T:
    """Run `main` on a fresh `VirtualClockLoop` and return its result (like `asyncio.run`).

    :param main: the coroutine to run.
    :param start_time: virtual time at which the loop starts, in seconds (default 0.0).

    Tasks still pending when `main` returns are cancelled and awaited, async generators are closed,
    and the loop is closed. Raises ``RuntimeError("simulation deadlock: ...")`` when every task waits
    for something that can never happen.
    """
    if not asyncio.iscoroutine(main):
        raise TypeError(f"run_virtual() needs a coroutine, got {main!r}")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        main.close()
        raise RuntimeError("run_virtual() cannot be called from a running event loop")
    loop = VirtualClockLoop(start_time)
    try:
        asyncio.set_event_loop(loop)
        # A copy of the caller's context, as asyncio.run does: the run's changes do not leak out.
        task = loop.create_task(main, context=contextvars.copy_context())
        return loop.run_until_complete(task)
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
