"""Error kinds and the dead-letter envelope.

``BusinessError`` and ``FlowValidationError`` are defined in :mod:`loom.errors`
(with every other exception of Loom) and importable from here too.
"""

from __future__ import annotations

import enum
from datetime import datetime

import msgspec

from loom.errors import BusinessError as BusinessError  # noqa: PLC0414 (re-export)
from loom.errors import FlowValidationError as FlowValidationError  # noqa: PLC0414 (re-export)
from loom.streaming.message import Headers


class ErrorKind(enum.StrEnum):
    """Why a record left the happy path.

    Each kind is routed independently (``StreamFlow(errors=...)``), so a team
    can, say, dead-letter ``WIRE`` errors but alert on ``DELIVERY``.
    """

    WIRE = "wire"
    """The bytes could not be decoded or did not validate as the payload type."""
    TASK = "task"
    """A step raised an exception."""
    BUSINESS = "business"
    """A step raised :class:`BusinessError`: the record is valid but refused."""
    ROUTING = "routing"
    """A router matched no route and has no default."""
    DELIVERY = "delivery"
    """The broker refused an output record permanently."""
    TIMEOUT = "timeout"
    """An async step exceeded its ``timeout_ms``."""
    LATE = "late"
    """A record arrived for a window that had already closed (``WindowAggregate``).

    Only flows with a window must route it."""


class ErrorEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to understand and replay a failed record.

    Written to a dead-letter topic as JSON; ``value`` and ``key`` hold the
    original bytes untouched (base64 in JSON), so a replay re-produces exactly
    what was consumed.

    ``traceback`` is where a ``TASK``, ``BUSINESS`` or ``TIMEOUT`` error
    happened: the innermost :data:`TRACEBACK_FRAMES` frames, one
    ``file:line in function`` per line (innermost last; for a timeout,
    where the call was waiting when it was cancelled, without the event
    loop library's own innermost frames), at most
    :data:`TRACEBACK_MAX_CHARS` characters. It holds no source text and no
    local values. Other kinds have none: ``WIRE`` errors come from the
    decoder (no frame of the flow's code; ``message`` names what was
    invalid), ``ROUTING`` from a missing route, ``DELIVERY`` from the broker.
    """

    kind: ErrorKind
    flow: str
    node: str
    exception_type: str
    message: str
    topic: str | None
    partition: int | None
    offset: int | None
    key: bytes | None
    headers: Headers
    timestamp_ms: int | None
    value: bytes | None
    attempt: int
    occurred_at: datetime
    traceback: str | None = None


TRACEBACK_FRAMES = 10
"""Frames an envelope's ``traceback`` keeps (the innermost ones)."""
TRACEBACK_MAX_CHARS = 4000
"""Upper bound of an envelope's ``traceback``; longer ones lose outer lines first."""
