"""Fixtures shared by every test package: the test broker and span capture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loom.devtools.broker import DevBroker
from loom.observability import ObservabilityRuntime
from tests.kafka.support import Cluster


@pytest.fixture(scope="session")
def broker() -> Iterator[DevBroker]:
    """One Tansu broker per session (started only if a test needs it)."""
    with DevBroker() as running:
        yield running


@pytest.fixture
def cluster(broker: DevBroker) -> Cluster:
    return Cluster(broker.bootstrap_servers)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def observability(exporter: InMemorySpanExporter) -> ObservabilityRuntime:
    """Real SDK spans into ``exporter``; every source poll traced."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return ObservabilityRuntime(tracer_provider=provider, batch_span_ratio=1.0)
