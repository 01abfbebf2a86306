"""Bytewax sinks of the flow: they store items and release their acks."""

from __future__ import annotations

from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from prometheus_client import Counter

from loom.delivery.acks import Ack
from loom.delivery.transport import OutRecord, Transport, TransportWriter
from loom.streaming.bytewax.records import Outbound, failures_for
from loom.streaming.bytewax.worker import RunState
from loom.streaming.errors import ErrorKind
from loom.streaming.plan import TopicBinding


class TopicSink(DynamicSink[Outbound]):
    """Writes encoded records to a topic through the transport.

    Acks are released by the writer on delivery, not here: a record counts as
    finished only once the broker confirmed it.
    """

    def __init__(
        self,
        transport: Transport,
        binding: TopicBinding,
        run: RunState,
        *,
        flow: str,
        node: str,
        produced: Counter | None = None,
    ) -> None:
        self.transport = transport
        self.binding = binding
        self.run = run
        self.flow = flow
        self.node = node
        self.produced = produced

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WriterPartition:
        worker = self.run.worker(worker_index)

        def refused(record: OutRecord, ack: Ack, error: BaseException) -> None:
            source = record[3]
            if source is None:
                worker.feedback.fail(
                    RuntimeError(
                        f"{self.node}: the broker refused a dead letter for "
                        f"{self.binding.physical!r}: {error}"
                    )
                )
                return
            failures = failures_for(self.flow, self.node, ErrorKind.DELIVERY, source, error)
            worker.feedback.refused(failures)

        writer = self.transport.writer(self.binding.physical, worker_index, refused)
        worker.writers.append(writer)
        return _WriterPartition(writer, self.produced)


class _WriterPartition(StatelessSinkPartition[Outbound]):
    def __init__(self, writer: TransportWriter, produced: Counter | None) -> None:
        self.writer = writer
        self.produced = produced

    def write_batch(self, items: list[Outbound]) -> None:
        for outbound in items:
            if outbound.items:
                self.writer.write(outbound.items, outbound.acks)
                if self.produced is not None:
                    self.produced.inc(len(outbound.items))

    def close(self) -> None:
        self.writer.close()


class AckingSink(DynamicSink[Outbound]):
    """Adapts a user's Bytewax ``DynamicSink`` (a registered sink or an ErrorSink).

    The user's partition receives plain items (``Message`` or
    ``ErrorEnvelope``); once its ``write_batch`` returns, they count as
    finished. If it raises, the run fails and nothing after them is committed.
    """

    def __init__(self, sink: DynamicSink[Any]) -> None:
        if not isinstance(sink, DynamicSink):
            raise TypeError(
                f"{type(sink).__name__} must be a bytewax DynamicSink to be used as a Loom sink"
            )
        self.sink = sink

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _AckingPartition:
        return _AckingPartition(self.sink.build(step_id, worker_index, worker_count))


class _AckingPartition(StatelessSinkPartition[Outbound]):
    def __init__(self, partition: StatelessSinkPartition[Any]) -> None:
        self.partition = partition

    def write_batch(self, items: list[Outbound]) -> None:
        values = [value for outbound in items for value in outbound.items]
        if not values:
            return
        self.partition.write_batch(values)
        for outbound in items:
            for ack in outbound.acks:
                ack.release()

    def close(self) -> None:
        self.partition.close()
