"""StatefulStep on the real Bytewax runtime (TestRunner): state per key, outputs, TTL, replays."""

from __future__ import annotations

from typing import Any

import pytest

from loom.observability import ObservabilityRuntime
from loom.streaming import (
    ErrorKind,
    FlowValidationError,
    FromTopic,
    IntoTopic,
    Process,
    RecordStep,
    StatefulStep,
    StreamFlow,
    compile_flow,
)
from loom.streaming.testing import TestRunner


def running_total(total: int | None, value: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    new = (total or 0) + value["amount"]
    return new, {"id": value["id"], "total": new}


def flow_of(*nodes: Any) -> StreamFlow[Any, Any]:
    return StreamFlow(
        "stateful",
        source=FromTopic("input"),
        process=Process(*nodes),
        output=IntoTopic("output"),
        errors=IntoTopic("dlq"),
    )


def test_state_is_kept_per_record_key() -> None:
    tester = TestRunner(flow_of(StatefulStep(running_total)))
    for ident, key, amount in [(1, "a", 2), (2, "b", 10), (3, "a", 3), (4, "b", 1)]:
        tester.send({"id": ident, "amount": amount}, key=key)
    result = tester.run()
    assert [v["total"] for v in result.values("output")] == [2, 10, 5, 11]


def test_outputs_keep_the_input_key() -> None:
    tester = TestRunner(flow_of(StatefulStep(running_total)))
    tester.send({"id": 1, "amount": 2}, key="a")
    assert [r.key_bytes for r in tester.run().records("output")] == [b"a"]


def test_returning_none_as_the_state_deletes_it() -> None:
    def reset_at_zero(total: int | None, value: dict[str, Any]) -> tuple[int | None, int]:
        new = (total or 0) + value["amount"]
        return (None if new == 0 else new), new

    tester = TestRunner(flow_of(StatefulStep(reset_at_zero)))
    for amount in [2, -2, 5]:
        tester.send({"amount": amount}, key="a")
    assert tester.run().values("output") == [2, 0, 5]


def test_an_output_of_none_emits_nothing_and_a_list_emits_each_value() -> None:
    def every_second(count: int | None, value: dict[str, Any]) -> tuple[int, Any]:
        count = (count or 0) + 1
        return count, ([value["id"], value["id"]] if count % 2 == 0 else None)

    tester = TestRunner(flow_of(StatefulStep(every_second)))
    for ident in range(4):
        tester.send({"id": ident}, key="a")
    result = tester.run()
    assert result.values("output") == [1, 1, 3, 3]
    assert result.committed("input") == {0: 4}


def test_a_key_function_chooses_the_state_key() -> None:
    step = StatefulStep(running_total, key=lambda value: value["id"] % 2)
    tester = TestRunner(flow_of(step))
    for ident in range(4):
        tester.send({"id": ident, "amount": 1})  # no Kafka key: the function decides
    assert [v["total"] for v in tester.run().values("output")] == [1, 1, 2, 2]


def test_a_record_without_a_key_is_a_task_error_with_its_bytes() -> None:
    tester = TestRunner(flow_of(StatefulStep(running_total)))
    tester.send(b'{"id": 1, "amount": 1}')
    result = tester.run()
    (letter,) = result.dead_letters("dlq")
    assert letter.kind is ErrorKind.TASK
    assert "no key" in letter.message
    assert letter.value == b'{"id": 1, "amount": 1}'
    assert result.committed("input") == {0: 1}


def test_a_failing_function_dead_letters_the_record_and_leaves_the_state() -> None:
    def fragile(total: int | None, value: dict[str, Any]) -> tuple[int, int]:
        if value["amount"] < 0:
            raise ValueError("negative amount")
        return running_total(total, value)[0], (total or 0) + value["amount"]

    tester = TestRunner(flow_of(StatefulStep(fragile)))
    for amount in [2, -1, 3]:
        tester.send({"id": 0, "amount": amount}, key="a")
    result = tester.run()
    assert result.values("output") == [2, 5]
    assert [d.kind for d in result.dead_letters("dlq")] == [ErrorKind.TASK]


def test_steps_before_and_after_compose() -> None:
    flow = flow_of(
        RecordStep(lambda v: {**v, "amount": v["amount"] * 10}),
        StatefulStep(running_total),
        RecordStep(lambda v: v["total"]),
    )
    tester = TestRunner(flow)
    for amount in [1, 2]:
        tester.send({"id": 0, "amount": amount}, key="a")
    assert tester.run().values("output") == [10, 30]


def test_state_survives_a_restart_and_records_read_again_are_not_applied_twice() -> None:
    tester = TestRunner(flow_of(StatefulStep(running_total)))
    for ident in range(3):
        tester.send({"id": ident, "amount": 1}, key="a")
    tester.run()
    # As after a crash before the commit: the records are read again from the start.
    tester.broker.commit("input", {0: 0})
    tester.send({"id": 3, "amount": 1}, key="a")
    result = tester.run()
    assert [v["total"] for v in result.values("output")] == [1, 2, 3, 4]


def test_keys_expire_after_ttl_of_event_time_without_an_update() -> None:
    observability = ObservabilityRuntime()
    step = StatefulStep(running_total, ttl_ms=1000)
    tester = TestRunner(flow_of(step), observability_runtime=observability)
    tester.send({"id": 1, "amount": 5}, key="old", timestamp_ms=0)
    tester.send({"id": 2, "amount": 5}, key="fresh", timestamp_ms=900)
    tester.run(advance_ms=600)  # event time 1500: "old" was last updated 1500 ms ago
    tester.send({"id": 3, "amount": 1}, key="old", timestamp_ms=1600)
    tester.send({"id": 4, "amount": 1}, key="fresh", timestamp_ms=1600)
    result = tester.run()
    assert [v["total"] for v in result.values("output")[2:]] == [1, 6]
    expired = observability.registry.get_sample_value(
        "loom_state_expired_keys_total", {"flow": "stateful", "node": "running_total"}
    )
    assert expired == 1


def test_state_gauges_count_keys_and_estimate_their_size() -> None:
    observability = ObservabilityRuntime()
    tester = TestRunner(flow_of(StatefulStep(running_total)), observability_runtime=observability)
    for key in "abc":
        tester.send({"id": 0, "amount": 1}, key=key)
    tester.run()
    labels = {"flow": "stateful", "node": "running_total", "worker": "0"}
    assert observability.registry.get_sample_value("loom_state_keys", labels) == 3
    size = observability.registry.get_sample_value("loom_state_bytes", labels)
    assert size is not None
    assert size > 0


@pytest.mark.parametrize(
    ("nodes", "problem"),
    [
        (
            (StatefulStep(running_total), StatefulStep(running_total)),
            "comes after the stateful node 'running_total'",
        ),
        ((StatefulStep(running_total, ttl_ms=0),), "ttl_ms must be None or an int >= 1"),
        ((StatefulStep(running_total, key="id"),), "key must be a function of the payload"),
    ],
    ids=["two_in_a_row", "zero_ttl", "key_not_callable"],
)
def test_compile_problems_of_a_stateful_step(nodes: tuple[Any, ...], problem: str) -> None:
    with pytest.raises(FlowValidationError) as caught:
        compile_flow(flow_of(*nodes), {"topics": {"input": "i", "output": "o", "dlq": "d"}})
    assert problem in str(caught.value)


def test_a_key_function_that_groups_records_across_partitions_is_refused_per_record() -> None:
    step = StatefulStep(running_total, key=lambda value: value["country"])
    tester = TestRunner(flow_of(step), partitions=2)
    tester.send({"id": 1, "amount": 1, "country": "fr"}, partition=0)
    tester.send({"id": 2, "amount": 1, "country": "fr"}, partition=1)  # the same key elsewhere
    result = tester.run()
    assert [v["total"] for v in result.values("output")] == [1]
    (letter,) = result.dead_letters("dlq")
    assert (letter.kind, letter.exception_type) == (ErrorKind.TASK, "KeySpansPartitions")
    assert "input partition 0 and now comes from partition 1" in letter.message
