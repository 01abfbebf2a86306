"""JSON logs with flow coordinates; the SASL password appears nowhere."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from loom.config import ConfigContext
from loom.config.settings import SettingsError, load_config
from loom.observability import ObservabilityRuntime
from loom.observability.logs import JsonFormatter, configure_logging
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import enrich_flow, orders

SECRET = "pa55-w0rd-never-shown"


def test_log_lines_are_json_objects_with_the_record_coordinates() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(static={"service": "orders"}))
    log = logging.getLogger("loom.test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(
            "bad record",
            extra={"flow": "f", "node": "n", "topic": "t", "partition": 2, "offset": 41},
        )
    finally:
        log.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "bad record"
    assert entry["level"] == "warning"
    assert {key: entry[key] for key in ("flow", "node", "topic", "partition", "offset")} == {
        "flow": "f",
        "node": "n",
        "topic": "t",
        "partition": 2,
        "offset": 41,
    }
    assert entry["service"] == "orders"


def test_configure_logging_sends_every_logger_through_the_json_formatter() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging(level="INFO", stream=stream)
        logging.getLogger("anything").info("hello")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert json.loads(stream.getvalue())["message"] == "hello"


def test_the_password_is_absent_from_reprs_dumps_and_validation_errors() -> None:
    config = ConfigContext.from_dict({"kafka": {"sasl_password": SECRET}})
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in config.model_dump_json()
    with pytest.raises(SettingsError) as failure:
        load_config(
            environ={
                "LOOM_KAFKA__SASL_PASSWORD": SECRET,
                "LOOM_KAFKA__CONSUMER": "{not json",
                "LOOM_RUNTIME__WORKERS_PER_PROCESS": "x",
            }
        )
    assert SECRET not in str(failure.value)


def test_the_password_is_absent_from_logs_and_spans_of_a_run(
    caplog: pytest.LogCaptureFixture,
    exporter: InMemorySpanExporter,
    observability: ObservabilityRuntime,
) -> None:
    caplog.set_level(logging.DEBUG)
    tester = TestRunner(
        enrich_flow(),
        config={"kafka": {"sasl_username": "svc", "sasl_password": SECRET}},
        observability_runtime=observability,
    )
    tester.send_all(orders(3))
    tester.send(b"{bad")
    tester.run()
    assert SECRET not in caplog.text
    for span in exporter.get_finished_spans():
        assert SECRET not in json.dumps(dict(span.attributes or {}), default=str)
        assert all(SECRET not in str(event.attributes) for event in span.events)
