"""Async steps: an anyio event loop beside the Bytewax workers.

:class:`AsyncBridge` owns one event loop thread (asyncio, asyncio + uvloop,
or trio) reached through an anyio blocking portal; worker threads submit
coroutines and get ``concurrent.futures.Future`` objects back. :class:`AsyncOp`
is the operator of a ``WithAsync`` node: it keeps up to ``max_concurrency``
calls in flight per worker *across* chunks and emits results in input order.
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

    def submit(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Future[Any]:
        if self._portal is None:
            self.start()
        assert self._portal is not None
        return self._portal.start_task_soon(fn, *args)

    def close(self) -> bool:
        """Stop the loop after in-flight tasks finish, within the force timeout.

        Returns False when the timeout expired and the loop thread was
        abandoned (it is a daemon thread and dies with the process).
        """
        context, self._context, self._portal = self._context, None, None
        if context is None:
            return True
        stopper = threading.Thread(
            target=context.__exit__, args=(None, None, None), daemon=True, name="loom-async-stop"
        )
        stopper.start()
        timeout_ms = self.force_shutdown_timeout_ms
        stopper.join(None if timeout_ms is None else timeout_ms / 1000)
        if stopper.is_alive():
            logger.warning(
                "async tasks still running after force_shutdown_timeout_ms=%s; "
                "abandoning the %s event loop (their records stay uncommitted)",
                timeout_ms,
                self.backend,
            )
            return False
        return True


class AsyncOp:
    """The operator of a ``WithAsync`` node.

    Records are submitted as they arrive; when ``max_concurrency`` calls are
    in flight the worker waits for the oldest (backpressure, bounded memory).
    Finished results are emitted in submission order, so per-partition order
    is preserved; ticks from the source hand back results while input idles.
    """

    def __init__(
        self, flow: str, plan: AsyncPlan, bridge: AsyncBridge, in_flight: Gauge | None = None
    ) -> None:
        self.flow = flow
        self.in_flight_gauge = in_flight
        self.node = plan.node_id
        self.plan = plan
        self.bridge = bridge
        self.timeout_s = None if plan.timeout_ms is None else plan.timeout_ms / 1000
        self._pending: dict[int, deque[tuple[Rec, Future[Any]]]] = {}

    async def _invoke(self, argument: Any) -> Any:
        if self.timeout_s is None:
            return await self.plan.fn(argument)
        with anyio.move_on_after(self.timeout_s):
            return await self.plan.fn(argument)
        raise AsyncTimeout(f"{self.node} did not finish within {self.plan.timeout_ms} ms")

    def __call__(self, chunk: Chunk) -> Chunk:
        pending = self._pending.get(chunk.worker)
        if pending is None:
            pending = self._pending[chunk.worker] = deque()
        out: list[Rec] = []
        failed: list[Failure] = []
        limit = self.plan.max_concurrency
        for rec in chunk.records:
            while len(pending) >= limit:
                self._resolve(*pending.popleft(), out, failed)
            argument = step_argument(rec, self.plan.takes_message)
            pending.append((rec, self.bridge.submit(self._invoke, argument)))
        while pending and pending[0][1].done():
            self._resolve(*pending.popleft(), out, failed)
        if self.in_flight_gauge is not None:
            self.in_flight_gauge.labels(self.flow, self.node, str(chunk.worker)).set(len(pending))
        if not out and not failed and not chunk.records:
            return chunk
        return chunk.derive(out, [*chunk.failures, *failed] if failed else chunk.failures)

    def in_flight(self, worker: int) -> int:
        return len(self._pending.get(worker, ()))

    def _resolve(
        self, rec: Rec, future: Future[Any], out: list[Rec], failed: list[Failure]
    ) -> None:
        try:
            result = future.result()
        except AsyncTimeout as exc:
            failed += failures_for(self.flow, self.node, ErrorKind.TIMEOUT, rec, exc)
            return
        except Exception as exc:
            failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
            return
        if self.plan.kind == "record":
            if result is None:
                rec.ack.release()
            else:
                rec.set_result(result)
                out.append(rec)
            return
        try:
            results = materialise(result)
        except TypeError as exc:
            failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, exc)
            return
        fan_out(rec, results, rec.ack, out)
