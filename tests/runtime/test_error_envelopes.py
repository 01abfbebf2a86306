"""Every error kind reaches its error route as a complete ErrorEnvelope."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
from datetime import UTC, datetime

import msgspec
import pytest

from loom.streaming import (
    BusinessError,
    Drain,
    ErrorEnvelope,
    ErrorKind,
    FromTopic,
    IntoTopic,
    Process,
    RecordStep,
    Route,
    Router,
    StreamFlow,
    WithAsync,
)
from loom.streaming.bytewax.records import format_traceback
from loom.streaming.errors import TRACEBACK_FRAMES, TRACEBACK_MAX_CHARS
from loom.streaming.testing import MemoryBroker, TestRunner
from tests.runtime.payloads import Enriched, Order, enrich, enrich_flow


def reject_negative(order: Order) -> Order:
    if order.amount < 0:
        raise BusinessError("negative amounts are refused")
    if order.id == "boom":
        raise RuntimeError("step crashed")
    return order


def single_failure(
    flow: StreamFlow[Order, Enriched], value: object, **kwargs: object
) -> ErrorEnvelope:
    tester = TestRunner(flow, **kwargs)  # type: ignore[arg-type]
    tester.send(value, key="k1", headers=[("h", b"v")])
    started = datetime.now(UTC)
    result = tester.run()
    finished = datetime.now(UTC)
    [envelope] = result.dead_letters("dlq")
    assert result.committed("input") == {0: 1}
    assert started <= envelope.occurred_at <= finished
    return envelope


def assert_source_coordinates(envelope: ErrorEnvelope) -> None:
    assert (envelope.topic, envelope.partition, envelope.offset) == ("input", 0, 0)
    assert envelope.key == b"k1"
    assert envelope.headers == (("h", b"v"),)
    assert envelope.timestamp_ms is not None
    assert envelope.flow == "orders"
    assert envelope.attempt == 1


def test_undecodable_bytes_are_a_wire_error_with_the_original_bytes() -> None:
    envelope = single_failure(enrich_flow(), b"\xff\x00not json")
    assert envelope.kind is ErrorKind.WIRE
    assert envelope.node == "from_input"
    assert envelope.value == b"\xff\x00not json"
    assert "malformed" in envelope.message
    assert_source_coordinates(envelope)


def test_json_of_the_wrong_shape_is_a_wire_error() -> None:
    envelope = single_failure(enrich_flow(), b'{"id": 1, "amount": "x"}')
    assert envelope.kind is ErrorKind.WIRE
    assert "Expected `str`" in envelope.message
    assert envelope.value == b'{"id": 1, "amount": "x"}'


def test_a_tombstone_is_a_wire_error_and_does_not_stop_the_flow() -> None:
    tester = TestRunner(enrich_flow())
    tester.send(None)
    tester.send(Order("after", 1))
    result = tester.run()
    [envelope] = result.dead_letters("dlq")
    assert (envelope.kind, envelope.value) == (ErrorKind.WIRE, None)
    assert [v["id"] for v in result.values("output")] == ["after"]


def test_a_raising_step_is_a_task_error() -> None:
    envelope = single_failure(enrich_flow(RecordStep(reject_negative)), Order("boom", 1))
    assert (envelope.kind, envelope.node) == (ErrorKind.TASK, "reject_negative")
    assert (envelope.exception_type, envelope.message) == ("RuntimeError", "step crashed")
    assert json.loads(envelope.value or b"") == {"id": "boom", "amount": 1.0}
    assert_source_coordinates(envelope)


def test_a_business_error_is_a_business_error() -> None:
    envelope = single_failure(enrich_flow(RecordStep(reject_negative)), Order("n", -5))
    assert envelope.kind is ErrorKind.BUSINESS
    assert envelope.message == "negative amounts are refused"
    assert_source_coordinates(envelope)


def test_an_unmatched_record_is_a_routing_error() -> None:
    flow = enrich_flow(Router(Route(when=lambda o: o.amount > 0, to=Drain())))
    flow = StreamFlow("orders", source=flow.source, process=flow.process, errors=flow.errors)
    envelope = single_failure(flow, Order("zero", 0))
    assert (envelope.kind, envelope.node) == (ErrorKind.ROUTING, "router")
    assert_source_coordinates(envelope)


def test_a_record_the_broker_refuses_is_a_delivery_error() -> None:
    def inflate(order: Order) -> Order:
        return Order(order.id * 500, order.amount)

    envelope = single_failure(
        enrich_flow(RecordStep(inflate)), Order("x", 1), broker=MemoryBroker(max_message_bytes=400)
    )
    assert (envelope.kind, envelope.node) == (ErrorKind.DELIVERY, "into_output")
    assert envelope.exception_type == "MessageTooLarge"
    assert_source_coordinates(envelope)


def test_an_async_step_over_its_timeout_is_a_timeout_error() -> None:
    async def slow(order: Order) -> Order:
        await asyncio.sleep(10)
        return order

    envelope = single_failure(
        enrich_flow(WithAsync(slow, max_concurrency=2, timeout_ms=20), RecordStep(enrich)),
        Order("slow", 1),
    )
    assert (envelope.kind, envelope.node) == (ErrorKind.TIMEOUT, "slow")
    assert_source_coordinates(envelope)


def test_an_output_of_the_wrong_type_is_a_task_error_not_a_leak() -> None:
    flow = StreamFlow(
        "orders",
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(lambda order: order)),
        output=IntoTopic("output", payload=Enriched),
        errors=IntoTopic("dlq"),
    )
    envelope = single_failure(flow, Order("same", 1))
    assert (envelope.kind, envelope.node) == (ErrorKind.TASK, "into_output")
    assert "expects Enriched records, got Order" in envelope.message


def test_dead_letter_json_carries_base64_bytes_and_coordinates_in_headers() -> None:
    tester = TestRunner(enrich_flow())
    tester.send(b"\x00raw", key="k1")
    [record] = tester.run().records("dlq")
    body = json.loads(record.value_bytes or b"")
    assert base64.b64decode(body["value"]) == b"\x00raw"
    assert body["kind"] == "wire"
    headers = dict(record.header_list)
    assert headers["loom-error-kind"] == b"wire"
    assert headers["loom-source-topic"] == b"input"
    assert headers["loom-source-offset"] == b"0"
    assert record.key_bytes == b"k1"


def test_a_replayed_dead_letter_counts_its_attempts() -> None:
    tester = TestRunner(enrich_flow())
    tester.send(b"bad", headers=[("loom-attempt", b"2")])
    [envelope] = tester.run().dead_letters("dlq")
    assert envelope.attempt == 3


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_each_kind_can_be_routed_to_its_own_topic(kind: ErrorKind) -> None:
    routes = {k: IntoTopic("dlq" if k is kind else "other") for k in ErrorKind}
    flow = StreamFlow(
        "orders",
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(enrich)),
        output=IntoTopic("output"),
        errors=routes,  # type: ignore[arg-type]
    )
    tester = TestRunner(flow)
    tester.send(b"not json")
    result = tester.run()
    expected = "dlq" if kind is ErrorKind.WIRE else "other"
    assert len(result.records(expected)) == 1
    assert msgspec.json.decode(result.records(expected)[0].value_bytes or b"")["kind"] == "wire"


# -- tracebacks ---------------------------------------------------------------


def line_of(function: object, text: str) -> str:
    """``file:line`` of the line of ``function`` containing ``text``."""
    lines, first = inspect.getsourcelines(function)  # type: ignore[arg-type]
    [offset] = [i for i, line in enumerate(lines) if text in line]
    return f"{inspect.getsourcefile(function)}:{first + offset}"  # type: ignore[arg-type]


def test_a_task_error_envelope_carries_a_traceback_ending_at_the_raising_line() -> None:
    envelope = single_failure(enrich_flow(RecordStep(reject_negative)), Order("boom", 1))
    assert envelope.traceback is not None
    innermost = envelope.traceback.splitlines()[-1]
    assert innermost == f"{line_of(reject_negative, 'step crashed')} in reject_negative"


def test_a_business_error_envelope_carries_a_traceback_too() -> None:
    envelope = single_failure(enrich_flow(RecordStep(reject_negative)), Order("n", -5))
    assert envelope.traceback is not None
    innermost = envelope.traceback.splitlines()[-1]
    assert innermost == f"{line_of(reject_negative, 'are refused')} in reject_negative"


async def stuck(order: Order) -> Order:
    await asyncio.sleep(10)
    return order


def test_a_timeout_envelope_names_where_the_call_was_waiting() -> None:
    flow = enrich_flow(WithAsync(stuck, max_concurrency=2, timeout_ms=20), RecordStep(enrich))
    envelope = single_failure(flow, Order("slow", 1))
    assert envelope.kind is ErrorKind.TIMEOUT
    assert envelope.traceback is not None
    assert f"{line_of(stuck, 'asyncio.sleep')} in stuck" in envelope.traceback.splitlines()


def test_a_wire_envelope_has_no_traceback() -> None:
    envelope = single_failure(enrich_flow(), b"not json")
    assert envelope.kind is ErrorKind.WIRE
    assert envelope.traceback is None


def test_the_traceback_keeps_the_innermost_frames_only() -> None:
    def descend(depth: int) -> Order:
        if depth == 0:
            raise RuntimeError("bottom")
        return descend(depth - 1)

    def deep(order: Order) -> Order:
        return descend(50)

    envelope = single_failure(enrich_flow(RecordStep(deep)), Order("deep", 1))
    assert envelope.traceback is not None
    lines = envelope.traceback.splitlines()
    assert len(lines) == TRACEBACK_FRAMES + 1
    assert lines[0].endswith("outer frames omitted)")
    assert all(
        line.endswith("in test_the_traceback_keeps_the_innermost_frames_only.<locals>.descend")
        for line in lines[1:]
    )
    assert len(envelope.traceback) <= TRACEBACK_MAX_CHARS


def test_a_long_traceback_is_cut_to_its_bound_keeping_the_innermost_line() -> None:
    def fail() -> None:
        raise RuntimeError("x")

    try:
        fail()
    except RuntimeError as exc:
        full = format_traceback(exc.__traceback__)
        assert full is not None
        innermost = full.splitlines()[-1]
        bound = len(innermost) + 10
        cut = format_traceback(exc.__traceback__, max_chars=bound)
    assert len(full) > bound
    assert cut is not None
    assert len(cut) == bound
    assert cut.startswith("...")
    assert cut.endswith("\n" + innermost)


def test_the_traceback_is_in_the_dead_letter_json() -> None:
    tester = TestRunner(enrich_flow(RecordStep(reject_negative)))
    tester.send(Order("boom", 1))
    [record] = tester.run().records("dlq")
    body = json.loads(record.value_bytes or b"")
    assert body["traceback"].splitlines()[-1].endswith(" in reject_negative")
