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
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal
from prometheus_client import Gauge

from loom.config.runtime import AsyncBackend
from loom.streaming.bytewax.operators import fan_out, materialise, step_argument
from loom.streaming.bytewax.records import Chunk, Failure, Rec, error_kind_of, failures_for
from loom.streaming.bytewax.state import RunState
from loom.streaming.errors import ErrorKind
from loom.streaming.plan import AsyncPlan

logger = logging.getLogger("loom.streaming.async")


class AsyncTimeout(Exception):
    """An async step ran longer than its ``timeout_ms``."""


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

    __slots__ = ("harvested", "queue", "records", "results", "runners", "submitted")

    def __init__(self) -> None:
        self.records: dict[int, Rec] = {}
        self.results: dict[int, tuple[bool, Any]] = {}
        self.submitted = 0
        self.harvested = 0
        self.queue: deque[tuple[int, Any]] = deque()
        """Calls not started yet (loop thread only)."""
        self.runners = 0
        """Coroutines taking calls from ``queue`` (loop thread only)."""

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
        in_flight: Gauge | None = None,
    ) -> None:
        self.flow = flow
        self.node = plan.node_id
        self.plan = plan
        self.bridge = bridge
        self.run = run
        self.in_flight_gauge = in_flight
        self.timeout_s = None if plan.timeout_ms is None else plan.timeout_ms / 1000
        self.backlog_limit = max(1000, 4 * plan.max_concurrency)
        self._lanes: dict[int, _Lane] = {}

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
        queue, results = lane.queue, lane.results
        try:
            while queue:
                seq, argument = queue.popleft()
                try:
                    results[seq] = (True, await self._invoke(argument))
                except Exception as exc:
                    results[seq] = (False, exc)
        finally:
            lane.runners -= 1

    async def _invoke(self, argument: Any) -> Any:
        if self.timeout_s is None:
            return await self.plan.fn(argument)
        with anyio.move_on_after(self.timeout_s):
            return await self.plan.fn(argument)
        raise AsyncTimeout(f"{self.node} did not finish within {self.plan.timeout_ms} ms")

    # -- worker side --------------------------------------------------------

    def __call__(self, chunk: Chunk) -> Chunk:
        lane = self._lanes.get(chunk.worker)
        if lane is None:
            lane = self._lanes[chunk.worker] = _Lane()
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
        while lane.harvested in results:
            seq = lane.harvested
            ok, value = results.pop(seq)
            self._resolve(lane.records.pop(seq), ok, value, out, failed)
            lane.harvested += 1
        self.run.worker(chunk.worker).async_backlog[self.node] = lane.pending - self.backlog_limit
        if self.in_flight_gauge is not None:
            self.in_flight_gauge.labels(self.flow, self.node, str(chunk.worker)).set(lane.pending)
        if not out and not failed and not chunk.records:
            return chunk
        return chunk.derive(out, [*chunk.failures, *failed] if failed else chunk.failures)

    def _resolve(
        self, rec: Rec, ok: bool, value: Any, out: list[Rec], failed: list[Failure]
    ) -> None:
        if not ok:
            kind = ErrorKind.TIMEOUT if isinstance(value, AsyncTimeout) else error_kind_of(value)
            failed += failures_for(self.flow, self.node, kind, rec, value)
            return
        if self.plan.kind == "record":
            if value is None:
                rec.ack.release()
            else:
                rec.set_result(value)
                out.append(rec)
            return
        try:
            results = materialise(value)
        except TypeError as exc:
            failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, exc)
            return
        fan_out(rec, results, rec.ack, out)
