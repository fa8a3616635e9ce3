"""`p2pnode run` killed with SIGKILL at random moments, 20 times, then restarted on the same state dir.

Every restart must come back with the same peer id and resume from the newest intact checkpoint on
disk; no checkpoint file under its final name may ever be damaged (writes are atomic), including when
the kill lands in the middle of a checkpoint write (seen as a temporary file left behind).

The task is digits-mlp with a wide hidden layer (about 10 MB per checkpoint with momentum), so that
writing a checkpoint takes a good part of each round. Kill moments (seeded): during start-up, at a
random time while rounds run, or a random few milliseconds after a round ends, while its checkpoint is
being written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from daemonutil import Daemon

from p2pnode.daemon.checkpoint import CheckpointStore, CorruptCheckpoint, read
from p2pnode.daemon.identity import load_or_create_identity
from p2pnode.training.tasks import Task, get_task

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(600)]

KILLS = 20
SEED = 20240607


def wide_digits() -> Task:
    """digits-mlp with 16,384 hidden units (1.2 M parameters): the task of this test's daemons."""
    return get_task("digits-mlp", hidden=16384)


def _newest_valid_round(state: Path) -> int:
    store = CheckpointStore.in_state_dir(state)
    for ckpt in store.valid():
        return ckpt.round
    return 0


def _events(d: Daemon, kind: str) -> list[dict[str, object]]:
    out = []
    for line in list(d.stderr):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("event") == kind:
            out.append(rec)
    return out


def _wait_event(d: Daemon, kind: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _events(d, kind)
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {kind} event: " + "".join(d.stderr[-20:]))


def _kill(d: Daemon) -> None:
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)


def test_kill_9_at_random_moments_always_resumes_a_valid_checkpoint(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(SEED)
    # The daemon imports this module for its task, and this module imports the helpers in tests/.
    here = Path(__file__).resolve()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(here.parent), str(here.parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    state = tmp_path / "state"
    args = ["--state-dir", str(state), "--min-round-time", "0", "--device", "cpu", "--run-id", "restart",
            "--task", "test_daemon_restart:wide_digits", "--log-level", "DEBUG"]
    peer_id: str | None = None
    last_resume = 0
    mid_write = early = 0
    resumes: list[int] = []
    for i in range(KILLS + 1):
        expected = _newest_valid_round(state)
        d = Daemon(args)
        try:
            if i < KILLS and rng.random() < 0.2:
                # Kill during start-up: identity creation, DHT start, model building or resume.
                time.sleep(rng.uniform(0.5, 4.0))
                _kill(d)
                early += 1
            else:
                ready = d.ready(timeout=90)
                if peer_id is None:
                    peer_id = ready.group(1)
                assert ready.group(1) == peer_id, "the peer id changed across a restart"
                resume = _wait_event(d, "resume", 10)
                assert resume["round"] == expected, (resume, expected)  # the newest intact checkpoint
                assert resume["round"] >= last_resume
                last_resume = int(resume["round"])  # type: ignore[call-overload]
                resumes.append(last_resume)
                if i == KILLS:  # the last start: stop it cleanly
                    d.proc.send_signal(signal.SIGTERM)
                    assert d.proc.wait(30) == 0, "".join(d.stderr[-20:])
                    break
                if rng.random() < 0.5:
                    # Just after a round: its checkpoint is being written now (it takes a few tens of ms).
                    seen = len(d.rounds)
                    deadline = time.monotonic() + 30
                    while len(d.rounds) == seen and time.monotonic() < deadline:
                        time.sleep(0.001)
                    time.sleep(rng.uniform(0.0, 0.03))
                else:
                    time.sleep(rng.uniform(0.05, 1.5))
                _kill(d)
            assert not _events(d, "checkpoint_corrupt"), _events(d, "checkpoint_corrupt")
        finally:
            if d.proc.poll() is None:
                _kill(d)
        directory = state / "checkpoints"
        if directory.exists():
            mid_write += any(p.name.endswith(".tmp") for p in directory.iterdir())
            for p in directory.glob("ckpt-*.p2pc"):
                try:
                    read(p)
                except CorruptCheckpoint as e:  # pragma: no cover - the failure this test exists for
                    raise AssertionError(f"kill {i}: a checkpoint under its final name is damaged: {e}") from e
    print(f"{KILLS} kills: {early} during start-up, {mid_write} inside a checkpoint write; resumed rounds {resumes}")
    assert peer_id is not None and peer_id == load_or_create_identity(state).peer_id
    assert resumes[-1] > 0 and resumes == sorted(resumes), resumes
    assert early >= 1, "no kill landed during start-up; change SEED"
    assert mid_write >= 1, "no kill landed inside a checkpoint write; change SEED"
