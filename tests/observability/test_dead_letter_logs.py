"""Dead letters in the log: a bounded number of lines, suppressed counts, no payload.

Time is a fake clock the test moves; nothing sleeps.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import pytest

from loom.delivery.acks import Ack
from loom.observability import ObservabilityRuntime
from loom.observability.logs import DeadLetterLog, JsonFormatter, loggable_message
from loom.observability.metrics import new_registry
from loom.streaming import (
    ErrorEnvelope,
    ErrorKind,
    FromTopic,
    IntoTopic,
    Process,
    RecordStep,
    StreamFlow,
)
from loom.streaming.bytewax.records import Failure
from loom.streaming.testing import TestRunner

SECRET = "card-4111-1111-1111-1111"
"""Payload text that must never reach the log."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lines:
    """What the dead-letter logger wrote, as the service's JSON formatter writes it."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def lines() -> Iterator[Lines]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("loom.streaming.dead_letters")
    log.addHandler(handler)
    try:
        yield Lines(stream)
    finally:
        log.removeHandler(handler)


def failure(kind: ErrorKind, node: str, offset: int) -> Failure:
    envelope = ErrorEnvelope(
        kind=kind,
        flow="orders",
        node=node,
        exception_type="RuntimeError",
        message="crash",
        topic="input",
        partition=3,
        offset=offset,
        key=b"k",
        headers=(),
        timestamp_ms=None,
        value=SECRET.encode(),
        attempt=1,
        occurred_at=datetime.now(UTC),
    )
    return Failure(envelope, Ack())


def test_1000_failures_make_one_line_per_kind_and_node_per_interval(lines: Lines) -> None:
    clock = Clock()
    log = DeadLetterLog(interval_s=10.0, clock=clock)
    for batch in range(100):  # 1,000 failures, 10 per batch, 0.5 s apart: 50 s
        clock.now = batch * 0.5
        log.record([failure(ErrorKind.TASK, "check", batch * 10 + i) for i in range(10)], "dlq")
    entries = lines.entries()
    assert [entry["offset"] for entry in entries] == [0, 200, 400, 600, 800]
    assert [entry["suppressed"] for entry in entries] == [0, 199, 199, 199, 199]


def test_each_kind_and_node_has_its_own_interval(lines: Lines) -> None:
    clock = Clock()
    log = DeadLetterLog(interval_s=10.0, clock=clock)
    batch = [
        failure(kind, node, offset)
        for offset, (kind, node) in enumerate(
            [(ErrorKind.TASK, "a"), (ErrorKind.TASK, "b"), (ErrorKind.BUSINESS, "a")] * 5
        )
    ]
    log.record(batch, "dlq")
    keys = [(entry["kind"], entry["node"]) for entry in lines.entries()]
    assert keys == [("task", "a"), ("task", "b"), ("business", "a")]


def test_a_line_names_the_error_and_the_source_record_but_not_its_bytes(lines: Lines) -> None:
    clock = Clock()
    log = DeadLetterLog(interval_s=10.0, clock=clock)
    log.record([failure(ErrorKind.TASK, "check", 7), failure(ErrorKind.TASK, "check", 8)], "dlq")
    clock.now = 10.0
    log.record([failure(ErrorKind.TASK, "check", 9)], "dlq")
    [first, second] = lines.entries()
    expected = {
        "level": "warning",
        "flow": "orders",
        "kind": "task",
        "node": "check",
        "exception_type": "RuntimeError",
        "error": "crash",
        "topic": "input",
        "partition": 3,
        "offset": 7,
        "destination": "dlq",
        "suppressed": 0,
    }
    assert {key: first[key] for key in expected} == expected
    assert (second["offset"], second["suppressed"]) == (9, 1)
    assert "1 more since the last line" in second["message"]
    assert SECRET not in lines.text


class Tagged(msgspec.Struct):
    id: str
    status: Literal["new", "paid"]


def crash(order: Tagged) -> Tagged:
    raise RuntimeError(f"cannot price order {order.id}")


def test_a_run_of_1000_failures_logs_one_line_per_kind_and_node_without_payload(
    lines: Lines,
) -> None:
    clock = Clock()
    observability = ObservabilityRuntime(
        registry=new_registry(process_metrics=False),
        dead_letter_log=DeadLetterLog(interval_s=10.0, clock=clock),
    )
    flow = StreamFlow(
        "tagged",
        source=FromTopic("input", payload=Tagged),
        process=Process(RecordStep(crash)),
        output=IntoTopic("output"),
        errors=IntoTopic("dlq"),
    )
    tester = TestRunner(flow, observability_runtime=observability)
    for i in range(500):
        tester.send(json.dumps({"id": str(i), "status": SECRET}).encode())  # WIRE
        tester.send(Tagged(str(i), "new"))  # TASK
    result = tester.run()
    assert len(result.dead_letters("dlq")) == 1000
    assert SECRET in result.dead_letters("dlq")[0].message  # the DLQ keeps it all
    clock.now = 10.0
    tester.send(json.dumps({"id": "x", "status": SECRET}).encode())
    tester.send(Tagged("y", "new"))
    tester.run()
    entries = lines.entries()
    by_key: dict[tuple[str, str], list[int]] = {}
    for entry in entries:
        by_key.setdefault((entry["kind"], entry["node"]), [])

        by_key[(entry["kind"], entry["node"])].append(entry["suppressed"])
    assert by_key == {("wire", "from_input"): [0, 499], ("task", "crash"): [0, 499]}
    assert SECRET not in lines.text


def test_a_wire_message_loses_quoted_input_in_the_log() -> None:
    pydantic_style = "1 validation error for Order\namount\n  input_value='4111', input_type=str"
    assert loggable_message("wire", pydantic_style) == "1 validation error for Order"
    msgspec_style = f"Invalid enum value '{SECRET}' - at `$.status`"
    assert loggable_message("wire", msgspec_style) == "Invalid enum value '…' - at `$.status`"
    assert loggable_message("task", "x" * 500) == "x" * 199 + "…"
