"""StreamingRunner.run(): spans, preparation, reconfiguration and shutdown."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from loom.observability import ObservabilityRuntime
from loom.streaming import (
    FromTopic,
    IntoSink,
    IntoTopic,
    Process,
    RecordStep,
    StreamFlow,
    WithAsync,
)
from loom.streaming.bytewax.runner import StreamingRunner
from loom.streaming.testing import RunResult, TestRunner
from tests.runtime.payloads import Order, enrich, enrich_flow, orders


class ExplodingSink(DynamicSink[Any]):
    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> DynamicSink[Any]:
        return cls()

    def build(self, step_id: str, worker_index: int, worker_count: int) -> Any:
        return ExplodingPartition()


class ExplodingPartition(StatelessSinkPartition[Any]):
    def write_batch(self, items: list[Any]) -> None:
        raise OSError("sink is down")


def causes(error: BaseException | None) -> list[str]:
    found = []
    while error is not None:
        found.append(str(error))
        error = error.__cause__ or error.__context__
    return found


def sink_flow() -> StreamFlow[Order, Order]:
    return StreamFlow(
        "orders",
        source=FromTopic("input", payload=Order),
        process=Process(IntoSink("audit")),
        errors=IntoTopic("dlq"),
    )


SINK_CONFIG = {"streaming": {"sinks": {"audit": {"type": "ExplodingSink"}}}}


def test_a_run_failing_while_preparing_records_the_error_on_the_poll_cycle_span(
    exporter: InMemorySpanExporter, observability: ObservabilityRuntime
) -> None:
    tester = TestRunner(sink_flow(), config=SINK_CONFIG, observability_runtime=observability)
    with pytest.raises(LookupError, match="not registered"):
        tester.run()
    [cycle] = exporter.get_finished_spans()
    assert cycle.name == "poll_cycle orders"
    assert cycle.status.status_code is StatusCode.ERROR
    assert [event.name for event in cycle.events] == ["exception"]


def test_a_run_failing_while_executing_records_the_error_on_both_spans(
    exporter: InMemorySpanExporter, observability: ObservabilityRuntime
) -> None:
    tester = TestRunner(sink_flow(), config=SINK_CONFIG, observability_runtime=observability)
    tester.runner.register_sink(ExplodingSink)
    tester.send(Order("a", 1))
    with pytest.raises(Exception) as failure:  # noqa: PT011 - Bytewax wraps the sink's error
        tester.run()
    assert "sink is down" in causes(failure.value)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    for name in ("flow orders", "poll_cycle orders"):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert "exception" in [event.name for event in spans[name].events]


async def same_order(order: Order) -> Order:
    return order


def test_prepare_run_twice_releases_the_first_preparation() -> None:
    tester = TestRunner(enrich_flow(WithAsync(same_order), RecordStep(enrich)))
    before = set(threading.enumerate())
    first = tester.runner.prepare_run()
    [first_loop] = set(threading.enumerate()) - before  # the async step's event loop
    try:
        second = tester.runner.prepare_run()
        assert first.dataflow is not second.dataflow
        assert not first_loop.is_alive(), "the first preparation's event loop still runs"
    finally:  # a leaked loop thread would keep the test process from exiting
        first.shutdown()
        tester.runner.shutdown()


def test_build_dataflow_returns_a_bytewax_dataflow_named_after_the_flow() -> None:
    tester = TestRunner(enrich_flow())
    dataflow = tester.runner.build_dataflow()
    assert dataflow.flow_id == "orders"
    tester.runner.shutdown()


def test_run_with_a_new_flow_reconfigures_the_runner() -> None:
    tester = TestRunner(enrich_flow())
    tester.send_all(orders(2))
    shout = enrich_flow(RecordStep(lambda order: Order(order.id.upper(), order.amount)))
    tester.runner.run(flow=shout, config=tester.config)
    assert [
        record["id"] for record in RunResult(tester.broker, tester.config).values("output")
    ] == ["O0", "O1"]


def test_a_runner_without_flow_says_so() -> None:
    with pytest.raises(RuntimeError, match="no flow"):
        StreamingRunner().build_dataflow()
