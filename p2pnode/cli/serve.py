"""`p2pnode run`: one real node in the foreground, with its control API, until SIGINT/SIGTERM or Leave."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import click

from p2pnode.config import NodeConfig


async def serve(config: NodeConfig, state_dir: Path) -> None:
    """Build the real node, serve its control API, print the ready line, run until stopped, shut down."""
    from p2pnode.daemon.control import ControlServer
    from p2pnode.daemon.real import create_real_node
    from p2pnode.daemon.statedir import ensure_state_dir, start_control

    ensure_state_dir(state_dir)
    node = await create_real_node(config)
    loop = asyncio.get_running_loop()
    control: ControlServer | None = None
    try:
        await node.start()
        # Leave (over the control API) finishes the round in progress, then shuts down like SIGTERM.
        control = await start_control(node, state_dir, on_leave=node.stop)
        ready = (f"p2pnode ready peer_id={node.peer_id} maddrs={','.join(node.transport.addresses())} "
                 f"control={control.address}")
        click.echo(ready)
        sys.stdout.flush()
        runner = asyncio.ensure_future(node.run())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runner.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await node.shutdown()
        if control is not None:
            await control.stop()
