"""Structured JSON logs, one object per line, with the flow's coordinates.

Log calls pass context as ``extra`` (``flow``, ``node``, ``topic``,
``partition``, ``offset``); the formatter writes those keys when present, so
a log search can go from an alert straight to the record that caused it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

CONTEXT_KEYS = ("flow", "node", "topic", "partition", "offset", "worker")


class JsonFormatter(logging.Formatter):
    """Formats records as JSON objects with stable keys."""

    def __init__(self, *, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(
    *, level: str = "INFO", stream: TextIO | None = None, static: dict[str, Any] | None = None
) -> None:
    """Route all logging to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(static=static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
