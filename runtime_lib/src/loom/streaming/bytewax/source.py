"""The flow's Bytewax source: reads and decodes input for each worker's loop.

Bytewax builds one source partition per worker; each attaches its reader to
the worker's :class:`~loom.streaming.bytewax.worker.WorkerLoop` (which polls,
serves the writers, takes late failures and commits) and supplies what only
the source knows: how polled records become records in flight. Every run of
a partition's records in a poll gets one ack (completion tracking,
:mod:`loom.delivery.acks`), tombstones and undecodable values become ``WIRE``
failures, and a record with a ``traceparent`` header starts its span.
"""

from __future__ import annotations

import random
from datetime import datetime
from itertools import groupby
from operator import methodcaller
from typing import Any

from bytewax.inputs import DynamicSource, StatelessSourcePartition

from loom.delivery.acks import Ack
from loom.delivery.transport import Transport
from loom.observability import ObservabilityRuntime, Scope
from loom.observability.tracing import start_record_span
from loom.streaming.bytewax.records import Chunk, Failure, Rec, failures_for
from loom.streaming.bytewax.worker import RunState, WorkerLoop
from loom.streaming.errors import ErrorKind
from loom.streaming.plan import FlowPlan

_TOMBSTONE = "tombstone: the record has no value"
_partition_of = methodcaller("partition")


class FlowSource(DynamicSource[Chunk]):
    """One reader per Bytewax worker; the transport decides which partitions it gets."""

    def __init__(
        self,
        plan: FlowPlan,
        transport: Transport,
        run: RunState,
        observability: ObservabilityRuntime | None = None,
    ) -> None:
        self.plan = plan
        self.transport = transport
        self.run = run
        self.observability = observability

    def build(self, step_id: str, worker_index: int, worker_count: int) -> FlowSourcePartition:
        topic = self.plan.source.binding.physical
        reader = self.transport.reader(topic, worker_index, worker_count)
        loop = self.run.worker(worker_index)
        loop.attach(
            reader,
            tick_ms=self.plan.tick_interval_ms,
            flow=self.plan.name,
            topic=topic,
            observability=self.observability,
        )
        partition = FlowSourcePartition(self, loop)
        self.run.mark_ready(worker_index)
        return partition


class FlowSourcePartition(StatelessSourcePartition[Chunk]):
    def __init__(self, source: FlowSource, loop: WorkerLoop) -> None:
        plan = source.plan
        self.flow = plan.name
        self.node = plan.source.node_id
        self.topic = plan.source.binding.physical
        self.decode = plan.source.binding.codec.decoder
        self.wire_error = plan.source.binding.codec.wire_error
        self.loop = loop
        self._obs = source.observability
        self._tracer = None
        self._traced = False
        if self._obs is not None:
            metrics = self._obs.metrics
            self._consumed = metrics.consumed.labels(self.flow, self.topic)
            self._batch_records = metrics.batch_records.labels(self.flow)
            if self._obs.traces_records:
                self._tracer = self._obs.tracer

    # -- Bytewax API ------------------------------------------------------

    def next_batch(self) -> list[Chunk]:
        chunks = self.loop.next_chunks(self._read)
        if self._traced:  # a record just read has a span: operators look for it
            self._traced = False
            for chunk in chunks:
                chunk.traced = True
        return chunks

    def next_awake(self) -> datetime | None:
        return self.loop.next_awake()

    def close(self) -> None:
        self.loop.reader.close()

    # -- reading ----------------------------------------------------------

    def _read(self, origins: list[Any]) -> tuple[list[Rec], list[Failure]]:
        obs = self._obs
        if obs is None:
            return self._decode(origins)
        self._consumed.inc(len(origins))
        self._batch_records.observe(len(origins))
        if obs.batch_span_ratio and random.random() < obs.batch_span_ratio:
            with obs.tracer.start_as_current_span(
                f"{Scope.BATCH.value} {self.flow}",
                attributes={
                    "loom.scope": Scope.BATCH.value,
                    "loom.flow": self.flow,
                    "loom.worker": self.loop.index,
                    "messaging.batch.message_count": len(origins),
                },
            ):
                return self._decode(origins)
        return self._decode(origins)

    def _decode(self, origins: list[Any]) -> tuple[list[Rec], list[Failure]]:
        decode, progress, tracer = self.decode, self.loop.progress, self._tracer
        records: list[Rec] = []
        failures: list[Failure] = []
        # One ack per run of a partition's records in the poll: they are
        # consecutive offsets, and the run's last record marks the range's end.
        for partition, group in groupby(origins, _partition_of):
            run = list(group)
            ack = progress.partition(partition).track(run[-1].offset(), len(run))
            for origin in run:
                raw = origin.value()
                if raw is None:
                    failures += self._wire_failure(origin, ack, _TOMBSTONE)
                    continue
                try:
                    value = decode(raw)
                except Exception as exc:
                    failures += self._wire_failure(origin, ack, self.wire_error(exc))
                    continue
                rec = Rec(value, origin, ack)
                if tracer is not None:
                    headers = origin.headers()
                    if headers:
                        span = start_record_span(tracer, self.flow, self.topic, headers, ack)
                        if span is not None:  # the span is the record's ack from now on
                            rec.span = rec.ack = span
                            self._traced = True
                records.append(rec)
        return records, failures

    def _wire_failure(self, origin: Any, ack: Ack, error: Exception | str) -> list[Failure]:
        rec = Rec(None, origin, ack)
        tracer = self._tracer
        if tracer is not None and (headers := origin.headers()):
            span = start_record_span(tracer, self.flow, self.topic, headers, ack)
            if span is not None:  # a traced record that fails to decode has its span too
                rec.span = rec.ack = span
        return failures_for(self.flow, self.node, ErrorKind.WIRE, rec, error)
