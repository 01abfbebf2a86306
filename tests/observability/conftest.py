"""Fixtures: an in-memory span exporter behind a real SDK tracer provider."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loom.observability import ObservabilityRuntime
from tests.kafka.conftest import broker, cluster  # noqa: F401 - shared broker fixtures


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def observability(exporter: InMemorySpanExporter) -> ObservabilityRuntime:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return ObservabilityRuntime(tracer_provider=provider, batch_span_ratio=1.0)
