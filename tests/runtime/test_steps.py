"""Record, expand and batch steps on real cli_main runs (in-memory topics)."""

from __future__ import annotations

import threading
from collections import Counter

from loom.streaming import (
    BatchStep,
    CollectBatch,
    ExpandStep,
    Message,
    RecordStep,
)
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import Enriched, Order, enrich, enrich_flow, orders


def run(flow, inputs, **kwargs):  # type: ignore[no-untyped-def]
    tester = TestRunner(flow, **kwargs)
    tester.send_all(inputs)
    return tester.run()


def test_record_step_transforms_every_record_into_the_output_type() -> None:
    result = run(enrich_flow(), orders(3, start=99))
    assert result.values("output", Enriched) == [
        Enriched("o99", 99.0, False),
        Enriched("o100", 100.0, True),
        Enriched("o101", 101.0, True),
    ]


def test_record_step_returning_none_drops_the_record() -> None:
    def only_even(order: Order) -> Order | None:
        return order if int(order.id[1:]) % 2 == 0 else None

    result = run(enrich_flow(RecordStep(only_even)), orders(6))
    assert [v["id"] for v in result.values("output")] == ["o0", "o2", "o4"]
    assert result.records("dlq") == []


def test_output_keeps_the_input_key_and_headers() -> None:
    tester = TestRunner(enrich_flow())
    tester.send(Order("a", 1), key="k-a", headers=[("trace", b"t1")])
    result = tester.run()
    [record] = result.records("output")
    assert record.key_bytes == b"k-a"
    assert ("trace", b"t1") in record.header_list


def test_a_step_can_read_and_set_key_and_headers_through_message() -> None:
    def rekey(message: Message[Order]) -> Message[Order]:
        assert message.meta is not None
        assert message.meta.topic == "input"
        return Message(message.payload, key=message.payload.id.encode(), headers=(("x", b"1"),))

    result = run(enrich_flow(RecordStep(rekey), RecordStep(enrich)), [Order("z", 1)])
    [record] = result.records("output")
    assert (record.key_bytes, record.header_list) == (b"z", (("x", b"1"),))


def test_expand_step_emits_zero_one_or_many_records_per_input() -> None:
    def split(order: Order) -> list[Order]:
        return [Order(f"{order.id}.{i}", order.amount) for i in range(int(order.amount))]

    result = run(enrich_flow(ExpandStep(split)), [Order("a", 0), Order("b", 1), Order("c", 3)])
    assert [v["id"] for v in result.values("output")] == ["b.0", "c.0", "c.1", "c.2"]
    assert result.committed("input") == {0: 3}


def test_expand_step_accepts_a_generator() -> None:
    def twice(order: Order):  # type: ignore[no-untyped-def]
        yield order
        yield order

    result = run(enrich_flow(ExpandStep(twice)), orders(2))
    assert len(result.values("output")) == 4


def test_collect_batch_emits_full_batches_of_max_records() -> None:
    sizes: list[int] = []

    def total(batch: list[Order]) -> list[Order]:
        sizes.append(len(batch))
        return [Order(f"sum{len(sizes)}", sum(o.amount for o in batch))]

    result = run(enrich_flow(CollectBatch(4, timeout_ms=60_000), BatchStep(total)), orders(10))
    assert sizes[:2] == [4, 4]
    assert sum(sizes) == 10
    assert [v["amount"] for v in result.values("output")] == [6.0, 22.0, 17.0]


def test_collect_batch_emits_a_partial_batch_when_its_timeout_passes() -> None:
    sizes: list[int] = []

    def count(batch: list[Order]) -> list[Order]:
        sizes.append(len(batch))
        return batch

    tester = TestRunner(enrich_flow(CollectBatch(1000, timeout_ms=20), BatchStep(count)))
    tester.send_all(orders(3))
    # The input stays open until the outputs appear: only the timeout can emit them.
    result = tester.run(until=lambda r: len(r.records("output")) == 3)
    assert sizes == [3]
    assert len(result.values("output")) == 3


def test_batch_step_receives_messages_when_annotated() -> None:
    seen: list[str] = []

    def keys(batch: list[Message[Order]]) -> list[Order]:
        seen.extend((m.key or b"").decode() for m in batch)
        return [m.payload for m in batch]

    tester = TestRunner(enrich_flow(CollectBatch(10, timeout_ms=50), BatchStep(keys)))
    for order in orders(3):
        tester.send(order, key=order.id)
    tester.run()
    assert seen == ["o0", "o1", "o2"]


def test_two_workers_produce_the_same_outputs_as_one() -> None:
    from loom.streaming.bytewax.runner import BytewaxRuntimeConfig

    threads: set[int] = set()

    def split(order: Order) -> list[Order]:
        threads.add(threading.get_ident())
        return [order] * (int(order.amount) % 3)

    results = []
    for workers in (1, 2):
        tester = TestRunner(enrich_flow(ExpandStep(split), RecordStep(enrich)), partitions=4)
        tester.send_all(orders(200))
        result = tester.run(runtime=BytewaxRuntimeConfig(workers_per_process=workers))
        results.append(Counter(r.value_bytes for r in result.records("output")))
        assert len(threads) == workers
        threads.clear()
        assert result.committed("input") == {
            p: len(tester.broker.partition_records("input", p)) for p in range(4)
        }
    assert results[0] == results[1]
    assert sum(results[0].values()) == sum(i % 3 for i in range(200))
