"""Structured JSON logs, one object per line, with the flow's coordinates.

Log calls pass context as ``extra`` (``flow``, ``node``, ``topic``,
``partition``, ``offset``); the formatter writes those keys when present, so
a log search can go from an alert straight to the record that caused it.

:class:`DeadLetterLog` writes dead letters to the log at a bounded rate,
adding ``kind``, ``exception_type``, ``error``, ``destination`` and
``suppressed`` to those keys.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

CONTEXT_KEYS = (
    "flow",
    "node",
    "topic",
    "partition",
    "offset",
    "worker",
    "kind",
    "exception_type",
    "error",
    "destination",
    "suppressed",
)


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


DEAD_LETTER_LOG_INTERVAL_S = 10.0
"""Default interval of :class:`DeadLetterLog`: one line per (kind, node) per interval."""
LOGGED_MESSAGE_CHARS = 200
"""A logged exception message is cut to this many characters (first line only)."""

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class _Envelope(Protocol):
    @property
    def kind(self) -> Any: ...
    @property
    def flow(self) -> str: ...
    @property
    def node(self) -> str: ...
    @property
    def exception_type(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def topic(self) -> str | None: ...
    @property
    def partition(self) -> int | None: ...
    @property
    def offset(self) -> int | None: ...


class _Failure(Protocol):
    @property
    def envelope(self) -> _Envelope: ...


def loggable_message(kind: str, message: str, limit: int = LOGGED_MESSAGE_CHARS) -> str:
    """An error message fit for a log line: first line, at most ``limit`` characters.

    A ``WIRE`` message comes from the decoder and may quote the input (an
    invalid enum value, pydantic's ``input_value=...``), so quoted text in it
    is replaced by ``'…'``; msgspec's own messages name the JSON path and
    the expected type in backticks, which are kept.
    """
    line = message.split("\n", 1)[0]
    if kind == "wire":
        line = _QUOTED.sub("'…'", line)
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return line


class _Slot:
    __slots__ = ("next_at", "suppressed")

    def __init__(self, next_at: float) -> None:
        self.next_at = next_at
        self.suppressed = 0


class DeadLetterLog:
    """Logs dead letters at a bounded rate.

    The first dead letter of each ``(kind, node)`` in an interval is logged
    as a warning with the error kind, failing node, exception type and
    message (see :func:`loggable_message`), source topic/partition/offset,
    where it was routed (``destination``), and ``suppressed``: how many of
    that ``(kind, node)`` were not logged since its previous line. Payload
    bytes, keys and headers are never logged. Shared by a run's workers.

    :param interval_s: Length of an interval, per ``(kind, node)``.
    :param clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        interval_s: float = DEAD_LETTER_LOG_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.logger = logger or logging.getLogger("loom.streaming.dead_letters")
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._lock = threading.Lock()

    def record(self, failures: Sequence[_Failure], destination: str) -> None:
        """Account for ``failures`` routed to ``destination``; log the due ones."""
        now = self.clock()
        due: list[tuple[_Envelope, int]] = []
        with self._lock:
            slots = self._slots
            for failure in failures:
                envelope = failure.envelope
                key = (str(envelope.kind), envelope.node)
                slot = slots.get(key)
                if slot is not None and now < slot.next_at:
                    slot.suppressed += 1
                    continue
                due.append((envelope, 0 if slot is None else slot.suppressed))
                slots[key] = _Slot(now + self.interval_s)
        for envelope, suppressed in due:
            self._log(envelope, suppressed, destination)

    def _log(self, envelope: _Envelope, suppressed: int, destination: str) -> None:
        kind = str(envelope.kind)
        error = loggable_message(kind, envelope.message)
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        self.logger.warning(
            "dead letter: %s error at %s: %s: %s%s",
            kind,
            envelope.node,
            envelope.exception_type,
            error,
            more,
            extra={
                "flow": envelope.flow,
                "node": envelope.node,
                "kind": kind,
                "exception_type": envelope.exception_type,
                "error": error,
                "topic": envelope.topic,
                "partition": envelope.partition,
                "offset": envelope.offset,
                "destination": destination,
                "suppressed": suppressed,
            },
        )
