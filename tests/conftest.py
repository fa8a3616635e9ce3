"""Fixtures every test gets, whatever it imports, and the layer markers of `make test-fast`.

- one torch thread per test (the models are tiny; more threads only fight other processes for the cores),
  restored afterwards;
- the global random generators (``random``, numpy's legacy one, torch's CPU one) seeded the same before
  every test, so no test sees the draws another test left behind, whatever the order;
- ``network_guard``: a `netutil.NetworkGuard` around the test that stops processes and removes hivemind
  socket files it left behind, and fails the test when it leaked a process;
- a leaked-process check for every other test: a child process still alive after the test fails it.

Layers: the tests live in tests/<layer>/ (`LAYERS`: unit, protocols, daemon, cli, sim, net) and each is
marked with its layer, so ``pytest tests/unit`` and ``pytest -m unit`` (``make test-fast``) run the same
tests. The helpers the layers share (netutil.py, simutil.py) stay in tests/.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from netutil import PROCESS_ALLOWLIST, NetworkGuard, descendant_pids, process_name

#: Seed of the global random generators before each test.
GLOBAL_SEED = 0
#: Seconds a child process started by a test may take to exit after the test.
CHILD_GRACE_S = 5.0

#: The layers, one directory of tests/ each. `make test-fast` runs ``-m unit``.
LAYERS: tuple[str, ...] = ("unit", "protocols", "daemon", "cli", "sim", "net")
#: What each layer holds.
LAYER_HELP = {
    "unit": "pure math, codecs, tasks and the in-memory seams, one object at a time",
    "protocols": "round protocols over the in-memory network (gossip, dpsgd, modest, secagg, statesync)",
    "daemon": "the node, its checkpoints, control API, metrics and supervisor",
    "cli": "the command line and the config schema",
    "sim": "simulator runs",
    "net": "real hivemind DHT / p2pd processes on 127.0.0.1",
}
_TESTS = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: tests/{layer}/: {LAYER_HELP[layer]}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test with its layer: the directory of tests/ its module lives in."""
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.parent == _TESTS:
            raise pytest.UsageError(f"{path.name}: test modules belong in a layer directory, tests/<layer>/ "
                                    f"with <layer> one of {', '.join(LAYERS)}")
        if path.parent.parent == _TESTS and path.parent.name in LAYERS:
            item.add_marker(getattr(pytest.mark, path.parent.name))


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the test, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded_globals() -> None:
    """The same global random state before every test, whatever ran before it."""
    random.seed(GLOBAL_SEED)
    np.random.seed(GLOBAL_SEED)
    torch.manual_seed(GLOBAL_SEED)


def _new_children(before: set[int]) -> set[int]:
    return {p for p in descendant_pids() - before if process_name(p) not in PROCESS_ALLOWLIST}


@pytest.fixture(autouse=True)
def no_leaked_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that leaves a child process of this one running (after a grace period)."""
    before = descendant_pids()
    yield
    if "network_guard" in request.fixturenames:
        return  # the guard has already stopped and reported them
    deadline = time.monotonic() + CHILD_GRACE_S
    while (left := _new_children(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        pytest.fail(f"the test left child processes running: {sorted(f'{p} ({process_name(p)})' for p in left)}")


@pytest.fixture
def network_guard() -> Iterator[NetworkGuard]:
    """A `NetworkGuard` around the test; the test fails when it leaked a process."""
    with NetworkGuard() as guard:
        yield guard
    assert not guard.leaked_processes, guard.leaked_processes
