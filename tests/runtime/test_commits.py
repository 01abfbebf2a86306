"""At-least-once commit points: nothing stalls them, nothing advances them early."""

from __future__ import annotations

import threading

from loom.config import ConfigContext
from loom.delivery.acks import GroupAck, WorkerProgress
from loom.streaming import (
    BatchStep,
    CollectBatch,
    ExpandStep,
    RecordStep,
    compile_flow,
)
from loom.streaming.bytewax.source import FlowSource
from loom.streaming.bytewax.worker import RunState, SourceSettings
from loom.streaming.testing import MemoryBroker, MemoryTransport, TestRunner
from tests.runtime.payloads import Order, enrich_flow, orders


def fully_committed(tester: TestRunner, result) -> bool:  # type: ignore[no-untyped-def]
    ends = {
        p: len(tester.broker.partition_records("input", p)) for p in range(tester.broker.partitions)
    }
    return result.committed("input") == {p: end for p, end in ends.items() if end}


def test_filtered_records_do_not_stall_the_commit_point() -> None:
    tester = TestRunner(enrich_flow(RecordStep(lambda order: None)))
    tester.send_all(orders(10))
    result = tester.run()
    assert result.records("output") == []
    assert fully_committed(tester, result)


def test_zero_output_expands_do_not_stall_the_commit_point() -> None:
    tester = TestRunner(enrich_flow(ExpandStep(lambda order: [])))
    tester.send_all(orders(10))
    assert fully_committed(tester, tester.run())


def test_errored_records_are_committed_once_dead_lettered() -> None:
    def fail(order: Order) -> Order:
        raise ValueError(order.id)

    tester = TestRunner(enrich_flow(RecordStep(fail)))
    tester.send_all(orders(10))
    result = tester.run()
    assert len(result.records("dlq")) == 10
    assert fully_committed(tester, result)


def test_batches_commit_every_member() -> None:
    tester = TestRunner(
        enrich_flow(CollectBatch(3, timeout_ms=10), BatchStep(lambda batch: batch[:1])),
        partitions=2,
    )
    tester.send_all(orders(10))
    assert fully_committed(tester, tester.run())


def test_commits_are_batched_not_one_per_record() -> None:
    tester = TestRunner(enrich_flow(), partitions=3)
    tester.send_all(orders(20_000))
    result = tester.run()
    assert fully_committed(tester, result)
    assert 1 <= len(result.commits) <= 5


def test_a_parent_offset_waits_for_every_expand_child() -> None:
    progress = WorkerProgress()
    partition = progress.partition(0)
    parent, sibling = partition.track(0), partition.track(1)
    parent.retain(2)  # three children
    sibling.release()
    parent.release()
    parent.release()
    assert progress.committable() == {}
    parent.release()
    assert progress.committable() == {0: 2}


def test_the_commit_point_never_jumps_over_an_unfinished_offset() -> None:
    progress = WorkerProgress()
    acks = [progress.partition(0).track(offset) for offset in range(5)]
    for ack in (acks[0], acks[2], acks[3]):
        ack.release()
    assert progress.committable() == {0: 1}
    acks[1].release()
    assert progress.committable() == {0: 4}
    assert progress.advance() == 1


def test_a_batch_releases_its_members_only_when_all_outputs_finish() -> None:
    progress = WorkerProgress()
    members = [progress.partition(0).track(offset) for offset in range(3)]
    batch = GroupAck(list(members))
    batch.retain(1)  # two outputs
    batch.release()
    assert progress.committable() == {}
    batch.release()
    assert progress.committable() == {0: 3}


def test_the_source_stops_reading_when_in_flight_records_reach_the_limit() -> None:
    flow = enrich_flow()
    plan = compile_flow(
        flow, ConfigContext.from_dict({"topics": {t: t for t in ("input", "output", "dlq")}})
    )
    broker = MemoryBroker()
    for index in range(100):
        broker.produce("input", b'{"id": "%d", "amount": 1}' % index)
    settings = SourceSettings(max_poll_records=8, max_in_flight=20)
    source = FlowSource(plan, MemoryTransport(broker), RunState(settings))
    partition = source.build("from_input", 0, 1)
    read = 0
    for _ in range(10):  # nothing downstream finishes these records
        read += sum(len(chunk.records) for chunk in partition.next_batch())
    assert read == 24  # three polls of 8, then no more until records finish


class HeldDeadLetters(MemoryTransport):
    """Dead-letter deliveries are confirmed only once the test releases them."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.release = threading.Event()
        self.held = 0

    def writer(self, topic, worker_index, report):  # type: ignore[no-untyped-def]
        writer = super().writer(topic, worker_index, report)
        return _HeldWriter(writer, self) if topic == "dlq" else writer


class _HeldWriter:
    def __init__(self, inner, transport: HeldDeadLetters) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.transport, self.pending = inner, transport, []

    def write(self, records, acks) -> None:  # type: ignore[no-untyped-def]
        self.pending.append((records, acks))
        self.transport.held += len(records)

    def poll(self) -> None:  # called on the worker thread, like delivery reports
        if self.transport.release.is_set():
            for records, acks in self.pending:
                self.inner.write(records, acks)
            self.pending = []

    def flush(self, timeout_s: float) -> None:
        self.poll()

    def close(self) -> None:
        self.inner.close()


def test_nothing_is_committed_before_its_dead_letter_is_delivered() -> None:
    def fail(order: Order) -> Order:
        raise ValueError("always")

    tester = TestRunner(enrich_flow(RecordStep(fail)))
    transport = HeldDeadLetters(tester.broker)
    tester.runner.use_transport(transport)
    tester.transport = transport
    tester.send_all(orders(5))
    seen_while_held: list[dict[int, int]] = []

    def observe(result) -> bool:  # type: ignore[no-untyped-def]
        if transport.held == 5 and not transport.release.is_set():
            seen_while_held.append(result.committed("input"))
            if len(seen_while_held) >= 3:  # several polls passed with letters held
                transport.release.set()
        return transport.release.is_set()

    result = tester.run(until=observe)
    assert seen_while_held
    assert all(committed == {} for committed in seen_while_held)
    assert result.committed("input") == {0: 5}
    assert len(result.records("dlq")) == 5
