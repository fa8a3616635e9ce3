"""Where a protocol runs the trainer's CPU/GPU work.

The daemon runs it on one worker thread so the event loop keeps serving peers while a model trains.
The simulator runs it inline (all nodes share one thread) and charges a modelled duration on the
virtual clock instead, so that simulated time does not depend on the speed of the machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Compute(Protocol):
    async def run(self, fn: Callable[[], T], *, cost_s: float = 0.0) -> T:
        """Run `fn` and return its result; `cost_s` is the modelled duration in seconds (simulator only)."""
        ...

    def close(self) -> None:
        """Release worker threads, if any."""
        ...


class ThreadCompute:
    """Runs work on a single dedicated thread (work items never overlap, so the model is never shared)."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pnode-train")

    async def run(self, fn: Callable[[], T], *, cost_s: float = 0.0) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class VirtualCompute:
    """Runs work inline and then sleeps `cost_s` on the (virtual) clock."""

    async def run(self, fn: Callable[[], T], *, cost_s: float = 0.0) -> T:
        result = fn()
        if cost_s > 0:
            await asyncio.sleep(cost_s)
        return result

    def close(self) -> None:
        pass
