"""The seam between the adapter and a message transport.

The adapter never talks to Kafka directly: it asks a transport for one
:class:`TransportReader` and one :class:`TransportWriter` per worker and
topic. ``loom.transports.kafka`` implements these on confluent-kafka;
``loom.streaming.testing`` implements them in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Protocol

from loom.streaming.bytewax.acks import Ack
from loom.streaming.bytewax.records import Origin, OutRecord
from loom.streaming.plan import FlowPlan, TopicBinding


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

    def preflight(self, plan: FlowPlan, stopping: threading.Event) -> None:
        """Fail fast, before workers start, if the transport cannot serve ``plan``.

        Returns early, without an error, once ``stopping`` is set (a SIGTERM
        while waiting for the broker must not wait out the time-out).
        """
        ...

    def reader(
        self, binding: TopicBinding, worker_index: int, worker_count: int
    ) -> TransportReader: ...

    def writer(
        self, binding: TopicBinding, worker_index: int, report: FailureReport
    ) -> TransportWriter: ...
