"""Prometheus metrics of a running flow.

Synchronous operators update them once per chunk (a poll's worth of
records), never per record, so that metrics cost stays negligible next to the
records' own work. Async steps observe each call's duration where the call
runs (one histogram observation per call, on the event loop thread), and the
async gauges are read from the operator's own counters at scrape time.

Families (every one also carries ``flow``):

- ``loom_records_consumed_total{topic}``, ``loom_records_produced_total{topic}``
- ``loom_records_dead_lettered_total{topic, kind, node}``: records routed to an
  error terminal; ``topic`` is where they went (a topic, a sink name, or
  ``drain``), ``node`` the node that failed them.
- ``loom_records_dropped_total{node, reason}``: records that ended on purpose
  without an output: ``reason`` is ``filtered`` (a record step returned
  ``None``), ``empty`` (an expand or batch step returned no records; a batch
  counts its input records) or ``drained`` (they reached a ``Drain()``).
- ``loom_step_seconds{node}``: one observation per record a step processed
  (synchronous steps: each record of a chunk at the chunk's mean time; async
  steps: each call's own duration, its wait for a concurrency slot excluded;
  with ``retry``, every attempt is a call, its backoff excluded).
- ``loom_step_retries_total{node}``: calls a step with ``retry`` made again
  after a failure (a record that succeeds at its third attempt counts 2),
  counted when the retry call starts.
- ``loom_async_in_flight{node, worker}``: async calls running now (at most
  ``max_concurrency``; a retry waiting for its backoff holds its slot and
  counts); ``loom_async_queued{node, worker}``: records handed to the node
  and waiting for a slot.
- ``loom_poll_batch_records``, ``loom_in_flight_records{worker}``,
  ``loom_committed_offset{topic, partition}``, ``loom_consumer_lag{topic, partition}``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000)


class DropReason:
    """Values of the ``reason`` label of ``loom_records_dropped_total``."""

    FILTERED = "filtered"
    EMPTY = "empty"
    DRAINED = "drained"


class FlowMetrics:
    """The metric families of a flow (see the module docstring), in one registry."""

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
            "Records routed to an error terminal (topic), by error kind and failing node.",
            ["flow", "topic", "kind", "node"],
            registry=registry,
        )
        self.dropped = Counter(
            "loom_records_dropped",
            "Records ended on purpose without output: filtered, empty expansion, drained.",
            ["flow", "node", "reason"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "loom_step_seconds",
            "Seconds a step spends per record (sync: chunk mean per record; async: per call).",
            ["flow", "node"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "loom_step_retries",
            "Calls a step made again after a failure (Retry), first attempts not counted.",
            ["flow", "node"],
            registry=registry,
        )
        self.batch_records = Histogram(
            "loom_poll_batch_records",
            "Records per source poll (one chunk).",
            ["flow"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.ready = Gauge(
            "loom_ready",
            "1 while the process serves: every worker has its partitions (as /readyz), else 0.",
            ["flow"],
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
            "Async calls running now, per async node and worker (at most max_concurrency).",
            ["flow", "node", "worker"],
            registry=registry,
        )
        self.async_queued = Gauge(
            "loom_async_queued",
            "Records handed to an async node and waiting for a concurrency slot.",
            ["flow", "node", "worker"],
            registry=registry,
        )
        self.state_keys = Gauge(
            "loom_state_keys",
            "Keys a stateful node holds state for, per worker (at the last snapshot).",
            ["flow", "node", "worker"],
            registry=registry,
        )
        self.state_bytes = Gauge(
            "loom_state_bytes",
            "Approximate size of a stateful node's state, per worker: keys times the mean "
            "pickled size of the entries in recent snapshots.",
            ["flow", "node", "worker"],
            registry=registry,
        )
        self.windows_open = Gauge(
            "loom_windows_open",
            "Windows of a WindowAggregate waiting to close, per worker.",
            ["flow", "node", "worker"],
            registry=registry,
        )
        self.late_records = Counter(
            "loom_late_records",
            "Records that arrived for a window that had already closed (dead-lettered as LATE).",
            ["flow", "node"],
            registry=registry,
        )
        self.expired_keys = Counter(
            "loom_state_expired_keys",
            "Keys whose state a StatefulStep deleted after ttl_ms without an update.",
            ["flow", "node"],
            registry=registry,
        )
        self.snapshot_seconds = Histogram(
            "loom_state_snapshot_seconds",
            "Seconds a worker spends saving one state snapshot (one transaction).",
            ["flow", "worker"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )


def _parts(histogram: Any) -> tuple[list[Any], list[float], Any] | None:
    """A labelled ``Histogram`` child's buckets, bounds and sum, or None.

    ``prometheus_client`` has no bulk observation, and ``observe`` takes two
    locks (~1.4 µs); adding to these directly is what ``observe`` does.
    """
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None:
        return None
    return buckets, bounds, total


def observe_many(histogram: Any, amount: float, count: int) -> None:
    """Observe ``amount`` ``count`` times in one update (a labelled ``Histogram`` child).

    Without the internals :func:`_parts` relies on, it falls back to one
    observation.
    """
    parts = _parts(histogram)
    if parts is None:
        histogram.observe(amount)
        return
    buckets, bounds, total = parts
    total.inc(amount * count)
    buckets[bisect_left(bounds, amount)].inc(count)


class BatchedObserver:
    """Observations of one thread, gathered without locks and added in bulk.

    ``observe`` costs a list increment and an addition; every
    ``flush_every`` observations (and on :meth:`flush`) they are added to the
    histogram child. Only one thread may call ``observe`` and ``flush`` (the
    async bridge's event loop thread).
    """

    __slots__ = ("_bounds", "_counts", "_histogram", "_parts", "_pending", "_sum", "flush_every")

    def __init__(self, histogram: Any, flush_every: int = 100) -> None:
        self._histogram = histogram
        self._parts = _parts(histogram)
        self._bounds: list[float] = self._parts[1] if self._parts is not None else []
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = 0
        self.flush_every = flush_every

    def observe(self, amount: float) -> None:
        if self._parts is None:
            self._histogram.observe(amount)
            return
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self._parts is None:
            return
        buckets, _, total = self._parts
        total.inc(self._sum)
        counts = self._counts
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        self._sum = 0.0
        self._pending = 0


def new_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry()
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry
