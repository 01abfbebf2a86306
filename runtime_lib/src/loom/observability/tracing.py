"""W3C trace context carried through a flow in Kafka record headers.

A record whose headers carry a ``traceparent`` gets a ``process <flow>``
span, child of the upstream span; every record written from it (outputs and
dead letters) carries this span's ``traceparent``, so a trace crosses
services. Records without one cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = ("traceparent", "tracestate")


def start_record_span(
    tracer: trace.Tracer, flow: str, topic: str, headers: Sequence[tuple[str, bytes | None]]
) -> Span | None:
    """A span for a record carrying ``traceparent``, else ``None``."""
    carrier = {
        name: value.decode("latin-1") for name, value in headers if name in _FIELDS and value
    }
    if "traceparent" not in carrier:
        return None
    parent = _PROPAGATOR.extract(carrier)
    return tracer.start_span(
        f"process {flow}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "kafka", "messaging.source.name": topic, "loom.flow": flow},
    )


def with_trace_headers(
    span: Span, headers: Sequence[tuple[str, bytes]]
) -> tuple[tuple[str, bytes], ...]:
    """``headers`` with ``traceparent``/``tracestate`` replaced by ``span``'s."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    kept = [(name, value) for name, value in headers if name not in _FIELDS]
    return (*kept, *((name, value.encode()) for name, value in carrier.items()))


def end_span(span: Span) -> None:
    """End ``span`` once, however many records derived from it finish."""
    if span.is_recording():
        span.end()
