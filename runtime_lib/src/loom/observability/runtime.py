"""The observability handles a run uses: tracer, metrics registry, sampling."""

from __future__ import annotations

import enum
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from loom.observability.logs import DeadLetterLog
from loom.observability.metrics import FlowMetrics, new_registry


class Scope(enum.StrEnum):
    """Span scopes of a run, as the runner API documents them."""

    POLL_CYCLE = "poll_cycle"
    """The whole ``run()`` invocation, preparation included."""
    FLOW = "flow"
    """The blocking Bytewax execution (``cli_main``)."""
    BATCH = "batch"
    """One source poll: the records read and decoded together (sampled)."""


class ObservabilityRuntime:
    """Where a runner sends spans and metrics.

    Tests inject one with an in-memory span exporter and read its
    ``registry``; services build one with :meth:`from_environment`. Without
    arguments, spans go to the global OpenTelemetry tracer provider and
    metrics to a fresh registry.

    :param batch_span_ratio: Fraction of source polls traced with a
        ``batch`` span (0 disables them).
    :param instrument_dataflow: False leaves only the two run spans: no
        metrics, batch or record spans inside the dataflow (to measure what
        observability costs).
    :param dead_letter_log: How dead letters are logged (a default
        :class:`DeadLetterLog`: one line per kind and node per 10 s); logged
        even when ``instrument_dataflow`` is False.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        registry: CollectorRegistry | None = None,
        batch_span_ratio: float = 0.01,
        instrument_dataflow: bool = True,
        dead_letter_log: DeadLetterLog | None = None,
    ) -> None:
        self.instrument_dataflow = instrument_dataflow
        self.dead_letter_log = dead_letter_log or DeadLetterLog()
        self.tracer_provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = self.tracer_provider.get_tracer("loom.streaming")
        self.registry = registry if registry is not None else new_registry()
        self.metrics = FlowMetrics(self.registry)
        self.batch_span_ratio = batch_span_ratio
        self.traces_records = isinstance(self.tracer_provider, TracerProvider)
        """Per-record trace propagation only when spans are really recorded."""

    @classmethod
    def from_environment(
        cls, service_name: str, *, batch_span_ratio: float = 0.01
    ) -> ObservabilityRuntime:
        """Tracing as the standard ``OTEL_*`` variables say.

        The SDK reads ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
        ``OTEL_TRACES_SAMPLER`` and the ``OTEL_EXPORTER_OTLP_*`` settings
        itself; spans are exported over OTLP/HTTP when an endpoint is set and
        ``OTEL_TRACES_EXPORTER`` is not ``none``.
        """
        defaults = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(defaults))
        exporter_choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if endpoint and exporter_choice != "none":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider, batch_span_ratio=batch_span_ratio)

    def shutdown(self) -> None:
        """Flush and stop exporters the runtime owns."""
        if isinstance(self.tracer_provider, TracerProvider):
            self.tracer_provider.shutdown()
