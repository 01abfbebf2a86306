"""The standard OTEL_* variables configure a real OTLP/HTTP export."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from loom.observability import ObservabilityRuntime
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import enrich_flow, orders


class Collector(ThreadingHTTPServer):
    """Accepts OTLP/HTTP protobuf exports and keeps them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, ExportTraceServiceRequest]] = []


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.requests.append((self.path, request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_spans_are_exported_over_otlp_http_as_the_otel_variables_say(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "orders-enricher")
    observability = ObservabilityRuntime.from_environment("fallback-name")
    tester = TestRunner(enrich_flow(), observability_runtime=observability)
    tester.send_all(orders(3))
    tester.run()
    observability.shutdown()  # flushes the batch processor
    assert collector.requests
    paths = {path for path, _ in collector.requests}
    assert paths == {"/v1/traces"}
    spans = [
        (resource.resource, span.name)
        for _, request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    names = {name for _, name in spans}
    assert {"poll_cycle orders", "flow orders"} <= names
    service_names = {
        attr.value.string_value
        for resource, _ in spans
        for attr in resource.attributes
        if attr.key == "service.name"
    }
    assert service_names == {"orders-enricher"}


def test_no_exporter_is_configured_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    observability = ObservabilityRuntime.from_environment("svc")
    processors = observability.tracer_provider._active_span_processor._span_processors  # type: ignore[attr-defined]
    assert processors == ()
