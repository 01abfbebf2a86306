"""WindowAggregate on the real Bytewax runtime (TestRunner): windows, lateness, aggregates."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from loom.observability import ObservabilityRuntime
from loom.streaming import (
    BatchStep,
    Collect,
    CollectBatch,
    Count,
    ErrorKind,
    FlowValidationError,
    FromTopic,
    Hopping,
    IntoTopic,
    Max,
    Mean,
    Min,
    Process,
    RecordStep,
    Route,
    Router,
    Session,
    StreamFlow,
    Sum,
    Tumbling,
    WindowAggregate,
    WithAsync,
    compile_flow,
)
from loom.streaming.bytewax.runner import BytewaxRuntimeConfig
from loom.streaming.testing import TestRunner
from loom.streaming.windows import Window

TOPICS = {"topics": {"input": "i", "output": "o", "dlq": "d", "big": "b", "small": "s"}}


def flow_of(*nodes: Any, output: bool = True) -> StreamFlow[Any, Any]:
    return StreamFlow(
        "windows",
        source=FromTopic("input"),
        process=Process(*nodes),
        output=IntoTopic("output") if output else None,
        errors=IntoTopic("dlq"),
    )


def results(tester: TestRunner, **run: Any) -> list[tuple[str, int, int, Any]]:
    values = tester.run(**run).values("output")
    return [(v["key"], v["start_ms"], v["end_ms"], v["value"]) for v in values]


def test_tumbling_windows_are_aligned_to_the_epoch_and_emitted_once_closed() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count())))
    for stamp in [1_250, 1_999, 2_000, 2_500]:
        tester.send({"n": 1}, key="a", timestamp_ms=stamp)
    assert results(tester) == [("a", 1000, 2000, 2)]  # [2000, 3000) is still open
    assert results(tester, advance_ms=500) == [("a", 1000, 2000, 2), ("a", 2000, 3000, 2)]


def test_open_windows_hold_their_records_commit_until_the_snapshot() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count())))
    tester.send({"n": 1}, key="a", timestamp_ms=10)
    result = tester.run()
    assert result.values("output") == []
    assert result.committed("input") == {0: 1}  # the drain's snapshot holds the open window


def test_windows_are_kept_per_key() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count())))
    for key, stamp in [("a", 100), ("b", 200), ("a", 300)]:
        tester.send({"n": 1}, key=key, timestamp_ms=stamp)
    assert sorted(results(tester, advance_ms=1000)) == [("a", 0, 1000, 2), ("b", 0, 1000, 1)]


def test_a_window_stays_open_for_the_grace_period() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count(), grace_ms=500)))
    tester.send({"n": 1}, key="a", timestamp_ms=900)
    tester.send({"n": 1}, key="a", timestamp_ms=1400)  # event time 1400: [0, 1000) still open
    tester.send({"n": 1}, key="a", timestamp_ms=800)
    assert results(tester) == []
    assert results(tester, advance_ms=100) == [("a", 0, 1000, 2)]


def test_a_record_for_a_closed_window_is_a_late_dead_letter_with_its_bytes() -> None:
    observability = ObservabilityRuntime()
    tester = TestRunner(
        flow_of(WindowAggregate(Tumbling(1000), Count())), observability_runtime=observability
    )
    tester.send({"n": 1}, key="a", timestamp_ms=500)
    tester.send({"n": 1}, key="a", timestamp_ms=1500)  # closes [0, 1000)
    tester.send(b'{"n": 2}', key="a", timestamp_ms=999)
    result = tester.run(advance_ms=1000)
    assert [(v["start_ms"], v["value"]) for v in result.values("output")] == [(0, 1), (1000, 1)]
    (letter,) = result.dead_letters("dlq")
    assert letter.kind is ErrorKind.LATE
    assert letter.value == b'{"n": 2}'
    assert "[0, 1000)" in letter.message
    late = observability.registry.get_sample_value(
        "loom_late_records_total", {"flow": "windows", "node": "window_count"}
    )
    assert late == 1


def test_event_time_can_come_from_the_payload() -> None:
    window = WindowAggregate(Tumbling(1000), Sum("n"), event_time=lambda v: v["at"], grace_ms=500)
    tester = TestRunner(flow_of(window))
    for at, n in [(100, 1), (1100, 2), (200, 3)]:
        tester.send({"at": at, "n": n}, key="a", timestamp_ms=5_000_000)
    assert results(tester, advance_ms=1500) == [("a", 0, 1000, 4), ("a", 1000, 2000, 2)]


def test_a_hopping_window_counts_a_record_in_every_window_holding_it() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Hopping(1000, 500), Count())))
    for stamp in [100, 600, 1200]:
        tester.send({"n": 1}, key="a", timestamp_ms=stamp)
    assert results(tester, advance_ms=2000) == [
        ("a", -500, 500, 1),
        ("a", 0, 1000, 2),
        ("a", 500, 1500, 2),
        ("a", 1000, 2000, 1),
    ]


def test_a_session_closes_after_the_gap_and_a_record_can_bridge_two_sessions() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Session(1000), Collect(10))))
    for n, stamp in [(1, 0), (2, 500), (3, 2200), (4, 1400)]:  # 4 bridges [0, 500] and [2200]
        tester.send({"n": n}, key="a", timestamp_ms=stamp)
    tester.send({"n": 5}, key="a", timestamp_ms=9000)
    values = results(tester, advance_ms=1000)
    assert values == [
        ("a", 0, 3200, [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]),
        ("a", 9000, 10000, [{"n": 5}]),
    ]


def test_the_built_in_aggregates() -> None:
    def run(aggregate: Any) -> Any:
        tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), aggregate)))
        for n in [4, 1, 7]:
            tester.send({"n": n}, key="a", timestamp_ms=10)
        return results(tester, advance_ms=1000)[0][3]

    assert run(Count()) == 3
    assert run(Sum("n")) == 12
    assert run(Sum(lambda v: v["n"] * 2)) == 24
    assert run(Min("n")) == 1
    assert run(Max("n")) == 7
    assert run(Mean("n")) == 4
    assert run(Collect(2)) == [{"n": 4}, {"n": 1}]


def test_a_custom_aggregate_gets_the_key_and_the_window() -> None:
    class Span:
        def initial(self) -> list[int]:
            return []

        def add(self, acc: list[int], value: dict[str, int]) -> list[int]:
            return [*acc, value["n"]]

        def result(self, key: bytes, window: Window, acc: list[int]) -> dict[str, Any]:
            return {"who": key.decode(), "from": window.start_ms, "values": acc}

    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Span())))
    tester.send({"n": 3}, key="a", timestamp_ms=10)
    assert tester.run(advance_ms=1000).values("output") == [{"who": "a", "from": 0, "values": [3]}]


def test_results_are_keyed_by_the_state_key() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count(), key=lambda v: v["u"])))
    tester.send({"u": "x"}, timestamp_ms=10)
    assert [r.key_bytes for r in tester.run(advance_ms=1000).records("output")] == [b"x"]


def test_an_idle_partition_closes_windows_as_the_clock_moves_on() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count())), partitions=2)
    tester.send({"n": 1}, key="a", partition=0, timestamp_ms=100)
    tester.send({"n": 1}, key="b", partition=1, timestamp_ms=100)
    tester.send({"n": 1}, key="b", partition=1, timestamp_ms=5000)  # only partition 1 moves on
    assert results(tester) == [("b", 0, 1000, 1)]
    after = results(tester, advance_ms=1000)  # idle for a second: both partitions move on
    assert sorted(after[1:]) == [("a", 0, 1000, 1), ("b", 5000, 6000, 1)]


def test_results_do_not_depend_on_how_many_workers_read_the_input() -> None:
    def run(workers: int) -> list[tuple[str, int, int, Any]]:
        tester = TestRunner(flow_of(WindowAggregate(Hopping(1000, 250), Sum("n"))), partitions=4)
        for i in range(400):
            tester.send({"n": i}, key=f"k{i % 7}", timestamp_ms=i * 37)
        runtime = BytewaxRuntimeConfig(workers_per_process=workers)
        return sorted(results(tester, advance_ms=2000, runtime=runtime))

    one = run(1)
    assert {key for key, *_ in one} == {f"k{i}" for i in range(7)}
    assert run(2) == one


def test_steps_before_async_before_and_a_router_after_compose() -> None:
    async def double(value: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        return {"n": value["n"] * 2}

    router = Router(
        Route(lambda r: r.value >= 10, IntoTopic("big")),
        default=IntoTopic("small"),
    )
    flow = flow_of(
        RecordStep(lambda v: {"n": v["n"] + 1}),
        WithAsync(double),
        WindowAggregate(Tumbling(1000), Sum("n")),
        router,
        output=False,
    )
    tester = TestRunner(flow)
    for key, n in [("a", 1), ("a", 2), ("b", 0)]:  # a: 4 + 6, b: 2
        tester.send({"n": n}, key=key, timestamp_ms=10)
    result = tester.run(advance_ms=1000)
    assert [v["value"] for v in result.values("big")] == [10]
    assert [v["value"] for v in result.values("small")] == [2]


@pytest.mark.parametrize(
    ("window", "aggregate", "problem"),
    [
        (Hopping(1000, 300), Count(), "Hopping size_ms must be a multiple of step_ms"),
        (Tumbling(0), Count(), "Tumbling size_ms must be an int >= 1"),
        ("1s", Count(), "window must be Tumbling(...), Hopping(...) or Session(...)"),
        (Session(1000), object(), "has no initial, add, result, merge method"),
    ],
    ids=["hop_not_multiple", "zero_size", "not_a_window", "no_merge_for_sessions"],
)
def test_compile_problems_of_a_window(window: Any, aggregate: Any, problem: str) -> None:
    with pytest.raises(FlowValidationError) as caught:
        compile_flow(flow_of(WindowAggregate(window, aggregate)), TOPICS)
    assert problem in str(caught.value)


def test_a_window_after_a_collect_batch_is_refused() -> None:
    nodes = (CollectBatch(10, 100), BatchStep(lambda b: b), WindowAggregate(Tumbling(1), Count()))
    with pytest.raises(FlowValidationError) as caught:
        compile_flow(flow_of(*nodes), TOPICS)
    assert "comes after a CollectBatch" in str(caught.value)


def test_a_result_that_raises_is_dead_lettered_with_the_window_it_held() -> None:
    class Fragile(Count):
        def result(self, key: bytes, window: Window, acc: int) -> Any:
            raise ValueError("cannot summarise")

    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Fragile())))
    tester.send({"n": 1}, key="a", timestamp_ms=10)
    result = tester.run(advance_ms=1000)
    (letter,) = result.dead_letters("dlq")
    assert (letter.kind, letter.exception_type, letter.key) == (ErrorKind.TASK, "ValueError", b"a")
    assert msgspec.json.decode(letter.value or b"") == {
        "start_ms": 0,
        "end_ms": 1000,
        "accumulator": 1,
    }
    assert result.committed("input") == {0: 1}


def test_a_key_that_cannot_be_hashed_is_a_task_error() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count(), key=lambda v: v["tags"])))
    tester.send({"tags": ["x"]}, timestamp_ms=10)
    (letter,) = tester.run().dead_letters("dlq")
    assert (letter.kind, letter.exception_type) == (ErrorKind.TASK, "TypeError")


def test_any_advance_of_the_test_clock_closes_the_windows_it_reaches() -> None:
    tester = TestRunner(flow_of(WindowAggregate(Tumbling(1000), Count())))
    tester.send({"n": 1}, key="a", timestamp_ms=997)
    assert results(tester, advance_ms=2) == []  # event time 999: still open
    assert results(tester, advance_ms=1) == [("a", 0, 1000, 1)]
