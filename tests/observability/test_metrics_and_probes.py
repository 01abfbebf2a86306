"""Prometheus metrics and health probes, read over HTTP from a running flow."""

from __future__ import annotations

from typing import Any

import msgspec
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loom.observability import ObservabilityRuntime
from loom.observability.metrics import new_registry
from loom.observability.server import ProbeServer
from loom.streaming import BusinessError, RecordStep
from loom.streaming.bytewax.runner import StreamingRunner
from tests.kafka.process import free_port, http_get
from tests.kafka.support import BackgroundRun, Cluster, wait_until
from tests.runtime.payloads import Order, enrich, enrich_flow


def refuse_every_hundredth(order: Order) -> Order:
    if int(order.id) % 100 == 0:
        raise BusinessError("refused")
    return order


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def test_a_known_run_is_counted_exactly_and_scraped_over_http(cluster: Cluster) -> None:
    topics = {name: cluster.topic(2, name) for name in ("input", "output", "dlq")}
    port = free_port()
    config = cluster.flow_config(topics, observability={"prometheus_port": port})
    cluster.produce(
        topics["input"],
        [msgspec.json.encode(Order(str(i), float(i))) for i in range(995)] + [b"not json"] * 5,
    )
    observability = ObservabilityRuntime(registry=new_registry())
    runner = StreamingRunner.from_dict(
        enrich_flow(RecordStep(refuse_every_hundredth), RecordStep(enrich)),
        config,
        observability_runtime=observability,
    )
    url = f"http://127.0.0.1:{port}"
    with BackgroundRun(runner) as run:
        wait_until(
            lambda: (
                value(
                    samples(http_get(f"{url}/metrics")[1]),
                    "loom_committed_offset",
                    flow="orders",
                    topic=topics["input"],
                    partition="0",
                )
                + value(
                    samples(http_get(f"{url}/metrics")[1]),
                    "loom_committed_offset",
                    flow="orders",
                    topic=topics["input"],
                    partition="1",
                )
                == 1000
            ),
            30,
            "all 1000 offsets committed, as /metrics reports",
        )
        assert http_get(f"{url}/healthz") == (200, "ok\n")
        assert http_get(f"{url}/readyz") == (200, "ready\n")
        metrics = samples(http_get(f"{url}/metrics")[1])
        run.stop()
    flow = "orders"
    assert value(metrics, "loom_ready", flow=flow) == 1  # what /readyz said
    after = samples(generate_latest(observability.registry).decode())
    assert value(after, "loom_ready", flow=flow) == 0  # the run is over
    assert value(metrics, "loom_records_consumed_total", flow=flow, topic=topics["input"]) == 1000
    assert value(metrics, "loom_records_produced_total", flow=flow, topic=topics["output"]) == 985
    dead = {"flow": flow, "topic": topics["dlq"]}
    wire = {"kind": "wire", "node": "from_input"}
    business = {"kind": "business", "node": "refuse_every_hundredth"}
    assert value(metrics, "loom_records_dead_lettered_total", **dead, **wire) == 5
    assert value(metrics, "loom_records_dead_lettered_total", **dead, **business) == 10
    assert value(metrics, "loom_records_produced_total", flow=flow, topic=topics["dlq"]) == 15
    step = {"flow": flow, "node": "refuse_every_hundredth"}
    assert value(metrics, "loom_step_seconds_count", **step) == 995  # one per decoded record
    assert value(metrics, "loom_step_seconds_count", flow=flow, node="enrich") == 985
    assert value(metrics, "loom_poll_batch_records_sum", flow=flow) == 1000
    lag = [
        value(metrics, "loom_consumer_lag", flow=flow, topic=topics["input"], partition=p)
        for p in ("0", "1")
    ]
    assert lag == [0.0, 0.0]
    assert value(metrics, "loom_in_flight_records", flow=flow, worker="0") == 0


def test_readyz_answers_503_until_the_run_is_ready_and_healthz_always_200() -> None:
    ready = False
    server = ProbeServer(0, new_registry(), lambda: ready, host="127.0.0.1").start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert http_get(f"{url}/healthz") == (200, "ok\n")
        assert http_get(f"{url}/readyz") == (503, "not ready\n")
        ready = True
        assert http_get(f"{url}/readyz") == (200, "ready\n")
        assert http_get(f"{url}/nope")[0] == 404
        assert "process_cpu_seconds_total" in http_get(f"{url}/metrics")[1]
    finally:
        server.stop()
