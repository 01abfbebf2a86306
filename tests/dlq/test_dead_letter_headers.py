"""Dead letters carry Kafka Streams' (KIP-1034) and Spring Kafka's header names too."""

from __future__ import annotations

import struct

from loom.streaming import ErrorKind, RecordStep
from loom.streaming.bytewax.operators import dead_letter_record
from loom.streaming.testing import TestRunner
from tests.dlq.support import CODEC, envelope
from tests.runtime.payloads import Order, enrich, enrich_flow


def crash(order: Order) -> Order:
    if order.id == "boom":
        raise RuntimeError("step crashed")
    return order


def dead_letter_headers(flow_steps: tuple[object, ...], value: bytes) -> dict[str, bytes]:
    tester = TestRunner(enrich_flow(*flow_steps))
    tester.send(b"filler")  # offset 0 (a wire error), so the one under test is offset 1
    tester.send(value, key="k1")
    records = tester.run().records("dlq")
    return dict(records[-1].header_list)


def test_a_task_dead_letter_has_the_streams_headers_as_strings() -> None:
    headers = dead_letter_headers(
        (RecordStep(crash), RecordStep(enrich)), b'{"id":"boom","amount":1}'
    )
    assert headers["__streams.errors.exception"] == b"RuntimeError"
    assert headers["__streams.errors.message"] == b"step crashed"
    assert b"in crash" in headers["__streams.errors.stacktrace"]
    assert headers["__streams.errors.topic"] == b"input"
    assert headers["__streams.errors.partition"] == b"0"
    assert headers["__streams.errors.offset"] == b"1"


def test_a_task_dead_letter_has_the_spring_headers_with_binary_partition_and_offset() -> None:
    headers = dead_letter_headers(
        (RecordStep(crash), RecordStep(enrich)), b'{"id":"boom","amount":1}'
    )
    assert headers["kafka_dlt-exception-fqcn"] == b"RuntimeError"
    assert headers["kafka_dlt-exception-message"] == b"step crashed"
    assert b"in crash" in headers["kafka_dlt-exception-stacktrace"]
    assert headers["kafka_dlt-original-topic"] == b"input"
    assert struct.unpack(">i", headers["kafka_dlt-original-partition"]) == (0,)
    assert struct.unpack(">q", headers["kafka_dlt-original-offset"]) == (1,)


def test_a_wire_dead_letter_has_an_empty_stack_trace_header() -> None:
    headers = dead_letter_headers((), b"not json")
    assert headers["__streams.errors.exception"] == b"DecodeError"
    assert headers["__streams.errors.stacktrace"] == b""
    assert headers["kafka_dlt-exception-stacktrace"] == b""


def test_a_record_without_source_has_no_source_coordinate_headers() -> None:
    _, _, headers, _ = dead_letter_record(envelope(1, source=None), CODEC)
    names = {name for name, _ in headers or ()}
    assert "__streams.errors.exception" in names
    assert not names & {"__streams.errors.topic", "kafka_dlt-original-topic"}


def test_interop_headers_of_the_input_are_replaced_not_doubled() -> None:
    old = (("kafka_dlt-exception-fqcn", b"java.lang.IllegalStateException"),)
    item = envelope(1, headers=old, kind=ErrorKind.BUSINESS)
    _, _, headers, _ = dead_letter_record(item, CODEC)
    values = [v for name, v in headers or () if name == "kafka_dlt-exception-fqcn"]
    assert values == [b"ValueError"]
