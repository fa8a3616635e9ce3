"""Logging set-up shared by the CLI entry points: human lines by default, JSON lines on request."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any `extra={"event": {...}}` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            out.update(event)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Send p2pnode's logs to stderr, as text or JSON lines; quiet hivemind's INFO chatter."""
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    root = logging.getLogger("p2pnode")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("hivemind").setLevel(logging.WARNING)
