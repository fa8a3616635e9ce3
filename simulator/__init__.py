"""The simulator: many p2pnode nodes in one process, over an in-memory network on a virtual clock.

It builds the same `Node`, protocols and trainers as the daemon; only the transport
(`MemoryTransport`), the directory (`MemoryDirectory`) and the clock differ.
"""

from __future__ import annotations

from typing import Any

from simulator.settings import SimConfig

__all__ = ["SimConfig", "run_simulation"]


def __getattr__(name: str) -> Any:
    # The runner imports torch; `SimConfig` (and the options of ``p2pnode sim``) do not need it.
    if name == "run_simulation":
        from simulator.runner import run_simulation

        return run_simulation
    raise AttributeError(f"module 'simulator' has no attribute {name!r}")
