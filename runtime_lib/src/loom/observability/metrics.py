"""Prometheus metrics of a running flow.

Updated per chunk (a poll's worth of records), never per record, so that
metrics cost stays negligible next to the records' own work.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000)


class FlowMetrics:
    """The metric families of DESIGN §5, registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.consumed = Counter(
            "loom_records_consumed",
            "Records read from the input topic.",
            ["flow", "topic"],
            registry=registry,
        )
        self.produced = Counter(
            "loom_records_produced",
            "Records handed to the producer for an output topic.",
            ["flow", "topic"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "loom_records_dead_lettered",
            "Records routed to an error terminal, by error kind.",
            ["flow", "topic", "kind"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "loom_step_seconds",
            "Time a step spends per record (averaged over each chunk).",
            ["flow", "node"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_records = Histogram(
            "loom_poll_batch_records",
            "Records per source poll (one chunk).",
            ["flow"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "loom_in_flight_records",
            "Records consumed and not yet finished, per worker.",
            ["flow", "worker"],
            registry=registry,
        )
        self.committed = Gauge(
            "loom_committed_offset",
            "Last committed offset (next offset to read), per partition.",
            ["flow", "topic", "partition"],
            registry=registry,
        )
        self.lag = Gauge(
            "loom_consumer_lag",
            "High watermark minus committed offset, per partition.",
            ["flow", "topic", "partition"],
            registry=registry,
        )
        self.async_in_flight = Gauge(
            "loom_async_in_flight",
            "Async calls in flight, per async node and worker.",
            ["flow", "node", "worker"],
            registry=registry,
        )


def new_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry()
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry
