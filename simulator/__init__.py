"""The simulator: many p2pnode nodes in one process, over an in-memory network on a virtual clock.

It builds the same `Node`, protocols and trainers as the daemon; only the transport
(`MemoryTransport`), the directory (`MemoryDirectory`) and the clock differ.
"""

from simulator.runner import SimConfig, run_simulation

__all__ = ["SimConfig", "run_simulation"]
