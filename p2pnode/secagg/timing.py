"""CPU time of protocol computation, robust to other load on the machine.

Thread CPU time (``time.thread_time``) counts only what the measuring thread executed, so a busy
machine that deschedules the process does not inflate it, as it would wall-clock time. Work handed to an
executor is measured inside the worker thread (`cpu_call`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class CpuClock:
    """Accumulates the thread CPU seconds of the code it times."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Add the CPU time of the `with` block (on the current thread)."""
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.seconds += time.thread_time() - t0


def cpu_call(fn: Callable[[], T]) -> tuple[T, float]:
    """Run `fn` and return (its result, the CPU seconds it took on the thread that ran it)."""
    t0 = time.thread_time()
    result = fn()
    return result, time.thread_time() - t0
