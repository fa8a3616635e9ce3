"""Fixtures every test gets, whatever it imports, and the layer markers of `make test-fast`.

- one torch thread per test (the models are tiny; more threads only fight other processes for the cores),
  restored afterwards;
- the global random generators (``random``, numpy's legacy one, torch's CPU one) seeded the same before
  every test, so no test sees the draws another test left behind, whatever the order;
- ``network_guard``: a `netutil.NetworkGuard` around the test that stops processes and removes hivemind
  socket files it left behind, and fails the test when it leaked a process;
- a leaked-process check for every other test: a child process still alive after the test fails it.

Layer markers: each test module is marked with the layer it belongs to (`LAYERS`), so
``pytest -m unit`` runs the unit layer (``make test-fast``) before the files move to tests/<layer>/.
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

#: Layer of each test module (file stem). `make test-fast` runs ``-m unit``.
LAYERS: dict[str, tuple[str, ...]] = {
    "unit": ("test_aggregation_flag", "test_aggregation_outer", "test_aggregation_robustness",
             "test_aggregation_rules", "test_aggregation_vca", "test_attacks", "test_byzantine_units",
             "test_codec", "test_secagg_primitives", "test_secagg_compose", "test_training",
             "test_training_cifar", "test_virtual_clock", "test_transport_memory", "test_discovery_memory",
             "test_identity"),
    "protocols": ("test_admission", "test_backoff", "test_gossip_bad_input", "test_gossip_vca", "test_modest",
                  "test_modest_rounds", "test_modest_secagg", "test_modest_secagg_spread",
                  "test_protocols_dpsgd", "test_secagg_adversarial", "test_secagg_protocol", "test_statesync"),
    "daemon": ("test_checkpoint", "test_control", "test_daemon_restart", "test_metrics", "test_supervisor",
               "test_doctor"),
    "cli": ("test_cli_config",),
    "sim": ("test_simulator", "test_simulator_analysis", "test_simulator_churn", "test_byzantine_sim"),
    "net": ("test_byzantine_real", "test_dht_hostile", "test_discovery_dht", "test_modest_crash_real",
            "test_lm_real", "test_modest_real", "test_modest_secagg_real", "test_swarm_real", "test_transport_hostile",
            "test_transport_p2p"),
}
_LAYER_OF = {stem: layer for layer, stems in LAYERS.items() for stem in stems}


def pytest_configure(config: pytest.Config) -> None:
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: tests of the {layer} layer (tests/conftest.py LAYERS)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        layer = _LAYER_OF.get(Path(str(item.fspath)).stem)
        if layer is not None:
            item.add_marker(getattr(pytest.mark, layer))


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
