"""Every ``process`` span ends, once, at the terminal its record reached, with its outcome.

Each input record is sent with its own upstream parent span id (record ``i``
has parent ``i + 1``), so a finished span names the record it traced. A
ledger span processor sees spans start and end: a span that never ends, or a
second ``end()`` (the SDK warns "on an ended span"), fails the test.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import pytest
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import StatusCode

from loom.observability import ObservabilityRuntime
from loom.streaming import (
    BatchStep,
    CollectBatch,
    Drain,
    ErrorKind,
    ExpandStep,
    FromTopic,
    IntoSink,
    IntoTopic,
    Message,
    Process,
    RecordStep,
    Route,
    Router,
    StreamFlow,
    WithAsync,
)
from loom.streaming.testing import MemoryBroker, RunResult, TestRunner
from tests.runtime.payloads import Order, enrich, enrich_flow, orders

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(index: int) -> bytes:
    return f"00-{TRACE_ID}-{index + 1:016x}-01".encode()


class Ledger(SpanProcessor):
    """Every ``process`` span started and every one ended."""

    def __init__(self) -> None:
        self.started: list[Span] = []
        self.ended: list[ReadableSpan] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if span.name.startswith("process"):
            self.started.append(span)

    def on_end(self, span: ReadableSpan) -> None:
        if span.name.startswith("process"):
            self.ended.append(span)


@pytest.fixture
def ledger(observability: ObservabilityRuntime) -> Ledger:
    provider = observability.tracer_provider
    assert isinstance(provider, TracerProvider)
    ledger = Ledger()
    provider.add_span_processor(ledger)
    return ledger


class Traced:
    """A test run whose input records all carry a ``traceparent``."""

    def __init__(
        self,
        flow: StreamFlow[Any, Any],
        observability: ObservabilityRuntime,
        *,
        config: Mapping[str, Any] | None = None,
        broker: MemoryBroker | None = None,
    ) -> None:
        self.tester = TestRunner(
            flow, config=config, broker=broker, observability_runtime=observability
        )

    def run(self, values: Iterable[Any]) -> RunResult:
        for index, value in enumerate(values):
            self.tester.send(value, headers=[("traceparent", traceparent(index))])
        return self.tester.run()


def spans_by_record(
    ledger: Ledger, caplog: pytest.LogCaptureFixture, count: int
) -> dict[int, ReadableSpan]:
    """The ended span of each of ``count`` records; each started span ended exactly once."""
    twice = [r.getMessage() for r in caplog.records if "on an ended span" in r.getMessage()]
    assert twice == []
    assert len(ledger.started) == count
    assert len(ledger.ended) == count, "a process span was not ended"
    spans = {}
    for span in ledger.ended:
        assert span.parent is not None
        spans[span.parent.span_id - 1] = span
    assert sorted(spans) == list(range(count))
    return spans


def attributes(span: ReadableSpan, *names: str) -> tuple[Any, ...]:
    assert span.attributes is not None
    return tuple(span.attributes.get(name) for name in names)


def span_id_of(headers: Sequence[tuple[str, bytes]]) -> str:
    return dict(headers)["traceparent"].decode().split("-")[2]


@pytest.fixture(autouse=True)
def _capture_sdk_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="opentelemetry.sdk.trace")


def test_a_step_that_raises_ends_every_span_and_the_failed_ones_with_error(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def odd_fails(order: Order) -> Order:
        if order.amount % 2:
            raise ValueError(f"odd amount {order.amount}")
        return order

    result = Traced(enrich_flow(RecordStep(odd_fails)), observability).run(orders(4))
    spans = spans_by_record(ledger, caplog, 4)
    assert len(result.records("dlq")) == 2
    for index in (1, 3):
        failed = spans[index]
        assert failed.status.status_code is StatusCode.ERROR
        assert attributes(failed, "loom.outcome", "loom.error.kind", "loom.node") == (
            "dead_lettered",
            ErrorKind.TASK.value,
            "odd_fails",
        )
        [event] = failed.events
        assert event.name == "exception"
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "ValueError"
    for index in (0, 2):
        assert spans[index].status.status_code is StatusCode.OK
        assert attributes(spans[index], "loom.outcome", "loom.node") == (
            "delivered",
            "into_output",
        )


def test_a_dead_letter_carries_the_traceparent_of_its_process_span(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def fails(order: Order) -> Order:
        raise ValueError("no")

    result = Traced(enrich_flow(RecordStep(fails)), observability).run(orders(1))
    [span] = spans_by_record(ledger, caplog, 1).values()
    [dead_letter] = result.records("dlq")
    assert span.context is not None
    assert span_id_of(dead_letter.header_list) == f"{span.context.span_id:016x}"
    assert dict(dead_letter.header_list)["traceparent"].decode().split("-")[1] == TRACE_ID


def test_a_record_the_broker_refuses_ends_its_span_with_a_delivery_error(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def inflate(order: Order) -> Order:
        return Order(order.id * 500, order.amount)

    broker = MemoryBroker(max_message_bytes=700)  # the output is ~1 kB, its dead letter less
    result = Traced(enrich_flow(RecordStep(inflate)), observability, broker=broker).run(orders(1))
    [span] = spans_by_record(ledger, caplog, 1).values()
    assert span.status.status_code is StatusCode.ERROR
    assert attributes(span, "loom.outcome", "loom.error.kind") == (
        "dead_lettered",
        ErrorKind.DELIVERY.value,
    )
    [dead_letter] = result.records("dlq")
    assert span.context is not None
    assert span_id_of(dead_letter.header_list) == f"{span.context.span_id:016x}"


def test_an_undecodable_record_ends_its_span_with_a_wire_error(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    result = Traced(enrich_flow(), observability).run([b"{broken"])
    [span] = spans_by_record(ledger, caplog, 1).values()
    assert span.status.status_code is StatusCode.ERROR
    assert attributes(span, "loom.outcome", "loom.error.kind") == (
        "dead_lettered",
        ErrorKind.WIRE.value,
    )
    [dead_letter] = result.records("dlq")
    assert span.context is not None
    assert span_id_of(dead_letter.header_list) == f"{span.context.span_id:016x}"


def test_a_filtered_record_ends_its_span_as_dropped(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def small_only(order: Order) -> Order | None:
        return order if order.amount < 1 else None

    result = Traced(enrich_flow(RecordStep(small_only)), observability).run(orders(2))
    spans = spans_by_record(ledger, caplog, 2)
    assert len(result.records("output")) == 1
    assert spans[1].status.status_code is StatusCode.OK
    assert attributes(spans[1], "loom.outcome", "loom.drop.reason", "loom.node") == (
        "dropped",
        "filtered",
        "small_only",
    )
    assert attributes(spans[0], "loom.outcome") == ("delivered",)


def test_an_expand_step_returning_nothing_ends_the_span_as_dropped_empty(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def nothing(order: Order) -> list[Order]:
        return []

    Traced(enrich_flow(ExpandStep(nothing)), observability).run(orders(1))
    [span] = spans_by_record(ledger, caplog, 1).values()
    assert span.status.status_code is StatusCode.OK
    assert attributes(span, "loom.outcome", "loom.drop.reason", "loom.node") == (
        "dropped",
        "empty",
        "nothing",
    )


def test_an_expanded_record_is_one_span_its_outputs_all_continue(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def three(order: Order) -> list[Order]:
        return [order] * 3

    result = Traced(enrich_flow(ExpandStep(three)), observability).run(orders(1))
    [span] = spans_by_record(ledger, caplog, 1).values()
    assert span.context is not None
    outputs = result.records("output")
    assert [span_id_of(r.header_list) for r in outputs] == [f"{span.context.span_id:016x}"] * 3
    assert span.status.status_code is StatusCode.OK


def test_an_expanded_record_with_one_failed_child_ends_with_error(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def two(order: Order) -> list[Order]:
        return [order, Order("bad", -1)]

    def refuse_negative(order: Order) -> Order:
        if order.amount < 0:
            raise ValueError("negative")
        return order

    flow = enrich_flow(ExpandStep(two), RecordStep(refuse_negative))
    result = Traced(flow, observability).run(orders(1))
    [span] = spans_by_record(ledger, caplog, 1).values()
    assert (len(result.records("output")), len(result.records("dlq"))) == (1, 1)
    assert span.status.status_code is StatusCode.ERROR
    assert attributes(span, "loom.outcome") == ("dead_lettered",)


def drained_flow() -> StreamFlow[Order, Order]:
    return StreamFlow(
        "drained",
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(enrich), Drain()),
        errors=IntoTopic("dlq"),
    )


def test_records_reaching_drain_end_their_spans_as_dropped_drained(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    Traced(drained_flow(), observability).run(orders(2))
    for span in spans_by_record(ledger, caplog, 2).values():
        assert span.status.status_code is StatusCode.OK
        assert attributes(span, "loom.outcome", "loom.drop.reason") == ("dropped", "drained")


def test_batch_members_spans_end_when_their_batch_is_delivered(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def total(batch: list[Order]) -> list[Order]:
        return [Order("total", sum(order.amount for order in batch))]

    flow = enrich_flow(CollectBatch(3, timeout_ms=60_000), BatchStep(total))
    result = Traced(flow, observability).run(orders(3))
    assert len(result.records("output")) == 1
    for span in spans_by_record(ledger, caplog, 3).values():
        assert span.status.status_code is StatusCode.OK
        assert attributes(span, "loom.outcome") == ("batched",)


def test_a_failed_batch_ends_every_members_span_with_error(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(batch: list[Order]) -> list[Order]:
        raise RuntimeError("batch refused")

    flow = enrich_flow(CollectBatch(3, timeout_ms=60_000), BatchStep(broken))
    result = Traced(flow, observability).run(orders(3))
    assert len(result.records("dlq")) == 3
    for span in spans_by_record(ledger, caplog, 3).values():
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span, "loom.outcome", "loom.node") == ("dead_lettered", "broken")


def test_a_batch_step_returning_nothing_ends_every_members_span_as_dropped(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    def nothing(batch: list[Order]) -> list[Order]:
        return []

    # Not full: the batch leaves on the final flush, in a chunk of no record of its own.
    flow = enrich_flow(CollectBatch(100, timeout_ms=60_000), BatchStep(nothing))
    Traced(flow, observability).run(orders(2))
    for span in spans_by_record(ledger, caplog, 2).values():
        assert attributes(span, "loom.outcome", "loom.drop.reason") == ("dropped", "empty")


def test_routed_records_end_their_spans_at_their_branchs_terminal(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    flow = StreamFlow(
        "routing",
        source=FromTopic("input", payload=Order),
        process=Process(
            Router(
                Route(when=lambda o: o.amount < 10, to=IntoTopic("small")),
                Route(when=lambda o: o.amount < 100, to=Drain()),
                default=Process(RecordStep(enrich), IntoTopic("big")),
            )
        ),
        errors=IntoTopic("dlq"),
    )
    result = Traced(flow, observability).run([Order("s", 1), Order("m", 50), Order("b", 500)])
    spans = spans_by_record(ledger, caplog, 3)
    assert (len(result.records("small")), len(result.records("big"))) == (1, 1)
    assert attributes(spans[0], "loom.outcome", "loom.node") == ("delivered", "into_small")
    assert attributes(spans[1], "loom.outcome", "loom.drop.reason") == ("dropped", "drained")
    assert attributes(spans[2], "loom.outcome", "loom.node") == ("delivered", "into_big")
    assert all(span.status.status_code is StatusCode.OK for span in spans.values())


def test_a_record_no_route_matches_ends_its_span_with_a_routing_error(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    flow = StreamFlow(
        "routing",
        source=FromTopic("input", payload=Order),
        process=Process(Router(Route(when=lambda o: o.amount > 0, to=IntoTopic("positive")))),
        errors=IntoTopic("dlq"),
    )
    Traced(flow, observability).run([Order("zero", 0)])
    [span] = spans_by_record(ledger, caplog, 1).values()
    assert span.status.status_code is StatusCode.ERROR
    assert attributes(span, "loom.error.kind") == (ErrorKind.ROUTING.value,)


class _Partition(StatelessSinkPartition[Any]):
    def __init__(self, store: list[Any], lock: threading.Lock) -> None:
        self.store, self.lock = store, lock

    def write_batch(self, items: list[Any]) -> None:
        with self.lock:
            self.store.extend(items)


class KeepingSink(DynamicSink[Any]):
    """A registered sink type keeping what it receives."""

    sink_type: ClassVar[str] = "keeping"
    store: ClassVar[list[Any]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> DynamicSink[Any]:
        return cls()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(self.store, self.lock)


def test_a_record_written_to_a_registered_sink_ends_its_span_as_written(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    flow = StreamFlow(
        "audited",
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(enrich), IntoSink("keeping")),
        errors=IntoTopic("dlq"),
    )
    config = {"streaming": {"sinks": {"keeping": {"type": "keeping", "options": {}}}}}
    KeepingSink.store.clear()
    traced = Traced(flow, observability, config=config)
    traced.tester.runner.register_sink(KeepingSink)
    traced.run(orders(1))
    [message] = KeepingSink.store
    assert isinstance(message, Message)
    [span] = spans_by_record(ledger, caplog, 1).values()
    assert span.status.status_code is StatusCode.OK
    assert attributes(span, "loom.outcome") == ("written",)


def test_a_record_an_async_step_filters_ends_its_span_as_dropped(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    async def none(order: Order) -> Order | None:
        return None

    Traced(enrich_flow(WithAsync(none), RecordStep(enrich)), observability).run(orders(2))
    for span in spans_by_record(ledger, caplog, 2).values():
        assert attributes(span, "loom.outcome", "loom.drop.reason", "loom.node") == (
            "dropped",
            "filtered",
            "none",
        )


def test_a_record_an_async_step_fails_ends_its_span_with_error(
    observability: ObservabilityRuntime, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    async def refuse(order: Order) -> Order:
        raise ValueError("refused")

    Traced(enrich_flow(WithAsync(refuse), RecordStep(enrich)), observability).run(orders(2))
    for span in spans_by_record(ledger, caplog, 2).values():
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span, "loom.error.kind", "loom.node") == (ErrorKind.TASK.value, "refuse")
