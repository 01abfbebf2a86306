"""Async steps: an anyio event loop beside the Bytewax workers.

:class:`AsyncBridge` owns one event loop thread (asyncio, asyncio + uvloop,
or trio) reached through an anyio blocking portal. :class:`AsyncOp` is the
operator of a ``WithAsync`` node.

Crossing threads costs far more than an async call itself, so records cross
once per *chunk*: the worker hands a chunk's records to the loop in one portal
call, the loop starts each call as soon as one of the ``max_concurrency``
slots frees up (the window lives in the loop and spans chunks and polls), and
the worker collects finished results, in input order, whenever a chunk or a
tick passes. The worker never blocks on a call, so stop requests, commits and
delivery reports keep flowing even when a call hangs.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from loom.config.runtime import AsyncBackend
from loom.observability.metrics import BatchedObserver, DropReason, FlowMetrics
from loom.streaming.bytewax.operators import (
    emit_result,
    materialise,
    step_argument,
)
from loom.streaming.bytewax.records import (
    AsyncTimeout,
    Chunk,
    Failure,
    Rec,
    error_kind_of,
    failures_for,
    format_traceback,
)
from loom.streaming.bytewax.retries import attempt_failures
from loom.streaming.bytewax.worker import RunState
from loom.streaming.errors import ErrorKind
from loom.streaming.plan import AsyncPlan, RetryPlan

logger = logging.getLogger("loom.streaming.async")

__all__ = ["AsyncBridge", "AsyncOp", "AsyncTimeout", "RetryingAsyncOp"]


class AsyncBridge:
    """An event loop thread that Bytewax workers hand coroutines to."""

    def __init__(
        self,
        backend: AsyncBackend = "asyncio",
        *,
        use_uvloop: bool = False,
        force_shutdown_timeout_ms: int | None = None,
    ) -> None:
        self.backend = backend
        self.use_uvloop = use_uvloop and backend == "asyncio" and sys.platform != "win32"
        self.force_shutdown_timeout_ms = force_shutdown_timeout_ms
        self._context: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None

    def start(self) -> None:
        """Start the event loop thread; idempotent."""
        if self._portal is not None:
            return
        options = {"use_uvloop": True} if self.use_uvloop else {}
        self._context = start_blocking_portal(self.backend, backend_options=options)
        self._portal = self._context.__enter__()

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Future[Any]:
        """Start ``fn(*args)`` on the loop; the future completes with its result."""
        if self._portal is None:
            self.start()
        assert self._portal is not None
        return self._portal.start_task_soon(fn, *args)

    def close(self, *, abandon: bool = False) -> bool:
        """Stop the loop after in-flight calls finish, within the force timeout.

        With ``abandon`` (the drain already gave up on them) it does not wait
        at all. Returns False when calls were left running: their thread is a
        daemon and dies with the process, their records stay uncommitted.
        """
        context, self._context, self._portal = self._context, None, None
        if context is None:
            return True
        stopper = threading.Thread(
            target=context.__exit__, args=(None, None, None), daemon=True, name="loom-async-stop"
        )
        stopper.start()
        timeout_ms = 0 if abandon else self.force_shutdown_timeout_ms
        stopper.join(None if timeout_ms is None else timeout_ms / 1000)
        if stopper.is_alive():
            logger.warning(
                "async calls still running after force_shutdown_timeout_ms=%s; "
                "abandoning the %s event loop (their records stay uncommitted)",
                self.force_shutdown_timeout_ms,
                self.backend,
            )
            return False
        return True


class _Lane:
    """One worker's calls of one async node: submitted in order, finished in any order.

    ``results`` is written by the loop thread and read by the worker thread;
    single dict operations are atomic in CPython, and each key is written once
    before it is read.
    """

    __slots__ = (
        "harvested",
        "queue",
        "records",
        "results",
        "runners",
        "running",
        "submitted",
        "traced",
    )

    def __init__(self) -> None:
        self.records: dict[int, Rec] = {}
        self.results: dict[int, tuple[bool, Any]] = {}
        self.submitted = 0
        self.harvested = 0
        self.traced = False
        """Some pending record may have a span (records outlive their chunk here)."""
        self.queue: deque[tuple[int, Any]] = deque()
        """Calls not started yet (loop thread only)."""
        self.runners = 0
        """Coroutines taking calls from ``queue`` (loop thread only)."""
        self.running = 0
        """Calls started and not finished (written by the loop thread; the
        ``loom_async_in_flight`` gauge reads it at scrape time)."""

    @property
    def pending(self) -> int:
        return self.submitted - self.harvested


class AsyncOp:
    """The operator of a ``WithAsync`` node.

    At most ``max_concurrency`` calls run at once per worker; records beyond
    that wait in the loop, and the worker's source stops polling while more
    than :attr:`backlog_limit` records wait here (bounded memory). Results
    are emitted in input order, so per-partition order is preserved.
    """

    def __init__(
        self,
        flow: str,
        plan: AsyncPlan,
        bridge: AsyncBridge,
        run: RunState,
        metrics: FlowMetrics | None = None,
    ) -> None:
        self.flow = flow
        self.node = plan.node_id
        self.plan = plan
        self.bridge = bridge
        self.run = run
        self.metrics = metrics
        self.timeout_s = None if plan.timeout_ms is None else plan.timeout_ms / 1000
        self.backlog_limit = max(1000, 4 * plan.max_concurrency)
        self._lanes: dict[int, _Lane] = {}
        self._seconds: BatchedObserver | None = None
        self._filtered = None
        self._empty = None
        if metrics is not None:
            # Observed per call on the loop thread, added to the histogram in bulk.
            self._seconds = BatchedObserver(metrics.step_seconds.labels(flow, self.node))
            self._filtered = metrics.dropped.labels(flow, self.node, DropReason.FILTERED)
            self._empty = metrics.dropped.labels(flow, self.node, DropReason.EMPTY)

    # -- event loop side ----------------------------------------------------

    async def _admit(self, lane: _Lane, batch: list[tuple[int, Any]]) -> None:
        """Queue a chunk's calls and start runners up to ``max_concurrency``.

        Runners are long-lived coroutines that take the next queued call as
        soon as they finish one: no task is created per record.
        """
        lane.queue.extend(batch)
        extra = min(self.plan.max_concurrency - lane.runners, len(lane.queue))
        if extra <= 0:
            return
        lane.runners += extra
        async with anyio.create_task_group() as group:
            for _ in range(extra):
                group.start_soon(self._runner, lane)

    async def _runner(self, lane: _Lane) -> None:
        queue, results, seconds = lane.queue, lane.results, self._seconds
        clock = time.perf_counter
        try:
            while queue:
                seq, argument = queue.popleft()
                lane.running += 1
                started = clock()
                try:
                    results[seq] = (True, await self._invoke(argument))
                except Exception as exc:
                    results[seq] = (False, exc)
                finally:
                    lane.running -= 1
                    if seconds is not None:
                        seconds.observe(clock() - started)
        finally:
            lane.runners -= 1
            if seconds is not None:  # nothing left to run: publish what was observed
                seconds.flush()

    async def _invoke(self, argument: Any) -> Any:
        if self.timeout_s is None:
            return await self.plan.fn(argument)
        stack = None
        with anyio.move_on_after(self.timeout_s) as scope:
            try:
                return await self.plan.fn(argument)
            except anyio.get_cancelled_exc_class() as cancelled:
                if scope.cancel_called:  # where the call was waiting when it timed out
                    stack = format_traceback(cancelled.__traceback__, trim_event_loop=True)
                raise
        raise AsyncTimeout(f"{self.node} did not finish within {self.plan.timeout_ms} ms", stack)

    # -- worker side --------------------------------------------------------

    def __call__(self, chunk: Chunk) -> Chunk:
        lane = self._lanes.get(chunk.worker)
        if lane is None:
            lane = self._lanes[chunk.worker] = self._new_lane(chunk.worker)
        if chunk.traced:
            lane.traced = True
        traced = lane.traced
        if chunk.records:
            batch = []
            for rec in chunk.records:
                seq = lane.submitted
                lane.records[seq] = rec
                batch.append((seq, step_argument(rec, self.plan.takes_message)))
                lane.submitted += 1
            self.bridge.spawn(self._admit, lane, batch)
        out: list[Rec] = []
        failed: list[Failure] = []
        results = lane.results
        dropped = 0
        while lane.harvested in results:
            seq = lane.harvested
            ok, value = results.pop(seq)
            dropped += self._resolve(lane.records.pop(seq), ok, value, out, failed, traced=traced)
            lane.harvested += 1
        if not lane.pending:
            lane.traced = False
        self.run.worker(chunk.worker).async_backlog[self.node] = lane.pending - self.backlog_limit
        if dropped:
            counter = self._filtered if self.plan.kind == "record" else self._empty
            if counter is not None:
                counter.inc(dropped)
        if not out and not failed and not chunk.records:
            return chunk
        failures = [*chunk.failures, *failed] if failed else chunk.failures
        if traced == chunk.traced:
            return chunk.derive(out, failures)
        return Chunk(chunk.worker, out, failures, chunk.flush, traced)

    def _new_lane(self, worker: int) -> _Lane:
        lane = _Lane()
        if self.metrics is not None:
            labels = (self.flow, self.node, str(worker))
            # Read at scrape time: the calls running now, not a per-chunk snapshot.
            self.metrics.async_in_flight.labels(*labels).set_function(lambda: lane.running)
            self.metrics.async_queued.labels(*labels).set_function(lambda: len(lane.queue))
        return lane

    def _resolve(
        self,
        rec: Rec,
        ok: bool,
        value: Any,
        out: list[Rec],
        failed: list[Failure],
        *,
        traced: bool,
    ) -> int:
        """Emit a finished call's result; returns the input records it dropped.

        ``traced``: the record may have a span, to be told why it is dropped.
        """
        if not ok:
            kind = ErrorKind.TIMEOUT if isinstance(value, AsyncTimeout) else error_kind_of(value)
            failed += failures_for(self.flow, self.node, kind, rec, value)
            return 0
        record = self.plan.kind == "record"
        if not record:
            try:
                value = materialise(value)
            except TypeError as exc:
                failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, exc)
                return 0
        return emit_result(rec, value, out, record=record, node=self.node, traced=traced)


class _Exhausted(NamedTuple):
    """A call that failed after ``made`` attempts (more than one)."""

    error: Exception
    made: int


class RetryingAsyncOp(AsyncOp):
    """The operator of a ``WithAsync`` node with ``retry``.

    A failed call with a retryable error (a ``TIMEOUT`` included, see
    ``Retry``) waits for its backoff with ``anyio.sleep`` inside its runner,
    then runs again: the event loop, the worker and the other runners go on
    meanwhile. The waiting call keeps its concurrency slot (its runner), so at
    most ``max_concurrency`` calls, waiting retries included, are in flight
    and the dependency being retried never sees more load than that. Results
    still leave in input order: a record waiting for a retry holds back the
    results after it, as a slow call does, and holds its ack (the commit
    point stays below it). A stop waits for a waiting retry as for any call
    in flight (within the drain timeout and ``force_shutdown_timeout_ms``).
    The adapter picks this class only for a node with ``retry``: ``AsyncOp``
    runs unchanged without one.
    """

    def __init__(
        self,
        flow: str,
        plan: AsyncPlan,
        bridge: AsyncBridge,
        run: RunState,
        metrics: FlowMetrics | None = None,
    ) -> None:
        super().__init__(flow, plan, bridge, run, metrics)
        assert plan.retry is not None
        self.policy: RetryPlan = plan.retry
        self._retries = metrics.retries.labels(flow, self.node) if metrics is not None else None

    async def _runner(self, lane: _Lane) -> None:
        queue, results, seconds = lane.queue, lane.results, self._seconds
        clock = time.perf_counter
        try:
            while queue:
                seq, argument = queue.popleft()
                lane.running += 1
                try:
                    results[seq] = await self._attempts(argument, seconds, clock)
                finally:
                    lane.running -= 1
        finally:
            lane.runners -= 1
            if seconds is not None:
                seconds.flush()

    async def _attempts(
        self, argument: Any, seconds: BatchedObserver | None, clock: Callable[[], float]
    ) -> tuple[bool, Any]:
        """Call until a call succeeds, fails for good, or the attempts run out."""
        policy, made = self.policy, 0
        while True:
            made += 1
            started = clock()
            try:
                return (True, await self._invoke(argument))
            except Exception as exc:
                if made >= policy.attempts or not policy.retryable(exc):
                    return (False, exc if made == 1 else _Exhausted(exc, made))
            finally:
                if seconds is not None:
                    seconds.observe(clock() - started)
            await anyio.sleep(policy.delay_s(made))
            if self._retries is not None:
                self._retries.inc()

    def _resolve(
        self,
        rec: Rec,
        ok: bool,
        value: Any,
        out: list[Rec],
        failed: list[Failure],
        *,
        traced: bool,
    ) -> int:
        if not ok and isinstance(value, _Exhausted):
            error = value.error
            kind = ErrorKind.TIMEOUT if isinstance(error, AsyncTimeout) else error_kind_of(error)
            failed += attempt_failures(self.flow, self.node, kind, rec, error, made=value.made)
            return 0
        return super()._resolve(rec, ok, value, out, failed, traced=traced)
