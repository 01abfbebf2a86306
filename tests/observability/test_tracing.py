"""W3C trace context crosses the flow: input headers -> output and dead-letter records."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loom.observability import ObservabilityRuntime, Scope
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import Order, enrich_flow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def traceparent(headers: tuple[tuple[str, bytes], ...]) -> str:
    return dict(headers)["traceparent"].decode()


def test_an_output_record_continues_the_trace_of_its_input(
    exporter: InMemorySpanExporter, observability: ObservabilityRuntime
) -> None:
    tester = TestRunner(enrich_flow(), observability_runtime=observability)
    tester.send(Order("t", 1), headers=[("traceparent", PARENT.encode())])
    [record] = tester.run().records("output")
    version, trace_id, span_id, flags = traceparent(record.header_list).split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    [process] = [s for s in exporter.get_finished_spans() if s.name == "process orders"]
    assert process.context is not None
    assert process.parent is not None
    assert f"{process.context.span_id:016x}" == span_id
    assert f"{process.parent.span_id:016x}" == "00f067aa0ba902b7"


def test_a_dead_letter_keeps_the_trace_of_its_input(observability: ObservabilityRuntime) -> None:
    tester = TestRunner(enrich_flow(), observability_runtime=observability)
    tester.send(b"{broken", headers=[("traceparent", PARENT.encode())])
    [record] = tester.run().records("dlq")
    assert traceparent(record.header_list).split("-")[1] == TRACE_ID


def test_records_without_trace_context_get_no_record_span(
    exporter: InMemorySpanExporter, observability: ObservabilityRuntime
) -> None:
    tester = TestRunner(enrich_flow(), observability_runtime=observability)
    tester.send(Order("plain", 1))
    [record] = tester.run().records("output")
    assert "traceparent" not in dict(record.header_list)
    assert not [s for s in exporter.get_finished_spans() if s.name.startswith("process")]


def test_source_polls_are_traced_as_batch_spans_when_sampled(
    exporter: InMemorySpanExporter, observability: ObservabilityRuntime
) -> None:
    tester = TestRunner(enrich_flow(), observability_runtime=observability)
    tester.send_all([Order(str(i), i) for i in range(5)])
    tester.run()
    [batch] = [s for s in exporter.get_finished_spans() if s.name == "batch orders"]
    assert batch.attributes is not None
    assert batch.attributes["loom.scope"] == Scope.BATCH.value
    assert batch.attributes["messaging.batch.message_count"] == 5
