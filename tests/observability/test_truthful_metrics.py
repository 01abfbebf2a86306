"""Metrics against ground truth: steps that count what they do themselves.

Each test instruments a step (its calls, its concurrent calls, the records it
filters or fails) and compares those counts with what Prometheus reports,
read from the run's registry or scraped over HTTP while the run is busy.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from loom.observability import ObservabilityRuntime
from loom.observability.metrics import BatchedObserver, FlowMetrics, new_registry, observe_many
from loom.streaming import (
    BatchStep,
    BusinessError,
    CollectBatch,
    Drain,
    ExpandStep,
    FromTopic,
    Process,
    RecordStep,
    StreamFlow,
    WithAsync,
)
from loom.streaming.testing import TestRunner
from tests.kafka.process import free_port, http_get
from tests.kafka.support import wait_until
from tests.observability.test_metrics_and_probes import samples, value
from tests.runtime.payloads import Order, enrich_flow, orders

FLOW = "orders"


def instrumented() -> ObservabilityRuntime:
    return ObservabilityRuntime(registry=new_registry(process_metrics=False))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"flow": FLOW, **labels}) or 0.0


def run_flow(flow: StreamFlow[Any, Any], inputs: list[Order]) -> CollectorRegistry:
    observability = instrumented()
    tester = TestRunner(flow, observability_runtime=observability)
    tester.send_all(inputs)
    tester.run()
    return observability.registry


class Calls:
    """Concurrent calls of an async step; only the event loop thread touches it."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.count = 0
        self.seconds = 0.0


# -- async steps --------------------------------------------------------------


def test_async_in_flight_is_the_calls_running_now_as_scraped_over_http() -> None:
    calls = Calls()
    release = threading.Event()

    async def blocked(order: Order) -> Order:
        calls.count += 1
        calls.current += 1
        calls.peak = max(calls.peak, calls.current)
        try:
            while not release.is_set():
                await anyio.sleep(0.001)
        finally:
            calls.current -= 1
        return order

    port = free_port()
    observability = instrumented()
    tester = TestRunner(
        enrich_flow(WithAsync(blocked, max_concurrency=5)),
        config={"observability": {"prometheus_port": port}},
        observability_runtime=observability,
    )
    tester.send_all(orders(50))
    runner = threading.Thread(target=tester.run, daemon=True)
    runner.start()
    labels = {"flow": FLOW, "node": "blocked", "worker": "0"}

    def scrape() -> dict[Any, float]:
        return samples(http_get(f"http://127.0.0.1:{port}/metrics")[1])

    try:
        wait_until(
            lambda: calls.current == 5 and value(scrape(), "loom_async_in_flight", **labels) == 5,
            20,
            "five calls running, and /metrics saying so",
        )
        metrics = scrape()
        assert value(metrics, "loom_async_in_flight", **labels) == calls.current == 5
        assert value(metrics, "loom_async_queued", **labels) == 50 - calls.count == 45
    finally:
        release.set()
        runner.join(30)
    assert calls.peak == 5
    registry = observability.registry
    assert sample(registry, "loom_async_in_flight", node="blocked", worker="0") == 0
    assert sample(registry, "loom_async_queued", node="blocked", worker="0") == 0


def test_async_step_latency_is_observed_once_per_call_with_its_duration() -> None:
    calls = Calls()

    async def lookup(order: Order) -> Order:
        started = anyio.current_time()
        calls.count += 1
        await anyio.sleep(0.012)
        calls.seconds += anyio.current_time() - started
        return order

    registry = run_flow(enrich_flow(WithAsync(lookup, max_concurrency=20)), orders(200))
    step = {"node": "lookup"}
    assert sample(registry, "loom_step_seconds_count", **step) == calls.count == 200
    # Every call slept 12 ms: none is observed in the 10 ms bucket or below.
    assert sample(registry, "loom_step_seconds_bucket", **step, le="0.01") == 0
    assert sample(registry, "loom_step_seconds_bucket", **step, le="+Inf") == 200
    assert sample(registry, "loom_step_seconds_sum", **step) >= calls.seconds * 0.99


def test_a_sync_step_is_observed_once_per_record() -> None:
    calls: list[str] = []

    def note(order: Order) -> Order:
        calls.append(order.id)
        return order

    registry = run_flow(enrich_flow(RecordStep(note)), orders(2500))
    assert sample(registry, "loom_step_seconds_count", node="note") == len(calls) == 2500


# -- dropped records ------------------------------------------------------------


def test_records_a_record_step_filters_are_counted_as_dropped() -> None:
    filtered: list[str] = []

    def evens(order: Order) -> Order | None:
        if int(order.id[1:]) % 2:
            filtered.append(order.id)
            return None
        return order

    registry = run_flow(enrich_flow(RecordStep(evens)), orders(301))
    dropped = sample(registry, "loom_records_dropped_total", node="evens", reason="filtered")
    assert dropped == len(filtered) == 150


def test_records_an_async_step_filters_are_counted_as_dropped() -> None:
    filtered: list[str] = []

    async def evens(order: Order) -> Order | None:
        if int(order.id[1:]) % 2:
            filtered.append(order.id)
            return None
        return order

    registry = run_flow(enrich_flow(WithAsync(evens, max_concurrency=8)), orders(301))
    dropped = sample(registry, "loom_records_dropped_total", node="evens", reason="filtered")
    assert dropped == len(filtered) == 150


def test_records_an_expand_step_turns_into_nothing_are_counted_as_dropped() -> None:
    emptied: list[str] = []

    def pieces(order: Order) -> list[Order]:
        if int(order.id[1:]) % 3 == 0:
            emptied.append(order.id)
            return []
        return [order, order]

    registry = run_flow(enrich_flow(ExpandStep(pieces)), orders(100))
    dropped = sample(registry, "loom_records_dropped_total", node="pieces", reason="empty")
    assert dropped == len(emptied) == 34


def test_an_empty_batch_counts_each_of_its_input_records_as_dropped() -> None:
    emptied: list[int] = []

    def nothing(batch: list[Order]) -> list[Order]:
        emptied.append(len(batch))
        return []

    flow = enrich_flow(CollectBatch(max_records=10, timeout_ms=50), BatchStep(nothing))
    registry = run_flow(flow, orders(95))
    dropped = sample(registry, "loom_records_dropped_total", node="nothing", reason="empty")
    assert dropped == sum(emptied) == 95


def test_records_reaching_drain_are_counted_as_dropped() -> None:
    seen: list[str] = []

    def note(order: Order) -> Order:
        seen.append(order.id)
        return order

    flow = StreamFlow(
        FLOW,
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(note)),
        output=Drain(),
        errors=Drain(),
    )
    registry = run_flow(flow, orders(120))
    dropped = sample(registry, "loom_records_dropped_total", node="drain", reason="drained")
    assert dropped == len(seen) == 120


# -- dead letters -----------------------------------------------------------------


def test_dead_letters_are_counted_per_kind_and_failing_node() -> None:
    crashed: list[str] = []
    refused: list[str] = []

    def check(order: Order) -> Order:
        if int(order.id[1:]) % 10 == 0:
            crashed.append(order.id)
            raise RuntimeError("crash")
        return order

    def approve(order: Order) -> Order:
        if int(order.id[1:]) % 7 == 0:
            refused.append(order.id)
            raise BusinessError("refused")
        if int(order.id[1:]) % 11 == 0:
            crashed.append(order.id)
            raise RuntimeError("crash")
        return order

    registry = run_flow(enrich_flow(RecordStep(check), RecordStep(approve)), orders(500))
    dlq = {"topic": "dlq"}

    def dead(kind: str, node: str) -> float:
        return sample(registry, "loom_records_dead_lettered_total", **dlq, kind=kind, node=node)

    crashed_in_check = [i for i in crashed if int(i[1:]) % 10 == 0]
    assert dead("task", "check") == len(crashed_in_check) == 50
    assert dead("task", "approve") == len(crashed) - len(crashed_in_check)
    assert dead("business", "approve") == len(refused)
    assert dead("business", "check") == 0


# -- bulk observation helpers -----------------------------------------------------


def histogram_samples(registry: CollectorRegistry, node: str) -> dict[str, float]:
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.labels.get("node") == node and not sample.name.endswith("_created")
    }


def test_bulk_observations_equal_prometheus_own_observations() -> None:
    registry = new_registry(process_metrics=False)
    metrics = FlowMetrics(registry)
    own = metrics.step_seconds.labels(FLOW, "own")
    amounts = [0.000003, 0.00005, 0.0007, 0.004, 0.004, 0.02, 0.3, 7.0] * 30
    for amount in amounts:
        own.observe(amount)
    batched = BatchedObserver(metrics.step_seconds.labels(FLOW, "batched"), flush_every=7)
    for amount in amounts:
        batched.observe(amount)
    batched.flush()
    many = metrics.step_seconds.labels(FLOW, "many")
    for amount in dict.fromkeys(amounts):
        observe_many(many, amount, amounts.count(amount))

    expected = {k.replace("own", "X"): v for k, v in histogram_samples(registry, "own").items()}
    for node in ("batched", "many"):
        got = {k.replace(node, "X"): v for k, v in histogram_samples(registry, node).items()}
        assert got.keys() == expected.keys()
        for key, amount in expected.items():
            assert got[key] == pytest.approx(amount)
