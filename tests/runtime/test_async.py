"""Async steps on the AsyncBridge: WithAsync and CollectBatch, on every backend.

Every test runs on asyncio, asyncio + uvloop and trio. The flows run on the
real Bytewax runtime with in-memory topics (``TestRunner``). Nothing waits a
fixed time for results: simulated I/O may sleep, observers poll with deadlines.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import pytest
import sniffio

from loom.config import ConfigContext
from loom.streaming import (
    BatchStep,
    BusinessError,
    CollectBatch,
    ErrorKind,
    ExpandStep,
    Message,
    RecordStep,
    WithAsync,
    compile_flow,
)
from loom.streaming.bytewax.runner import BytewaxRuntimeConfig, _create_bridge
from loom.streaming.testing import RunResult, TestRunner
from tests.runtime.payloads import Enriched, Order, enrich, enrich_flow, orders

ASYNC_LOGGERS = ("loom.streaming.async", "loom.streaming.source")


# -- backends -----------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One way to run the event loop, and how to recognise it from inside."""

    name: str
    runtime: BytewaxRuntimeConfig
    library: str
    uvloop: bool

    def with_force_shutdown(self, timeout_ms: int) -> BytewaxRuntimeConfig:
        return msgspec.structs.replace(self.runtime, force_shutdown_timeout_ms=timeout_ms)


BACKENDS = (
    Backend("asyncio", BytewaxRuntimeConfig(async_backend="asyncio"), "asyncio", False),
    Backend(
        "uvloop", BytewaxRuntimeConfig(async_backend="asyncio", use_uvloop=True), "asyncio", True
    ),
    Backend("trio", BytewaxRuntimeConfig(async_backend="trio"), "trio", False),
)


@pytest.fixture(params=BACKENDS, ids=[backend.name for backend in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param  # type: ignore[no-any-return]


def running_loop() -> tuple[str, bool]:
    """Inside a coroutine: the async library, and whether uvloop drives it."""
    library = sniffio.current_async_library()
    is_uvloop = (
        library == "asyncio"
        and type(asyncio.get_running_loop()).__module__.split(".")[0] == "uvloop"
    )
    return library, is_uvloop


# -- helpers ------------------------------------------------------------------


class Gauge:
    """Concurrent calls of a step. Only the event loop thread touches it."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.calls = 0

    def enter(self) -> None:
        self.calls += 1
        self.current += 1
        self.peak = max(self.peak, self.current)

    def exit(self) -> None:
        self.current -= 1


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Inside a step: poll ``condition`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(0.001)
    return True


def ends(tester: TestRunner) -> dict[int, int]:
    """The log end of every non-empty input partition."""
    broker = tester.broker
    return {
        p: end
        for p in range(broker.partitions)
        if (end := len(broker.partition_records(tester.input_topic, p)))
    }


def assert_fully_committed(tester: TestRunner, result: RunResult) -> None:
    assert result.committed("input") == ends(tester)


def ids(result: RunResult, topic: str = "output") -> list[str]:
    return [value["id"] for value in result.values(topic)]


def run(
    backend: Backend, *steps: object, inputs: list[Order], **run_kwargs: Any
) -> tuple[TestRunner, RunResult]:
    tester = TestRunner(enrich_flow(*steps))
    tester.send_all(inputs)
    return tester, tester.run(runtime=backend.runtime, **run_kwargs)


def run_bounded(tester: TestRunner, limit_s: float, **run_kwargs: Any) -> RunResult:
    """``tester.run`` on a helper thread, so a hang fails the test instead of the suite."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = tester.run(**run_kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="loom-test-run", daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        tester.runner.request_stop()
        pytest.fail(f"the run did not return within {limit_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    result: RunResult = outcome["result"]
    return result


# -- the bridge ---------------------------------------------------------------


def plan_of(*steps: object) -> Any:
    config = ConfigContext.from_dict({"topics": {t: t for t in ("input", "output", "dlq")}})
    return compile_flow(enrich_flow(*steps), config)


async def echo(order: Order) -> Order:
    return order


def test_create_bridge_returns_none_for_a_flow_without_async_steps(backend: Backend) -> None:
    assert _create_bridge(plan_of(RecordStep(enrich)), backend.runtime) is None


def test_create_bridge_runs_coroutines_on_the_configured_backend(backend: Backend) -> None:
    async def where() -> tuple[str, bool]:
        await anyio.sleep(0)
        return running_loop()

    bridge = _create_bridge(plan_of(WithAsync(echo), RecordStep(enrich)), backend.runtime)
    assert bridge is not None
    try:
        assert bridge.spawn(where).result(timeout=10) == (backend.library, backend.uvloop)
    finally:
        assert bridge.close()


def test_async_steps_of_a_flow_run_on_the_configured_event_loop(backend: Backend) -> None:
    seen: set[tuple[str, bool]] = set()

    async def lookup(order: Order) -> Order:
        seen.add(running_loop())
        return order

    _, result = run(backend, WithAsync(lookup), RecordStep(enrich), inputs=orders(5))
    assert seen == {(backend.library, backend.uvloop)}
    assert len(result.records("output")) == 5


# -- concurrency and backpressure -------------------------------------------------


def test_calls_for_different_records_run_concurrently_up_to_max_concurrency(
    backend: Backend,
) -> None:
    gauge = Gauge()
    deadline: list[float] = []

    async def lookup(order: Order) -> Order:
        gauge.enter()
        if not deadline:
            deadline.append(time.monotonic() + 5)
        # Hold every call until max_concurrency calls overlap: a step run one
        # record at a time would only get past this by the (shared) deadline.
        await wait_for(lambda: gauge.peak >= 10, deadline[0] - time.monotonic())
        await anyio.sleep(0.001)
        gauge.exit()
        return order

    tester, result = run(
        backend, WithAsync(lookup, max_concurrency=10), RecordStep(enrich), inputs=orders(200)
    )
    assert gauge.peak == 10
    assert gauge.calls == 200
    assert len(result.records("output")) == 200
    assert_fully_committed(tester, result)


def test_calls_overlap_across_polls_not_only_within_one_chunk(backend: Backend) -> None:
    started: set[str] = set()
    overlapped: list[bool] = []
    testers: list[TestRunner] = []

    async def lookup(order: Order) -> Order:
        started.add(order.id)
        if order.id == "first":
            # "second" does not exist yet: it can only be read by a later poll,
            # in another chunk, while this call is still in flight.
            testers[0].send(Order("second", 2))
            overlapped.append(await wait_for(lambda: "second" in started))
        return order

    tester = TestRunner(enrich_flow(WithAsync(lookup, max_concurrency=10), RecordStep(enrich)))
    testers.append(tester)
    tester.send(Order("first", 1))
    result = tester.run(
        runtime=backend.runtime, until=lambda r: len(r.records("output")) == 2, timeout_s=20
    )
    assert overlapped == [True]
    assert ids(result) == ["first", "second"]
    assert_fully_committed(tester, result)


def test_concurrent_calls_never_exceed_max_concurrency(backend: Backend) -> None:
    gauge = Gauge()
    durations = random.Random(4).choices([0.0, 0.001, 0.002, 0.004], k=300)

    async def lookup(order: Order) -> Order:
        gauge.enter()
        # Calls finish out of order, so slots free up behind a slow head.
        await anyio.sleep(durations[int(order.amount)])
        gauge.exit()
        return order

    _, result = run(
        backend, WithAsync(lookup, max_concurrency=5), RecordStep(enrich), inputs=orders(300)
    )
    assert gauge.peak == 5
    assert gauge.calls == 300
    assert len(result.records("output")) == 300


def test_max_concurrency_applies_per_worker(backend: Backend) -> None:
    gauge = Gauge()
    deadline: list[float] = []

    async def lookup(order: Order) -> Order:
        gauge.enter()
        if not deadline:
            deadline.append(time.monotonic() + 5)
        await wait_for(lambda: gauge.peak >= 6, deadline[0] - time.monotonic())
        gauge.exit()
        return order

    tester = TestRunner(
        enrich_flow(WithAsync(lookup, max_concurrency=3), RecordStep(enrich)), partitions=4
    )
    tester.send_all(orders(100))
    runtime = msgspec.structs.replace(backend.runtime, workers_per_process=2)
    result = tester.run(runtime=runtime)
    # Two workers share one event loop; each keeps its own window of 3.
    assert gauge.peak == 6
    assert len(result.records("output")) == 100
    assert_fully_committed(tester, result)


def test_outputs_keep_the_input_order_of_each_partition(backend: Backend) -> None:
    async def slower_first(order: Order) -> Order:
        # Early records finish last: any reordering would show.
        await anyio.sleep((60 - order.amount) / 5000)
        return order

    tester = TestRunner(
        enrich_flow(WithAsync(slower_first, max_concurrency=20), RecordStep(enrich)),
        partitions=2,
    )
    sent: dict[bytes, list[str]] = {}
    for order in orders(60):
        # Four keys, each always in the same input partition, both partitions used.
        index = int(order.amount) % 4
        key = f"k{index}".encode()
        tester.send(order, key=key, partition=index % 2)
        sent.setdefault(key, []).append(order.id)
    result = tester.run(runtime=backend.runtime)
    written: dict[bytes, list[str]] = {}
    decoder = msgspec.json.Decoder(Enriched)
    for record in result.records("output"):  # partition by partition, in log order
        written.setdefault(record.key_bytes or b"", []).append(
            decoder.decode(record.value_bytes or b"").id
        )
    assert written == sent
    assert_fully_committed(tester, result)


# -- results and errors ---------------------------------------------------------


def test_an_async_step_returning_none_drops_the_record_and_commits_it(backend: Backend) -> None:
    async def only_even(order: Order) -> Order | None:
        await anyio.sleep(0)
        return order if int(order.amount) % 2 == 0 else None

    tester, result = run(backend, WithAsync(only_even), RecordStep(enrich), inputs=orders(10))
    assert ids(result) == ["o0", "o2", "o4", "o6", "o8"]
    assert result.records("dlq") == []
    assert_fully_committed(tester, result)


def failing_flow_run(
    backend: Backend, step: WithAsync, failing: str = "o2"
) -> tuple[TestRunner, RunResult, bytes]:
    tester = TestRunner(enrich_flow(step, RecordStep(enrich)))
    original = b""
    for order in orders(6):
        record = tester.send(order, key=order.id)
        if order.id == failing:
            original = record.value_bytes or b""
    return tester, tester.run(runtime=backend.runtime), original


def test_an_exception_in_an_async_step_is_a_task_error_and_others_keep_flowing(
    backend: Backend,
) -> None:
    async def lookup(order: Order) -> Order:
        await anyio.sleep(0.001)
        if order.id == "o2":
            raise RuntimeError("lookup failed")
        return order

    tester, result, original = failing_flow_run(backend, WithAsync(lookup, max_concurrency=4))
    [envelope] = result.dead_letters("dlq")
    assert (envelope.kind, envelope.node) == (ErrorKind.TASK, "lookup")
    assert (envelope.exception_type, envelope.message) == ("RuntimeError", "lookup failed")
    assert (envelope.offset, envelope.key, envelope.value) == (2, b"o2", original)
    assert ids(result) == ["o0", "o1", "o3", "o4", "o5"]
    assert_fully_committed(tester, result)


def test_a_business_error_in_an_async_step_is_a_business_error(backend: Backend) -> None:
    async def lookup(order: Order) -> Order:
        await anyio.sleep(0.001)
        if order.id == "o2":
            raise BusinessError("unknown customer")
        return order

    tester, result, original = failing_flow_run(backend, WithAsync(lookup, max_concurrency=4))
    [envelope] = result.dead_letters("dlq")
    assert (envelope.kind, envelope.message) == (ErrorKind.BUSINESS, "unknown customer")
    assert (envelope.offset, envelope.value) == (2, original)
    assert ids(result) == ["o0", "o1", "o3", "o4", "o5"]
    assert_fully_committed(tester, result)


def test_an_async_step_over_its_timeout_is_a_timeout_error_and_others_keep_flowing(
    backend: Backend,
) -> None:
    async def lookup(order: Order) -> Order:
        if order.id == "o2":
            await anyio.sleep_forever()
        await anyio.sleep(0.001)
        return order

    tester, result, original = failing_flow_run(
        backend, WithAsync(lookup, max_concurrency=4, timeout_ms=50)
    )
    [envelope] = result.dead_letters("dlq")
    assert (envelope.kind, envelope.node) == (ErrorKind.TIMEOUT, "lookup")
    assert (envelope.offset, envelope.value) == (2, original)
    assert ids(result) == ["o0", "o1", "o3", "o4", "o5"]
    assert_fully_committed(tester, result)


def test_a_timed_out_call_is_cancelled_not_left_running(backend: Backend) -> None:
    cancelled: list[str] = []

    async def lookup(order: Order) -> Order:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(order.id)
            raise
        return order

    tester, result = run(
        backend, WithAsync(lookup, max_concurrency=4, timeout_ms=20), inputs=orders(3)
    )
    assert sorted(cancelled) == ["o0", "o1", "o2"]
    assert [e.kind for e in result.dead_letters("dlq")] == [ErrorKind.TIMEOUT] * 3
    assert_fully_committed(tester, result)


async def hang(order: Order) -> Order:
    await anyio.sleep_forever()
    return order


def test_a_timeout_envelope_ends_at_the_await_the_call_was_stuck_in(backend: Backend) -> None:
    _, result = run(backend, WithAsync(hang, max_concurrency=2, timeout_ms=20), inputs=orders(1))
    [envelope] = result.dead_letters("dlq")
    assert envelope.traceback is not None
    *frames, trimmed = envelope.traceback.splitlines()
    lines, first = inspect.getsourcelines(hang)
    stuck_at = first + next(i for i, line in enumerate(lines) if "sleep_forever" in line)
    assert frames[-1] == f"{__file__}:{stuck_at} in hang"
    assert trimmed.endswith("event loop frames omitted)")


# -- wrapped steps and batches ----------------------------------------------------


def test_with_async_wrapping_an_expand_step_emits_every_child_and_commits(
    backend: Backend,
) -> None:
    async def split(order: Order) -> list[Order]:
        await anyio.sleep(0.001)
        return [Order(f"{order.id}.{i}", order.amount) for i in range(int(order.amount))]

    tester, result = run(
        backend,
        WithAsync(ExpandStep(split), max_concurrency=3),
        RecordStep(enrich),
        inputs=orders(4),
    )
    assert ids(result) == ["o1.0", "o2.0", "o2.1", "o3.0", "o3.1", "o3.2"]
    assert_fully_committed(tester, result)


def test_with_async_after_collect_batch_gets_whole_batches(backend: Backend) -> None:
    batches: list[list[str]] = []

    async def store(batch: list[Order]) -> list[Order]:
        await anyio.sleep(0.001)
        batches.append([order.id for order in batch])
        return batch

    tester, result = run(
        backend,
        CollectBatch(4, timeout_ms=60_000),
        WithAsync(BatchStep(store), max_concurrency=2),
        RecordStep(enrich),
        inputs=orders(10),
    )
    # Full batches as the size is reached; the remainder on the final flush.
    # (Two batches run at once, so they may finish in either order.)
    assert sorted(batches) == [["o0", "o1", "o2", "o3"], ["o4", "o5", "o6", "o7"], ["o8", "o9"]]
    assert ids(result) == [f"o{i}" for i in range(10)]
    assert_fully_committed(tester, result)


def test_collect_batch_before_with_async_emits_on_timeout_when_the_stream_goes_idle(
    backend: Backend,
) -> None:
    sizes: list[int] = []

    async def store(batch: list[Order]) -> list[Order]:
        sizes.append(len(batch))
        return batch

    tester = TestRunner(enrich_flow(CollectBatch(1000, timeout_ms=30), WithAsync(BatchStep(store))))
    tester.send_all(orders(3))
    # The input stays open until the outputs appear: only the timeout can emit them.
    result = tester.run(
        runtime=backend.runtime, until=lambda r: len(r.records("output")) == 3, timeout_s=20
    )
    assert sizes == [3]
    assert ids(result) == ["o0", "o1", "o2"]
    assert_fully_committed(tester, result)


def test_a_failing_async_batch_dead_letters_every_member(backend: Backend) -> None:
    async def store(batch: list[Order]) -> list[Order]:
        await anyio.sleep(0.001)
        if any(order.id == "o5" for order in batch):
            raise RuntimeError("bulk insert failed")
        return batch

    tester, result = run(
        backend,
        CollectBatch(4, timeout_ms=60_000),
        WithAsync(BatchStep(store)),
        inputs=orders(10),
    )
    dead = result.dead_letters("dlq")
    assert sorted(e.offset or 0 for e in dead) == [4, 5, 6, 7]
    assert {e.kind for e in dead} == {ErrorKind.TASK}
    assert ids(result) == ["o0", "o1", "o2", "o3", "o8", "o9"]
    assert_fully_committed(tester, result)


# -- commits and shutdown -------------------------------------------------------------


def test_offsets_are_committed_only_after_their_async_results_are_delivered(
    backend: Backend,
) -> None:
    total = 20
    testers: list[TestRunner] = []
    violations: list[str] = []
    commit_points: set[int] = set()

    def check(offset: int, moment: str) -> None:
        broker = testers[0].broker
        committed = broker.committed("input").get(0, 0)
        delivered = len(broker.records("output"))
        commit_points.add(committed)
        if committed > offset:
            violations.append(f"offset {offset} committed as {committed} at its {moment}")
        if committed > delivered:
            violations.append(f"committed {committed} with {delivered} outputs delivered")

    async def lookup(message: Message[Order]) -> Order:
        assert message.meta is not None
        offset = message.meta.offset
        broker = testers[0].broker
        if offset + 1 < total:
            # The next record arrives while this call is in flight (a later poll).
            testers[0].send(Order(f"o{offset + 1}", offset + 1))
        check(offset, "start")
        # The records before this one finish meanwhile: the commit point moves
        # up to this record while its call is in flight, and not past it.
        if not await wait_for(lambda: broker.committed("input").get(0, 0) >= offset):
            violations.append(f"offset {offset}: earlier offsets not committed in time")
        await anyio.sleep(0.002)
        check(offset, "end")
        return message.payload

    # The window never fills (max_concurrency > total): a call waiting for a
    # commit needs no free slot, so the test checks commits, not backpressure.
    tester = TestRunner(
        enrich_flow(WithAsync(lookup, max_concurrency=50), RecordStep(enrich)),
        config={"kafka": {"consumer": {"auto.commit.interval.ms": 1}}},
    )
    testers.append(tester)
    tester.send(Order("o0", 0))
    result = tester.run(
        runtime=backend.runtime, until=lambda r: len(r.records("output")) == total, timeout_s=20
    )
    assert violations == []
    assert commit_points == set(range(total))
    assert ids(result) == [f"o{i}" for i in range(total)]
    assert_fully_committed(tester, result)


def test_stopping_waits_for_in_flight_calls_to_finish(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    testers: list[TestRunner] = []
    started: set[str] = set()
    stopped: list[bool] = []
    finished: list[str] = []

    async def lookup(order: Order) -> Order:
        started.add(order.id)
        if order.id == "o0":
            await wait_for(lambda: len(started) == 8)
            # Every record is in flight: stop the run as SIGTERM would.
            testers[0].runner.request_stop()
            stopped.append(True)
        await wait_for(lambda: bool(stopped))
        await anyio.sleep(0.02)  # the I/O is still going on after the stop
        finished.append(order.id)
        return order

    tester = TestRunner(enrich_flow(WithAsync(lookup, max_concurrency=10), RecordStep(enrich)))
    testers.append(tester)
    tester.send_all(orders(8))
    with caplog.at_level(logging.WARNING):
        # The input stays open: only the stop request ends the run.
        result = run_bounded(tester, 30, runtime=backend.runtime, until=lambda r: False)
    assert stopped == [True]
    assert sorted(finished) == [f"o{i}" for i in range(8)]
    assert ids(result) == [f"o{i}" for i in range(8)]
    assert_fully_committed(tester, result)
    assert [r.getMessage() for r in caplog.records if r.name in ASYNC_LOGGERS] == []


def stuck_flow(backend: Backend) -> tuple[TestRunner, threading.Event]:
    """o2's call awaits forever; the step has no timeout of its own."""
    stuck = threading.Event()

    async def lookup(order: Order) -> Order:
        if order.id == "o2":
            stuck.set()
            await anyio.sleep_forever()
        return order

    tester = TestRunner(enrich_flow(WithAsync(lookup, max_concurrency=10), RecordStep(enrich)))
    tester.send_all(orders(5))
    return tester, stuck


def test_a_stuck_call_cannot_hang_the_run_when_force_shutdown_timeout_ms_is_set(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    tester, stuck = stuck_flow(backend)
    with caplog.at_level(logging.WARNING):
        # The drain starts once o2 is stuck and the records before it are out.
        result = run_bounded(
            tester,
            30,
            runtime=backend.with_force_shutdown(200),
            until=lambda r: stuck.is_set() and len(r.records("output")) == 2,
            timeout_s=20,
        )
    warnings = [r for r in caplog.records if r.name in ASYNC_LOGGERS]
    assert warnings
    assert all(r.levelno == logging.WARNING for r in warnings)
    # Outputs are emitted in order, so o3 and o4 wait behind o2 and are
    # neither written nor committed: all three are read again on restart.
    # (Commits advance by polled ranges, so o0 and o1 may be read again too.)
    assert ids(result) == ["o0", "o1"]
    assert result.committed("input").get(0, 0) <= 2
    assert result.records("dlq") == []


def test_a_stuck_call_at_the_head_of_a_full_window_cannot_hang_the_run(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    testers: list[TestRunner] = []

    async def lookup(order: Order) -> Order:
        if order.id == "o0":
            testers[0].runner.request_stop()
            await anyio.sleep_forever()
        return order

    # Five records, two slots: o2 waits for a free slot behind the stuck o0.
    tester = TestRunner(enrich_flow(WithAsync(lookup, max_concurrency=2), RecordStep(enrich)))
    testers.append(tester)
    tester.send_all(orders(5))
    with caplog.at_level(logging.WARNING):
        result = run_bounded(
            tester, 3, runtime=backend.with_force_shutdown(200), until=lambda r: False
        )
    assert [r for r in caplog.records if r.name in ASYNC_LOGGERS]
    assert result.committed("input") == {}
    assert result.records("output") == []


def test_a_stuck_call_is_given_force_shutdown_timeout_ms_before_it_is_abandoned(
    backend: Backend,
) -> None:
    # How soon after the timeout the run returns is measured by
    # bench/shutdown.py; here only what load cannot break: the run returns
    # (a deadline), and not before the stuck call had its timeout_ms.
    tester, stuck = stuck_flow(backend)
    drain_requested: list[float] = []

    def until(result: RunResult) -> bool:
        ready = stuck.is_set() and len(result.records("output")) == 2
        if ready and not drain_requested:
            drain_requested.append(time.monotonic())
        return ready

    run_bounded(tester, 30, runtime=backend.with_force_shutdown(500), until=until, timeout_s=20)
    assert time.monotonic() - drain_requested[0] >= 0.5
