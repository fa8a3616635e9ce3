"""`p2pnode run`: one real node in the foreground, with its control API, until SIGINT/SIGTERM or Leave.

Output contract: stdout gets exactly one line, ``p2pnode ready peer_id=<id> maddrs=<addrs>
control=<addr>`` (plus `` metrics=<host:port>`` when the metrics endpoint is on), once the node has
resumed or synced its model and announced itself. Everything else goes to stderr: log lines, or, when
stderr is a terminal and logs are text, a live progress display with the log lines printed above it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import IO, TYPE_CHECKING

import click

from p2pnode.config import NodeConfig
from p2pnode.daemon.settings import DaemonSettings

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from p2pnode.daemon.control import ControlServer
    from p2pnode.daemon.metrics import MetricsServer
    from p2pnode.daemon.node import Node


def live_display_wanted(settings: DaemonSettings, stream: IO[str]) -> bool:
    """Whether to show the live display on `stream`: never when ``progress`` is ``off``, and only on a
    terminal otherwise (so that pipes and log files get plain lines)."""
    if settings.progress == "off":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressDisplay:
    """A live table of the node's progress on stderr (rich), refreshed twice a second.

    While it runs, the ``p2pnode`` log records go through rich's handler on the same console, so they
    print above the table instead of tearing it.
    """

    def __init__(self, node: Node, console: Console, target_rounds: int | None = None) -> None:
        from rich.live import Live

        self.node = node
        self.console = console
        self.target = target_rounds
        self._started = time.monotonic()
        self._live = Live(get_renderable=self.render, console=console, refresh_per_second=2,
                          redirect_stdout=False, redirect_stderr=False, transient=False)
        self._saved_handlers: list[logging.Handler] = []

    def render(self) -> RenderableType:
        from rich.table import Table

        node = self.node
        st = node.status()
        r = node.last_report
        table = Table(title=f"p2pnode {st.peer_id[-12:]}  run {st.run_id}  task {st.task}", show_header=False,
                      title_justify="left", box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        rounds = f"{st.round}" + (f"/{self.target}" if self.target else "")
        table.add_row("state", f"{st.state}  (model from: {st.resumed_from})")
        table.add_row("round", rounds)
        table.add_row("loss", "-" if st.loss is None else f"{st.loss:.4f}")
        from p2pnode.daemon.node_status import metric_text

        table.add_row(st.metric, metric_text(st.metric, st.metric_value).partition("=")[2])
        table.add_row("peers", str(st.peers))
        if r is not None:
            partial = f"  partial: {r.extra['partial']}" if r.extra.get("partial") else ""
            table.add_row("last merge", f"{r.combined} model(s), {r.fraction:.0%} of the model{partial}")
        table.add_row("partial rounds", str(st.partial_rounds))
        table.add_row("sent / received", f"{st.bytes_sent / 1e6:.2f} MB / {st.bytes_received / 1e6:.2f} MB")
        table.add_row("rejected", str(sum(st.rejected.values())))
        table.add_row("checkpoint", "-" if st.last_checkpoint_round is None else f"round {st.last_checkpoint_round}")
        table.add_row("uptime", f"{time.monotonic() - self._started:.0f} s")
        return table

    def start(self) -> None:
        from rich.logging import RichHandler

        root = logging.getLogger("p2pnode")
        self._saved_handlers = list(root.handlers)
        handler = RichHandler(console=self.console, show_path=False, rich_tracebacks=False)
        root.handlers[:] = [handler]
        self._live.start()

    def stop(self) -> None:
        self._live.stop()
        root = logging.getLogger("p2pnode")
        root.handlers[:] = self._saved_handlers


async def serve(config: NodeConfig, settings: DaemonSettings) -> None:
    """Build the real node, serve its control API, resume or sync its model, print the ready line, run
    until stopped (SIGINT, SIGTERM, Leave, or ``config.rounds`` done), shut down.

    :param settings: node-local settings; ``state_dir`` None takes the default state dir.
    """
    from p2pnode.daemon.control import start_control
    from p2pnode.daemon.real import create_real_node
    from p2pnode.daemon.statedir import default_state_dir, ensure_state_dir

    if settings.state_dir is None:
        settings.state_dir = default_state_dir()
    ensure_state_dir(settings.state_dir)
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    runner: asyncio.Future[None] | None = None
    signaled = False

    def on_signal() -> None:
        nonlocal signaled
        signaled = True
        # While rounds run, stop them (the node finishes cleanly); before that, cut the start short.
        if runner is not None:
            runner.cancel()
        elif me is not None:
            me.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    node: Node | None = None
    control: ControlServer | None = None
    metrics: MetricsServer | None = None
    display: ProgressDisplay | None = None
    try:
        node = await create_real_node(config, settings)
        # The control API comes up before the model is resumed or synced, so `p2pnode status` can
        # follow a long state sync. Leave finishes the round in progress, then shuts down like SIGTERM.
        control = await start_control(node, settings.state_dir, on_leave=node.stop)
        await node.start()
        if settings.metrics_port is not None:
            metrics = node.metrics.serve(settings.metrics_host, settings.metrics_port)
        ready = (f"p2pnode ready peer_id={node.peer_id} maddrs={','.join(node.transport.addresses())} "
                 f"control={control.address}")
        if metrics is not None:
            ready += f" metrics={metrics.address}"
        click.echo(ready)
        sys.stdout.flush()
        if live_display_wanted(settings, sys.stderr):
            from rich.console import Console

            display = ProgressDisplay(node, Console(file=sys.stderr), config.rounds)
            display.start()
        runner = asyncio.ensure_future(node.run())
        await runner
    except asyncio.CancelledError:
        if not signaled:
            raise
        if runner is None and me is not None:
            me.uncancel()  # the start was cut short on purpose; let the clean-up below await normally
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if display is not None:
            display.stop()
        if node is not None:
            await node.shutdown()
        if control is not None:
            await control.stop()
        if metrics is not None:
            metrics.close()
