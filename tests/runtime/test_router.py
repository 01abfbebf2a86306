"""Router: every branch is wired to its own sink; unmatched records never pass through."""

from __future__ import annotations

from loom.streaming import (
    Drain,
    ErrorKind,
    FromTopic,
    IntoTopic,
    Process,
    RecordStep,
    Route,
    Router,
    StreamFlow,
)
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import Enriched, Order, enrich, orders


def routed_flow(*, default: object = None) -> StreamFlow[Order, Enriched]:
    return StreamFlow(
        "routing",
        source=FromTopic("input", payload=Order),
        process=Process(
            Router(
                Route(when=lambda o: o.amount < 10, to=IntoTopic("small")),
                Route(
                    when=lambda o: o.amount < 100,
                    to=Process(RecordStep(enrich), IntoTopic("medium", payload=Enriched)),
                ),
                Route(when=lambda o: o.amount < 1000, to=Drain()),
                default=default,  # type: ignore[arg-type]
            )
        ),
        errors=IntoTopic("dlq"),
    )


def amounts(values: list[dict[str, object]]) -> list[object]:
    return [value["amount"] for value in values]


def run(flow: StreamFlow[Order, Enriched], inputs: list[Order]):  # type: ignore[no-untyped-def]
    tester = TestRunner(flow)
    tester.send_all(inputs)
    return tester.run()


def test_each_route_delivers_to_its_own_sink() -> None:
    result = run(
        routed_flow(default=IntoTopic("big")), [Order(str(a), a) for a in (1, 50, 500, 5000)]
    )
    assert amounts(result.values("small")) == [1.0]
    assert amounts(result.values("medium")) == [50.0]
    assert amounts(result.values("big")) == [5000.0]
    assert result.records("dlq") == []


def test_a_route_with_a_process_runs_its_steps_before_its_sink() -> None:
    result = run(routed_flow(default=Drain()), [Order("m", 42)])
    assert result.values("medium", Enriched) == [Enriched("m", 42.0, False)]


def test_first_matching_route_wins() -> None:
    result = run(routed_flow(default=Drain()), [Order("x", 5)])
    assert len(result.records("small")) == 1
    assert result.records("medium") == []


def test_unmatched_record_without_default_is_a_routing_error() -> None:
    result = run(routed_flow(), [Order("huge", 5000), Order("tiny", 1)])
    [letter] = result.dead_letters("dlq")
    assert letter.kind is ErrorKind.ROUTING
    assert letter.node == "router"
    assert b'"huge"' in (letter.value or b"")
    assert amounts(result.values("small")) == [1.0]


def test_unmatched_record_is_never_passed_through_to_another_sink() -> None:
    result = run(routed_flow(), [Order("huge", 5000)])
    assert [len(result.records(t)) for t in ("small", "medium", "dlq")] == [0, 0, 1]


def test_a_raising_predicate_is_a_task_error_for_that_record_only() -> None:
    def picky(order: Order) -> bool:
        if order.id == "bad":
            raise ValueError("cannot decide")
        return True

    flow = StreamFlow(
        "picky",
        source=FromTopic("input", payload=Order),
        process=Process(Router(Route(when=picky, to=IntoTopic("out")))),
        errors=IntoTopic("dlq"),
    )
    result = run(flow, [Order("ok", 1), Order("bad", 2)])
    assert [v["id"] for v in result.values("out")] == ["ok"]
    [letter] = result.dead_letters("dlq")
    assert (letter.kind, letter.exception_type) == (ErrorKind.TASK, "ValueError")


def test_every_branch_commits_its_records() -> None:
    result = run(
        routed_flow(), [*orders(3, start=1), Order("mid", 50), Order("d", 500), Order("x", 9999)]
    )
    assert result.committed("input") == {0: 6}
