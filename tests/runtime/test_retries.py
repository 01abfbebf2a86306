"""Retry on steps: sync steps park failed records, async steps wait in their own task.

The flows run on the real Bytewax runtime with in-memory topics
(``TestRunner``). Steps count their own calls (the ground truth) and fail on
purpose; nothing waits a fixed time: observers poll with deadlines, and
backoffs are a few milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from loom.config import ConfigContext
from loom.graph import mermaid
from loom.observability import ObservabilityRuntime
from loom.observability.metrics import new_registry
from loom.streaming import (
    BatchStep,
    BusinessError,
    CollectBatch,
    ErrorKind,
    ExpandStep,
    FlowValidationError,
    RecordStep,
    Retry,
    WithAsync,
    compile_flow,
)
from loom.streaming.bytewax.runner import BytewaxRuntimeConfig
from loom.streaming.plan import AsyncPlan, StepPlan
from loom.streaming.testing import RunResult, TestRunner
from tests.runtime.payloads import Enriched, Order, enrich, enrich_flow, orders
from tests.runtime.test_async import BACKENDS, Backend


@pytest.fixture(params=BACKENDS, ids=[backend.name for backend in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Async retries on every event loop: asyncio, uvloop and trio."""
    return request.param  # type: ignore[no-any-return]


CONFIG = ConfigContext.from_dict({"topics": {t: t for t in ("input", "output", "dlq")}})


def ids(result: RunResult, topic: str = "output") -> list[str]:
    return [value["id"] for value in result.values(topic)]


def run(
    *steps: object,
    inputs: list[Order],
    runtime: BytewaxRuntimeConfig | None = None,
    **kwargs: Any,
) -> RunResult:
    tester = TestRunner(enrich_flow(*steps), **kwargs)
    tester.send_all(inputs)
    return tester.run(runtime=runtime)


class Flaky:
    """A step failing the first ``failures`` calls of the records in ``ids``.

    ``calls`` counts the calls per record id (every call, first ones included).
    """

    def __init__(self, ids: set[str], failures: int, error: type[Exception] = ConnectionError):
        self.ids = ids
        self.failures = failures
        self.error = error
        self.calls: Counter[str] = Counter()

    def fail(self, order: Order) -> None:
        self.calls[order.id] += 1
        if order.id in self.ids and self.calls[order.id] <= self.failures:
            raise self.error(f"{order.id} failed, call {self.calls[order.id]}")

    def __call__(self, order: Order) -> Enriched:
        self.fail(order)
        return enrich(order)


class AsyncFlaky(Flaky):
    async def call(self, order: Order) -> Enriched:
        self.fail(order)
        await anyio.sleep(0)
        return enrich(order)


# -- compile rules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "problem"),
    [
        (Retry(0, 10), "attempts must be an int >= 1, got 0"),
        (Retry(3, -1), "backoff_ms must be an int >= 0, got -1"),
        (Retry(3, 10, max_backoff_ms=5), "max_backoff_ms must be None or an int >= backoff_ms"),
        (Retry(3, 10, on=ValueError), "on must be a tuple of Exception classes"),  # type: ignore[arg-type]
        (Retry(3, 10, on=(ValueError, "x")), "on must be a tuple of Exception classes"),  # type: ignore[arg-type]
        (Retry(3, 10, on=(KeyboardInterrupt,)), "on must be a tuple of Exception classes"),  # type: ignore[arg-type]
        ("3 times", "retry must be a Retry(...), got '3 times'"),
    ],
)
def test_an_invalid_retry_is_a_compile_problem(retry: Any, problem: str) -> None:
    with pytest.raises(FlowValidationError) as raised:
        compile_flow(enrich_flow(RecordStep(enrich, retry=retry)), CONFIG)
    assert f"RecordStep 'enrich': {problem}" in str(raised.value).replace("Retry ", "")


def test_retry_on_withasync_and_on_the_step_it_wraps_is_a_compile_problem() -> None:
    async def call(order: Order) -> Enriched:
        return enrich(order)

    step = WithAsync(RecordStep(call, retry=Retry(2, 1)), retry=Retry(3, 1))
    with pytest.raises(FlowValidationError, match="retry is set on WithAsync and on the step"):
        compile_flow(enrich_flow(step), CONFIG)


def test_backoff_doubles_up_to_its_cap_without_jitter() -> None:
    plan = compile_flow(
        enrich_flow(RecordStep(enrich, retry=Retry(6, 10, max_backoff_ms=50))), CONFIG
    )
    step = plan.root.steps[0]
    assert isinstance(step, StepPlan)
    assert step.retry is not None
    assert [step.retry.delay_s(made) for made in range(1, 6)] == [0.01, 0.02, 0.04, 0.05, 0.05]


def test_a_single_attempt_compiles_to_no_retry() -> None:
    plan = compile_flow(enrich_flow(RecordStep(enrich, retry=Retry(1, 10))), CONFIG)
    step = plan.root.steps[0]
    assert isinstance(step, StepPlan)
    assert step.retry is None


def test_the_retry_of_a_wrapped_step_is_the_async_nodes_retry() -> None:
    async def call(order: Order) -> Enriched:
        return enrich(order)

    plan = compile_flow(enrich_flow(WithAsync(RecordStep(call, retry=Retry(4, 2)))), CONFIG)
    step = plan.root.steps[0]
    assert isinstance(step, AsyncPlan)
    assert step.retry is not None
    assert step.retry.attempts == 4


def test_loom_graph_draws_the_retry_on_the_step() -> None:
    diagram = mermaid(enrich_flow(RecordStep(enrich, retry=Retry(3, 10, max_backoff_ms=80))))
    assert "RecordStep: enrich<br/>retry 3, backoff 10 ms (max 80)" in diagram
    assert "retry" not in mermaid(enrich_flow(RecordStep(enrich)))


# -- sync steps ---------------------------------------------------------------


def test_a_sync_step_succeeds_after_failures() -> None:
    step = Flaky({"o1"}, failures=2)
    result = run(RecordStep(step, retry=Retry(3, 1)), inputs=orders(3))
    assert sorted(ids(result)) == ["o0", "o1", "o2"]
    assert result.records("dlq") == []
    assert step.calls == {"o0": 1, "o1": 3, "o2": 1}


def test_a_retrying_record_does_not_hold_up_the_rest_of_its_chunk() -> None:
    # The others leave with the first chunk; o1 leaves when its retry
    # succeeds, behind them (the order a sync retry states).
    step = Flaky({"o1"}, failures=2)
    result = run(RecordStep(step, retry=Retry(3, 20)), inputs=orders(5))
    assert ids(result) == ["o0", "o2", "o3", "o4", "o1"]


def test_parked_records_are_retried_in_the_order_they_failed() -> None:
    step = Flaky({"o1", "o3", "o4"}, failures=1)
    result = run(RecordStep(step, retry=Retry(2, 5)), inputs=orders(6))
    assert ids(result) == ["o0", "o2", "o5", "o1", "o3", "o4"]


def test_an_expand_step_is_retried_without_partial_output() -> None:
    calls: Counter[str] = Counter()

    def twice(order: Order) -> list[Enriched]:
        calls[order.id] += 1
        first = enrich(order)
        if calls[order.id] == 1:
            raise ConnectionError("half way")
        return [first, enrich(Order(order.id + "b", order.amount))]

    result = run(ExpandStep(twice, retry=Retry(2, 1)), inputs=orders(2))
    assert sorted(ids(result)) == ["o0", "o0b", "o1", "o1b"]


def test_exhausted_retries_dead_letter_the_record_with_its_attempt_count() -> None:
    step = Flaky({"o1"}, failures=99)
    result = run(RecordStep(step, retry=Retry(3, 1)), inputs=orders(3))
    [letter] = result.dead_letters("dlq")
    assert (letter.kind, letter.offset, letter.attempt) == (ErrorKind.TASK, 1, 3)
    assert letter.exception_type == "ConnectionError"
    assert letter.message == "o1 failed, call 3"
    assert step.calls["o1"] == 3


def test_the_attempt_count_adds_to_the_inputs_attempt_header() -> None:
    tester = TestRunner(enrich_flow(RecordStep(Flaky({"o0"}, failures=99), retry=Retry(3, 1))))
    tester.send(Order("o0", 1.0), headers=[("loom-attempt", b"2")])
    [letter] = tester.run().dead_letters("dlq")
    assert letter.attempt == 5  # 2 before this run, 3 calls in it


def test_a_batch_is_called_again_and_each_member_dead_lettered_with_the_count() -> None:
    calls = 0

    def fail(batch: list[Order]) -> list[Enriched]:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    result = run(
        CollectBatch(max_records=3, timeout_ms=50),
        BatchStep(fail, retry=Retry(2, 1)),
        inputs=orders(3),
    )
    assert calls == 2
    assert [(letter.offset, letter.attempt) for letter in result.dead_letters("dlq")] == [
        (0, 2),
        (1, 2),
        (2, 2),
    ]


def test_only_the_listed_exceptions_are_retried() -> None:
    step = Flaky({"o0"}, failures=1, error=ValueError)
    result = run(RecordStep(step, retry=Retry(3, 1, on=(ConnectionError,))), inputs=orders(1))
    [letter] = result.dead_letters("dlq")
    assert (letter.exception_type, letter.attempt) == ("ValueError", 1)
    assert step.calls["o0"] == 1


def test_a_business_error_is_not_retried_by_default() -> None:
    step = Flaky({"o0"}, failures=1, error=BusinessError)
    result = run(RecordStep(step, retry=Retry(3, 1)), inputs=orders(1))
    [letter] = result.dead_letters("dlq")
    assert (letter.kind, letter.attempt) == (ErrorKind.BUSINESS, 1)
    assert step.calls["o0"] == 1


def test_a_listed_business_error_is_retried() -> None:
    step = Flaky({"o0"}, failures=1, error=BusinessError)
    result = run(RecordStep(step, retry=Retry(3, 1, on=(BusinessError,))), inputs=orders(1))
    assert ids(result) == ["o0"]
    assert step.calls["o0"] == 2


def test_the_commit_point_stays_below_a_record_waiting_for_a_retry() -> None:
    # o0 is committed first; o1 then keeps failing while o2, read after it,
    # finishes: the commit point must stay at o1 until o1's retry succeeds.
    release = threading.Event()
    failures: Counter[str] = Counter()

    def step(order: Order) -> Enriched:
        if order.id == "o1" and not release.is_set():
            failures["o1"] += 1
            raise ConnectionError("still down")
        return enrich(order)

    tester = TestRunner(enrich_flow(RecordStep(step, retry=Retry(10_000, 1))))
    tester.send(Order("o0", 0.0))
    seen: list[dict[int, int]] = []

    def observe(result: RunResult) -> bool:
        committed = result.committed("input")
        sent = len(tester.broker.records("input"))
        if sent == 1 and committed == {0: 1}:
            tester.send(Order("o1", 1.0))
        elif sent == 2 and failures["o1"] >= 2:
            tester.send(Order("o2", 2.0))  # read in a later poll than o1
        elif sent == 3 and len(result.records("output")) == 2 and not release.is_set():
            seen.append(committed)
            if len(seen) >= 20:  # ~100 ms of loop turns: past the idle commit interval
                release.set()
        return len(result.records("output")) == 3

    result = tester.run(until=observe, timeout_s=20)
    assert failures["o1"] >= 2
    assert len(seen) >= 20
    assert all(committed == {0: 1} for committed in seen)
    assert ids(result) == ["o0", "o2", "o1"]
    assert result.committed("input") == {0: 3}


def test_retries_are_counted_in_a_metric() -> None:
    observability = ObservabilityRuntime(registry=new_registry(process_metrics=False))
    step = Flaky({"o1", "o2"}, failures=2)
    tester = TestRunner(
        enrich_flow(RecordStep(step, retry=Retry(3, 1))), observability_runtime=observability
    )
    tester.send_all(orders(4))
    tester.run()
    labels = {"flow": "orders", "node": "Flaky"}
    retries = observability.registry.get_sample_value("loom_step_retries_total", labels)
    assert retries == sum(step.calls.values()) - 4 == 4


# -- async steps --------------------------------------------------------------


def test_an_async_step_succeeds_after_failures(backend: Backend) -> None:
    step = AsyncFlaky({"o1"}, failures=2)
    result = run(WithAsync(step.call, retry=Retry(3, 1)), inputs=orders(3), runtime=backend.runtime)
    assert ids(result) == ["o0", "o1", "o2"]  # input order, as without retry
    assert step.calls == {"o0": 1, "o1": 3, "o2": 1}


def test_an_async_retry_waits_without_holding_up_the_other_slots() -> None:
    # o0 waits 400 ms for its retry; the three others go through the second
    # slot meanwhile, so they are all done when o0's second call starts.
    done: list[str] = []
    done_at_retry: list[int] = []
    calls: Counter[str] = Counter()

    async def call(order: Order) -> Enriched:
        calls[order.id] += 1
        if order.id == "o0":
            if calls["o0"] == 1:
                raise ConnectionError("down")
            done_at_retry.append(len(done))
        done.append(order.id)
        return enrich(order)

    result = run(WithAsync(call, max_concurrency=2, retry=Retry(2, 400)), inputs=orders(4))
    assert done_at_retry == [3]
    assert ids(result) == ["o0", "o1", "o2", "o3"]  # results still in input order


def test_an_async_retry_waiting_for_its_backoff_holds_its_slot() -> None:
    events: list[str] = []
    calls: Counter[str] = Counter()

    async def call(order: Order) -> Enriched:
        calls[order.id] += 1
        events.append(f"{order.id}#{calls[order.id]}")
        if order.id == "o0" and calls["o0"] < 3:
            raise ConnectionError("down")
        return enrich(order)

    run(WithAsync(call, max_concurrency=1, retry=Retry(3, 5)), inputs=orders(2))
    assert events == ["o0#1", "o0#2", "o0#3", "o1#1"]


def test_an_async_timeout_is_retried(backend: Backend) -> None:
    calls: Counter[str] = Counter()

    async def slow_once(order: Order) -> Enriched:
        calls[order.id] += 1
        if calls[order.id] == 1:
            await anyio.sleep(60)
        return enrich(order)

    started = time.monotonic()
    result = run(
        WithAsync(slow_once, timeout_ms=50, retry=Retry(2, 1)),
        inputs=orders(2),
        runtime=backend.runtime,
    )
    assert time.monotonic() - started < 30  # the hung calls were cut by the timeout
    assert ids(result) == ["o0", "o1"]
    assert result.records("dlq") == []
    assert calls == {"o0": 2, "o1": 2}


def test_async_timeouts_exhausting_the_retries_are_dead_lettered_with_the_count() -> None:
    async def hang(order: Order) -> Enriched:
        await anyio.sleep(60)
        return enrich(order)

    result = run(WithAsync(hang, timeout_ms=20, retry=Retry(3, 1)), inputs=orders(1))
    [letter] = result.dead_letters("dlq")
    assert (letter.kind, letter.attempt) == (ErrorKind.TIMEOUT, 3)


def test_an_async_timeout_is_not_retried_when_on_does_not_list_it() -> None:
    calls = 0

    async def hang(order: Order) -> Enriched:
        nonlocal calls
        calls += 1
        await anyio.sleep(60)
        return enrich(order)

    step = WithAsync(hang, timeout_ms=20, retry=Retry(3, 1, on=(ConnectionError,)))
    [letter] = run(step, inputs=orders(1)).dead_letters("dlq")
    assert (letter.kind, letter.attempt, calls) == (ErrorKind.TIMEOUT, 1, 1)


def test_the_commit_point_stays_below_an_async_record_waiting_for_a_retry() -> None:
    release = threading.Event()
    failures: Counter[str] = Counter()

    async def call(order: Order) -> Enriched:
        if order.id == "o1" and not release.is_set():
            failures["o1"] += 1
            raise ConnectionError("still down")
        return enrich(order)

    tester = TestRunner(enrich_flow(WithAsync(call, retry=Retry(10_000, 1))))
    tester.send(Order("o0", 0.0))
    seen: list[dict[int, int]] = []

    def observe(result: RunResult) -> bool:
        committed = result.committed("input")
        sent = len(tester.broker.records("input"))
        if sent == 1 and committed == {0: 1}:
            tester.send(Order("o1", 1.0))
        elif sent == 2 and failures["o1"] >= 2:
            tester.send(Order("o2", 2.0))
        elif sent == 3 and failures["o1"] >= 4 and not release.is_set():
            seen.append(committed)
            if len(seen) >= 20:
                release.set()
        return len(result.records("output")) == 3

    result = tester.run(until=observe, timeout_s=20)
    assert len(seen) >= 20
    assert all(committed == {0: 1} for committed in seen)
    assert ids(result) == ["o0", "o1", "o2"]
    assert result.committed("input") == {0: 3}


def test_async_retries_are_counted_in_a_metric() -> None:
    observability = ObservabilityRuntime(registry=new_registry(process_metrics=False))
    step = AsyncFlaky({"o0", "o3"}, failures=1)
    tester = TestRunner(
        enrich_flow(WithAsync(step.call, name="call", retry=Retry(2, 1))),
        observability_runtime=observability,
    )
    tester.send_all(orders(4))
    tester.run()
    labels = {"flow": "orders", "node": "call"}
    retries = observability.registry.get_sample_value("loom_step_retries_total", labels)
    assert retries == sum(step.calls.values()) - 4 == 2


# -- traced records -----------------------------------------------------------


def test_a_traced_record_retried_on_a_later_tick_ends_its_span_once_delivered(
    observability: ObservabilityRuntime, exporter: InMemorySpanExporter
) -> None:
    step = Flaky({"o1"}, failures=1)
    tester = TestRunner(
        enrich_flow(RecordStep(step, retry=Retry(2, 20))), observability_runtime=observability
    )
    for index, order in enumerate(orders(2)):
        parent = f"00-{'ab' * 16}-{index + 1:016x}-01".encode()
        tester.send(order, headers=[("traceparent", parent)])
    result = tester.run()
    spans = {
        span.parent.span_id - 1: span
        for span in exporter.get_finished_spans()
        if span.name.startswith("process") and span.parent is not None
    }
    assert sorted(spans) == [0, 1]
    retried = spans[1]
    assert retried.attributes is not None
    assert retried.attributes.get("loom.outcome") == "delivered"
    assert retried.status.status_code is StatusCode.OK
    [output] = [r for r in result.records("output") if b'"o1"' in (r.value_bytes or b"")]
    assert f"{retried.context.span_id:016x}" in dict(output.header_list)["traceparent"].decode()
