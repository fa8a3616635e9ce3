"""Every CLI test runs in a clean environment (`clean_env`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No P2PNODE_* variable of the caller's environment leaks in; the state dir is an empty temp dir
    (so a ~/.p2pnode/config.toml of the machine is never read). Returns the state dir."""
    for name in list(os.environ):
        if name.startswith("P2PNODE_"):
            monkeypatch.delenv(name)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("P2PNODE_STATE_DIR", str(state))
    return state
