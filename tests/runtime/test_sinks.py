"""IntoSink with registered sink types, Drain, and user error sinks."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from loom.streaming import (
    Drain,
    ErrorEnvelope,
    ErrorKind,
    FromTopic,
    IntoSink,
    IntoTopic,
    Message,
    Process,
    RecordStep,
    StreamFlow,
)
from loom.streaming.bytewax.runner import StreamingRunner
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import Order, enrich, orders


class _ListPartition(StatelessSinkPartition[Any]):
    def __init__(self, store: list[Any], lock: threading.Lock) -> None:
        self.store, self.lock = store, lock

    def write_batch(self, items: list[Any]) -> None:
        with self.lock:
            self.store.extend(items)


class AuditSink(DynamicSink[Any]):
    """A registered sink type that keeps what it receives, per configured name."""

    sink_type: ClassVar[str] = "audit"
    stores: ClassVar[dict[str, list[Any]]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str) -> None:
        self.store = AuditSink.stores.setdefault(name, [])

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> DynamicSink[Any]:
        return cls(str(options["name"]))

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ListPartition:
        return _ListPartition(self.store, self.lock)


def audit_config(name: str) -> dict[str, Any]:
    return {"streaming": {"sinks": {"audit": {"type": "audit", "options": {"name": name}}}}}


def test_into_sink_writes_messages_to_a_registered_sink(request: pytest.FixtureRequest) -> None:
    flow = StreamFlow(
        "audited",
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(enrich), IntoSink("audit")),
        errors=IntoTopic("dlq"),
    )
    tester = TestRunner(flow, config=audit_config(request.node.name))
    tester.runner.register_sink(AuditSink)
    tester.send(Order("a", 1), key="a")
    result = tester.run()
    [message] = AuditSink.stores[request.node.name]
    assert isinstance(message, Message)
    assert (message.payload.id, message.key) == ("a", b"a")
    assert result.committed("input") == {0: 1}


def test_register_sink_rejects_a_class_without_from_config() -> None:
    class NotASink:
        pass

    with pytest.raises(TypeError, match="RegisteredSink"):
        StreamingRunner().register_sink(NotASink)


def test_register_sink_rejects_an_instance() -> None:
    with pytest.raises(TypeError, match="RegisteredSink"):
        StreamingRunner().register_sink(AuditSink("x"))  # type: ignore[arg-type]


def test_an_unregistered_sink_type_fails_before_running(request: pytest.FixtureRequest) -> None:
    flow = StreamFlow(
        "audited",
        source=FromTopic("input", payload=Order),
        process=Process(IntoSink("audit")),
        errors=IntoTopic("dlq"),
    )
    tester = TestRunner(flow, config=audit_config(request.node.name))
    with pytest.raises(LookupError, match="'audit' is not registered"):
        tester.run()


def test_drain_discards_records_and_commits_them() -> None:
    flow = StreamFlow(
        "drained",
        source=FromTopic("input", payload=Order),
        process=Process(Drain()),
        errors=IntoTopic("dlq"),
    )
    tester = TestRunner(flow)
    tester.send_all(orders(5))
    result = tester.run()
    assert result.records("dlq") == []
    assert result.committed("input") == {0: 5}


def test_error_sinks_given_to_run_replace_the_planned_route_for_their_kind(
    request: pytest.FixtureRequest,
) -> None:
    flow = StreamFlow(
        "overridden",
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(enrich)),
        output=IntoTopic("output"),
        errors=IntoTopic("dlq"),
    )
    tester = TestRunner(flow)
    tester.send(b"{broken")
    tester.send(Order("ok", 1))
    result = tester.run(error_sinks={ErrorKind.WIRE: AuditSink(request.node.name)})
    [envelope] = AuditSink.stores[request.node.name]
    assert isinstance(envelope, ErrorEnvelope)
    assert envelope.value == b"{broken"
    assert result.records("dlq") == []
    assert result.committed("input") == {0: 2}
