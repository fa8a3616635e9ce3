"""`p2pnode swarm`: a local swarm of real daemons, each its own process, with a live progress table."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pnode.cli.options import TRAINING_FIELDS
from p2pnode.config import schema

READY = re.compile(r"^p2pnode ready peer_id=(\S+) maddrs=(\S*) control=(\S+)")
#: Seconds to wait for a daemon's ready line, and for all daemons to stop after SIGTERM.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
#: Options of `training_options` passed on to each daemon as ``--name value`` when set (all of them but the
#: ones `_args` passes itself: the run-wide ones every daemon must agree on, from the schema).
FORWARDED = tuple(meta.param for f, meta in schema() if f.name in TRAINING_FIELDS and meta.param not in (
    "task", "rule", "seed", "init", "secagg", "rule_params", "task_options", "outer_nesterov"))


@dataclass
class Member:
    index: int
    proc: subprocess.Popen[str]
    peer_id: str = ""
    maddrs: list[str] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)


def _args(kw: dict[str, Any], index: int, initial: list[str]) -> list[str]:
    state_dir = os.path.join(kw["state_root"], f"node-{index}")
    args = [sys.executable, "-m", "p2pnode", "run", "--json-logs", "--state-dir", state_dir,
            "--run-id", kw["run_id"], "--task", kw["task"],
            "--rule", kw["rule"], "--seed", str(kw["seed"]), "--shard", f"{index}/{kw['nodes']}",
            "--init", kw["init"], "--device", kw["device"], "--min-round-time", str(kw["min_round_time"]),
            "--exchange-timeout", "10", "--wait-for-peers", str(kw["nodes"] - 1)]
    # Every run-wide training option goes to every daemon: the run's config hash must agree on all of them.
    for key in FORWARDED:
        if kw.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(kw[key])]
    if kw.get("secagg"):
        args.append("--secagg")
    if kw.get("outer_nesterov") is False:  # a bool flag: forwarded only when off (on is the default)
        args.append("--no-outer-nesterov")
    for p in kw.get("rule_params", ()):
        args += ["--rule-param", p]
    for p in kw.get("task_options", ()):
        args += ["--task-option", p]
    for m in initial:
        args += ["--initial-peer", m]
    return args


def _read_stdout(m: Member, stream: IO[str]) -> None:
    for line in stream:
        match = READY.match(line.strip())
        if match:
            m.peer_id, maddrs, _ = match.groups()
            m.maddrs = [a for a in maddrs.split(",") if a]
            m.ready.set()


def _read_stderr(m: Member, stream: IO[str]) -> None:
    for line in stream:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if line.strip():
                m.errors.append(line.rstrip())
            continue
        if rec.get("event") == "round":
            m.last = rec
        elif rec.get("level") in ("ERROR", "CRITICAL"):
            m.errors.append(rec.get("message", ""))


def _spawn(kw: dict[str, Any], index: int, initial: list[str]) -> Member:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_args(kw, index, initial), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, bufsize=1)
    m = Member(index, proc)
    assert proc.stdout is not None and proc.stderr is not None
    threading.Thread(target=_read_stdout, args=(m, proc.stdout), daemon=True).start()
    threading.Thread(target=_read_stderr, args=(m, proc.stderr), daemon=True).start()
    return m


def _table(members: list[Member], rounds: int, title: str, exit_codes: bool = False) -> Table:
    t = Table(title=title)
    metric = next((m.last["metric"] for m in members if m.last.get("metric")), "accuracy")
    cols = ["node", "peer id", "round", "loss", "acc" if metric == "accuracy" else metric, "peers", "MB out",
            "MB in", "KB out/round", "rej"]
    for col in cols + (["exit"] if exit_codes else []):
        t.add_column(col, justify="left" if col == "peer id" else "right")
    for m in members:
        r = m.last
        # Round events carry the task's metric as metric_value (older daemons: accuracy only).
        acc = r.get("metric_value", r.get("accuracy"))
        t.add_row(str(m.index), m.peer_id[-8:] or "starting", f"{r.get('round', 0)}/{rounds}",
                  f"{r['train_loss']:.4f}" if "train_loss" in r else "-",
                  "-" if acc is None else f"{acc:.3f}" if metric == "accuracy" else f"{acc:.4g}",
                  str(r.get("peers", "-")),
                  f"{r.get('bytes_sent', 0) / 1e6:.2f}", f"{r.get('bytes_received', 0) / 1e6:.2f}",
                  f"{r.get('round_bytes_sent', 0) / 1e3:.1f}", str(r.get("rejected", 0)),
                  *([str(m.proc.returncode)] if exit_codes else []))
    return t


def bytes_summary(members: list[Member]) -> str:
    """One line: bytes all nodes sent, and the mean a node sent per round (since its start)."""
    total = sum(int(m.last.get("bytes_sent", 0)) for m in members)
    per = [m.last.get("bytes_sent", 0) / m.last["round"] for m in members if m.last.get("round")]
    mean = sum(per) / len(per) if per else 0.0
    return f"bytes sent: {total / 1e6:.2f} MB by all nodes; {mean / 1e3:.1f} KB per node per round (mean)"


def run_swarm(kw: dict[str, Any]) -> int:
    """Start `kw["nodes"]` daemons, run `kw["rounds"]` rounds, stop them, print a summary; return the exit code."""
    console = Console(width=max(100, Console().width))
    n, rounds = kw["nodes"], kw["rounds"]
    members: list[Member] = []
    code = 0
    kw = dict(kw, state_root=tempfile.mkdtemp(prefix="p2pnode-swarm-"))
    console.print(f"state dirs: {kw['state_root']}/node-<i> (try `p2pnode status --state-dir "
                  f"{kw['state_root']}/node-0` while it runs)")
    try:
        first = _spawn(kw, 0, [])
        members.append(first)
        if not first.ready.wait(START_TIMEOUT_S):
            console.print(f"[red]node 0 did not start within {START_TIMEOUT_S:.0f} s[/red]")
            for line in first.errors[-20:]:
                console.print(line)
            return 1
        console.print(f"node 0 ready: {first.peer_id} at {first.maddrs[0] if first.maddrs else '?'}")
        for i in range(1, n):
            members.append(_spawn(kw, i, first.maddrs[:1]))
        t0 = time.monotonic()
        with Live(_table(members, rounds, "p2pnode local swarm"), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(0.25)
                live.update(_table(members, rounds, f"p2pnode local swarm ({time.monotonic() - t0:.0f} s)"))
                if all(m.last.get("round", 0) >= rounds for m in members):
                    break
                dead = [m for m in members if m.proc.poll() is not None]
                if dead:
                    console.print(f"[red]node {dead[0].index} exited with code {dead[0].proc.returncode}[/red]")
                    for line in dead[0].errors[-20:]:
                        console.print(line)
                    code = 1
                    break
    except KeyboardInterrupt:
        code = 130
    finally:
        for m in members:
            if m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for m in members:
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
    console.print()
    console.print(_table(members, rounds, "summary", exit_codes=True))
    console.print(bytes_summary(members))
    shutil.rmtree(kw["state_root"], ignore_errors=True)
    if any(m.proc.returncode != 0 for m in members) and code == 0:
        code = 1
    return code
