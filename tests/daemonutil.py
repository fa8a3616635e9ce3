"""A real `p2pnode run` daemon process, and the control commands run in-process, for the tests of several
layers (daemon, net)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from typing import Any

import click
from click.testing import CliRunner, Result

from netutil import descendant_pids
from p2pnode.cli.control_cmds import register

READY = re.compile(r"^p2pnode ready peer_id=(\S+) maddrs=(\S+) control=(\S+)$")


class Daemon:
    """A `p2pnode run` process in its own session, with its JSON round events collected."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "p2pnode", "run", "--json-logs", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.rounds: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._out, daemon=True).start()
        threading.Thread(target=self._err, daemon=True).start()

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def _err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "round":
                self.rounds.append(rec)

    def ready(self, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.stderr[-30:])
                continue
            m = READY.match(line)
            if m:
                return m
        raise AssertionError("no ready line: " + "".join(self.stderr[-30:]))

    @property
    def round(self) -> int:
        return self.rounds[-1]["round"] if self.rounds else 0

    def group_pids(self) -> set[int]:
        return {self.proc.pid} | descendant_pids(self.proc.pid)


def control_cli() -> click.Group:
    """A click group with the control commands (`p2pnode status`, `peers`, `leave`, ...) alone."""

    @click.group()
    def cli() -> None:
        pass

    register(cli)
    return cli


async def invoke_control(args: list[str]) -> Result:
    """Run the control command `args` in a worker thread (a gRPC server of this thread's event loop keeps
    answering); exceptions propagate."""
    return await asyncio.to_thread(CliRunner().invoke, control_cli(), list(args), catch_exceptions=False)
