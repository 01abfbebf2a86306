"""The seam between the adapter and a message transport.

The adapter never talks to Kafka directly: it asks a transport for one
:class:`TransportReader` and one :class:`TransportWriter` per worker and
topic. ``loom.transports.kafka`` implements these on confluent-kafka;
``loom.streaming.testing`` implements them in memory. Topics are physical
topic names: a transport knows nothing of flows, plans or codecs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from loom.delivery.acks import Ack


class Origin(Protocol):
    """An input record as the transport delivers it (confluent-kafka's shape)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...
    def timestamp(self) -> tuple[int, int]: ...


OutRecord = tuple[bytes | None, bytes, Sequence[tuple[str, bytes]] | None, Any]
"""An encoded record for a topic: ``(key, value, headers, source)``.

``source`` is opaque to the transport: the adapter's record it was encoded
from, handed back in a :class:`FailureReport` if the broker refuses it
(``None`` for dead letters). A plain tuple, not a ``NamedTuple``: one is
built per produced record, and writers unpack it.
"""


class TransportReader(Protocol):
    """One worker's reader of the input topic."""

    def poll(self, max_records: int) -> list[Origin]:
        """Return up to ``max_records`` ready records without blocking."""
        ...

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Record ``partition -> next offset to read`` as the resume point."""
        ...

    def exhausted(self) -> bool:
        """True when a finite input has been read completely (never for Kafka)."""
        ...

    def end_offsets(self, partitions: Mapping[int, int]) -> dict[int, int]:
        """Known log-end offsets of ``partitions`` (for lag), without a broker call."""
        ...

    def caught_up(self, partition: int) -> bool:
        """True when ``partition`` is known to be read to its end, without a broker call.

        Unknown (before the first fetch) is False: stateful nodes move event
        time on with the wall clock only while their partition is caught up,
        so a restart's backlog is read before any window closes by the clock.
        """
        ...

    def close(self) -> None: ...


class FailureReport(Protocol):
    """Where a writer reports a record the broker refused for good.

    The record's ack is not released by the writer: the report routes the
    record as a ``DELIVERY`` error, whose delivery releases it.
    """

    def __call__(self, record: OutRecord, ack: Ack, error: BaseException) -> None: ...


class TransportWriter(Protocol):
    """One worker's writer to one topic."""

    def write(self, records: list[OutRecord], acks: list[Ack]) -> None:
        """Send ``records``; release ``acks[i]`` once ``records[i]`` is delivered.

        A record refused for good is reported as a ``DELIVERY`` failure built
        from ``records[i].source`` instead; its ack travels with the failure.
        """
        ...

    def poll(self) -> None:
        """Serve delivery reports without blocking."""
        ...

    def flush(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for every pending delivery report."""
        ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Builds per-worker readers and writers."""

    def preflight(self, source: str, sinks: Sequence[str], stopping: threading.Event) -> None:
        """Fail fast, before workers start, if ``source`` cannot be read or a sink written.

        Returns early, without an error, once ``stopping`` is set (a SIGTERM
        while waiting for the broker must not wait out the time-out).
        """
        ...

    def reader(self, topic: str, worker_index: int, worker_count: int) -> TransportReader:
        """The reader of ``topic``'s partitions that worker ``worker_index`` owns."""
        ...

    def writer(self, topic: str, worker_index: int, report: FailureReport) -> TransportWriter:
        """A writer of ``topic`` for worker ``worker_index``; refusals go to ``report``."""
        ...
