"""The observability handles a runner uses: a tracer (and, later, metrics)."""

from __future__ import annotations

import enum

from opentelemetry import trace


class Scope(enum.StrEnum):
    """Span scopes of a run, as the runner API documents them."""

    POLL_CYCLE = "poll_cycle"
    """The whole ``run()`` invocation, preparation included."""
    FLOW = "flow"
    """The blocking Bytewax execution (``cli_main``)."""


class ObservabilityRuntime:
    """Where a runner sends spans.

    Tests inject one with an in-memory exporter; by default the global
    OpenTelemetry tracer provider is used.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer_provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = self.tracer_provider.get_tracer("loom.streaming")
