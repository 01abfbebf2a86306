"""What flows between Bytewax operators: chunks of records, not single records.

Bytewax pays a fixed Python cost per item per operator, so the adapter moves
one :class:`Chunk` per source poll through the dataflow and each operator
loops over its records in plain Python. A chunk also carries the failures
produced upstream, and control signals: an empty chunk is a *tick* that lets
time-based nodes (batch timeouts, async results) make progress while input is
idle; ``flush`` asks buffering nodes to emit everything they hold.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple

import msgspec

from loom.delivery.acks import Ack
from loom.delivery.transport import Origin
from loom.errors import AsyncTimeout as AsyncTimeout  # noqa: PLC0414 (re-export)
from loom.observability.tracing import RecordSpan
from loom.streaming.errors import (
    TRACEBACK_FRAMES,
    TRACEBACK_MAX_CHARS,
    BusinessError,
    ErrorEnvelope,
    ErrorKind,
)
from loom.streaming.message import Headers, Message, MessageMeta

ATTEMPT_HEADER = "loom-attempt"


PAYLOAD_TYPES: set[type] = set()
"""Types steps returned that are not ``Message``s.

``isinstance(result, Message)`` costs ~120 ns for a payload (``Message`` is a
generic msgspec ``Struct``); a set lookup of the result's type costs ~25.
"""


class Rec(msgspec.Struct, gc=False):
    """One record in flight: its current value, where it came from, its ack.

    ``key``/``headers`` are ``None`` until a step overrides them by returning
    a :class:`Message`; until then they are read from ``origin``. A batch
    from ``CollectBatch`` keeps its input records in ``members``.

    This is the one object Loom allocates per record, so it is a msgspec
    ``Struct``: built in C, and not tracked by the cyclic garbage collector
    (``gc=False``; a ``Rec`` never takes part in a reference cycle), which
    keeps collections rare while a run allocates millions of them.
    """

    value: Any
    origin: Origin | None
    ack: Ack
    members: list[Rec] | None = None
    key: bytes | None = None
    headers: Headers | None = None
    span: RecordSpan | None = None
    """The record's trace span when its input carried a ``traceparent``; then
    it is also the record's ``ack`` (it ends when the record is finished)."""

    def set_result(self, value: Any) -> None:
        """Store a step's result; a returned ``Message`` also sets key and headers."""
        kind = type(value)
        if kind not in PAYLOAD_TYPES:
            if isinstance(value, Message):
                self.value = value.payload
                self.key = value.key
                self.headers = value.headers
                return
            PAYLOAD_TYPES.add(kind)
        self.value = value

    def out_key(self) -> bytes | None:
        if self.key is not None or self.headers is not None or self.origin is None:
            return self.key
        return self.origin.key()

    def out_headers(self) -> Headers:
        if self.headers is not None:
            return self.headers
        if self.origin is None:
            return ()
        return tuple(self.origin.headers() or ())

    def as_message(self) -> Message[Any]:
        return Message(self.value, self.out_key(), self.out_headers(), meta_of(self.origin))


def meta_of(origin: Origin | None) -> MessageMeta | None:
    if origin is None:
        return None
    kind, stamp = origin.timestamp()
    return MessageMeta(
        topic=origin.topic() or "",
        partition=origin.partition() or 0,
        offset=origin.offset() or 0,
        key=origin.key(),
        headers=tuple(origin.headers() or ()),
        timestamp_ms=stamp if kind else None,
    )


class Failure(NamedTuple):
    """An error envelope and the ack released once it is written."""

    envelope: ErrorEnvelope
    ack: Ack


class Chunk:
    """The unit of data between operators; see the module docstring.

    ``traced`` is False when no record of the chunk has a ``span``, so that
    operators test for spans once per chunk, not once per record (True only
    says some record may have one).
    """

    __slots__ = ("failures", "flush", "records", "traced", "worker")

    def __init__(
        self,
        worker: int,
        records: list[Rec],
        failures: list[Failure],
        flush: bool = False,
        traced: bool = False,
    ) -> None:
        self.worker = worker
        self.records = records
        self.failures = failures
        self.flush = flush
        self.traced = traced

    def derive(self, records: list[Rec], failures: list[Failure]) -> Chunk:
        return Chunk(self.worker, records, failures, self.flush, self.traced)


class Outbound(NamedTuple):
    """Items ready for one sink with the ack to release for each, plus failures.

    Sinks write ``items`` and release ``acks[i]`` once ``items[i]`` is safely
    stored; the adapter routes ``failures`` to the error terminals.
    """

    items: list[Any]
    acks: list[Ack]
    failures: list[Failure]


_fallback_encoder = msgspec.json.Encoder(enc_hook=repr)
_TRACED_KINDS = frozenset((ErrorKind.TASK, ErrorKind.BUSINESS, ErrorKind.TIMEOUT))


_EVENT_LOOP_PACKAGES = ("asyncio", "anyio", "trio", "outcome", "uvloop", "sniffio")


def _in_event_loop(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return any(package in parts for package in _EVENT_LOOP_PACKAGES)


def format_traceback(
    tb: TracebackType | None,
    *,
    frames: int = TRACEBACK_FRAMES,
    max_chars: int = TRACEBACK_MAX_CHARS,
    trim_event_loop: bool = False,
) -> str | None:
    """The innermost ``frames`` frames of ``tb``, one ``file:line in function`` a line.

    Only code locations: no source lines (no disk reads) and no locals. Cut
    to ``max_chars``, dropping outer lines first (the innermost frame, where
    the exception was raised, is the one kept). ``trim_event_loop`` first
    drops the innermost frames of the event loop libraries (asyncio, anyio,
    trio, ...): a cancelled call's traceback ends in their machinery, and the
    frames of interest are the step's own.
    """
    if tb is None:
        return None
    stack = [
        (frame.f_code.co_filename, line, frame.f_code.co_qualname)
        for frame, line in traceback.walk_tb(tb)
    ]
    trimmed = 0
    if trim_event_loop:
        while len(stack) > 1 and _in_event_loop(stack[-1][0]):
            stack.pop()
            trimmed += 1
    lines = [f"{filename}:{line} in {name}" for filename, line, name in stack[-frames:]]
    if len(stack) > frames:
        lines.insert(0, f"({len(stack) - frames} outer frames omitted)")
    if trimmed:
        lines.append(f"({trimmed} event loop frames omitted)")
    text = "\n".join(lines)
    if len(text) > max_chars:
        text = "..." + text[len(text) - max_chars + 3 :]
    return text


def _traceback_of(kind: ErrorKind, exc: BaseException) -> str | None:
    if kind not in _TRACED_KINDS:
        return None
    if isinstance(exc, AsyncTimeout):
        return exc.stack
    return format_traceback(exc.__traceback__)


def error_kind_of(exc: BaseException) -> ErrorKind:
    return ErrorKind.BUSINESS if isinstance(exc, BusinessError) else ErrorKind.TASK


def failures_for(
    flow: str, node: str, kind: ErrorKind, rec: Rec, exc: BaseException | str
) -> list[Failure]:
    """Failures for ``rec``: one per input record when ``rec`` is a batch."""
    if rec.members is not None:
        return [_failure(flow, node, kind, member, exc) for member in rec.members]
    return [_failure(flow, node, kind, rec, exc)]


def _failure(flow: str, node: str, kind: ErrorKind, rec: Rec, exc: BaseException | str) -> Failure:
    origin = rec.origin
    if isinstance(exc, BaseException):
        exc_type, message = type(exc).__qualname__, str(exc) or _last_frame(exc)
        stack = _traceback_of(kind, exc)
    else:
        exc_type, message, stack = kind.name.title() + "Error", exc, None
    if rec.span is not None:
        rec.span.fail(kind.value, node, exc)
    if origin is not None:
        headers = tuple(origin.headers() or ())
        kind_ts, stamp = origin.timestamp()
        envelope = ErrorEnvelope(
            kind=kind,
            flow=flow,
            node=node,
            exception_type=exc_type,
            message=message,
            topic=origin.topic(),
            partition=origin.partition(),
            offset=origin.offset(),
            key=origin.key(),
            headers=headers,
            timestamp_ms=stamp if kind_ts else None,
            value=origin.value(),
            attempt=_attempt(headers),
            occurred_at=datetime.now(UTC),
            traceback=stack,
        )
    else:
        envelope = ErrorEnvelope(
            kind=kind,
            flow=flow,
            node=node,
            exception_type=exc_type,
            message=message,
            topic=None,
            partition=None,
            offset=None,
            key=rec.key,
            headers=rec.headers or (),
            timestamp_ms=None,
            value=_best_effort_bytes(rec.value),
            attempt=1,
            occurred_at=datetime.now(UTC),
            traceback=stack,
        )
    return Failure(envelope, rec.ack)


def _attempt(headers: Sequence[tuple[str, bytes]]) -> int:
    """1 for a first failure; a replayed dead letter carries its count along."""
    for name, value in headers:
        if name == ATTEMPT_HEADER:
            try:
                return int(value) + 1
            except (TypeError, ValueError):
                break
    return 1


def _best_effort_bytes(value: Any) -> bytes | None:
    """A derived record has no original bytes; keep its JSON so nothing is lost."""
    if isinstance(value, bytes):
        return value
    try:
        return _fallback_encoder.encode(value)
    except (TypeError, ValueError):
        return None


def _last_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"raised at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
