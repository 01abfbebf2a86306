"""Retries of synchronous steps: failed records are parked, not slept on.

A ``RecordStep``/``ExpandStep``/``BatchStep`` declared with ``retry`` runs
with :class:`RetryOp` instead of ``RecordOp``/``ExpandOp`` (the adapter picks
once, when it builds the dataflow, so a step without ``retry`` runs exactly
the operator it ran before). Sleeping inside a chunk would stall the whole
Bytewax worker (its polls, commits, delivery reports, every other record),
so a record whose call failed with a retryable error is *parked* with the
time its next attempt is due, and the chunk goes on without it. Each later
chunk, and each tick, runs the parked records that are due. The worker loop
ticks at least every 5 ms while records are in flight (a parked record
holds its ack, so it is in flight), so a retry starts at most ~5 ms after its
backoff ends, later only when the worker is busy with a chunk.

Order: the other records of a chunk leave with the chunk, not held by a
retry; records that did not wait keep their relative order; a record that
waited for a retry leaves when its retry succeeds, behind the records read
after it. Parked records are run in the order they fall due (ties: the
order they failed). A flow that needs input order across retries uses
``WithAsync``, whose results leave in input order.

Commits: a parked record holds its ack, so the commit point of its
partition stays below it until its retry succeeds, or its last attempt is
dead-lettered. On a drain, parked records keep their backoff: the drain waits
for them (within the drain timeout; past it they stay uncommitted and are
read again).

Load: parked records count as in flight, so while a dependency is down and
every record waits, the source stops polling once ``max_in_flight`` records
are unfinished (memory stays bounded). ``loom_step_seconds`` times each chunk
over its new records; calls of parked records made on a tick are not timed.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Any

import msgspec
from prometheus_client import Counter

from loom.observability.metrics import DropReason, FlowMetrics
from loom.streaming.bytewax.operators import (
    emit_result,
    materialise,
    step_argument,
)
from loom.streaming.bytewax.records import (
    PAYLOAD_TYPES,
    Chunk,
    Failure,
    Rec,
    error_kind_of,
    failures_for,
)
from loom.streaming.errors import ErrorKind
from loom.streaming.plan import RetryPlan, StepPlan


def attempt_failures(
    flow: str, node: str, kind: ErrorKind, rec: Rec, error: BaseException, *, made: int
) -> list[Failure]:
    """Failures of ``rec`` after ``made`` calls: their ``attempt`` counts every call.

    ``attempt`` keeps its meaning: the calls made for the record, plus the
    input's ``loom-attempt`` header (a replayed dead letter's count), so a
    record that failed once with no header is 1, as without a retry.
    """
    failures = failures_for(flow, node, kind, rec, error)
    if made == 1:
        return failures
    return [
        Failure(msgspec.structs.replace(f.envelope, attempt=f.envelope.attempt + made - 1), f.ack)
        for f in failures
    ]


class _Parked:
    """One worker's records waiting for a retry: a heap of (due, seq, rec, calls made)."""

    __slots__ = ("heap", "traced")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Rec, int]] = []
        self.traced = False
        """Some parked record may have a span (parked records outlive their chunk)."""


class RetryOp:
    """A synchronous step with ``retry``; see the module docstring."""

    def __init__(self, flow: str, plan: StepPlan, metrics: FlowMetrics | None = None) -> None:
        assert plan.retry is not None
        self.flow = flow
        self.node = plan.node_id
        self.fn = plan.fn
        self.takes_message = plan.takes_message
        self.policy: RetryPlan = plan.retry
        self.record = plan.kind == "record"
        self.reason = DropReason.FILTERED if self.record else DropReason.EMPTY
        self.dropped: Counter | None = None
        self.retries: Counter | None = None
        if metrics is not None:
            self.dropped = metrics.dropped.labels(flow, self.node, self.reason)
            self.retries = metrics.retries.labels(flow, self.node)
        self._parked: dict[int, _Parked] = {}
        self._seq = itertools.count()

    def __call__(self, chunk: Chunk) -> Chunk:
        parked = self._parked.get(chunk.worker)
        if parked is None:
            parked = self._parked[chunk.worker] = _Parked()
        heap = parked.heap
        if not chunk.records and not heap:
            return chunk
        traced = chunk.traced or parked.traced
        now = time.monotonic()
        out: list[Rec] = []
        failed: list[Failure] = []
        dropped = retried = 0
        while heap and heap[0][0] <= now:
            _, _, rec, made = heapq.heappop(heap)
            retried += 1
            dropped += self._call(rec, made, now, parked, out=out, failed=failed)
        if chunk.traced and chunk.records:
            parked.traced = True
        fn, takes_message = self.fn, self.takes_message
        if self.record:  # inline, as RecordOp: new records mostly succeed
            for rec in chunk.records:
                try:
                    result = fn(rec.as_message() if takes_message else rec.value)
                except Exception as exc:
                    self._failed(rec, exc, 1, now, parked, failed=failed)
                    continue
                if result is not None and type(result) in PAYLOAD_TYPES:
                    rec.value = result
                    out.append(rec)
                else:
                    dropped += self._emit(rec, result, out)
        else:
            for rec in chunk.records:
                dropped += self._call(rec, 0, now, parked, out=out, failed=failed)
        if not heap:
            parked.traced = False
        if retried and self.retries is not None:
            self.retries.inc(retried)
        if dropped and self.dropped is not None:
            self.dropped.inc(dropped)
        failures = [*chunk.failures, *failed] if failed else chunk.failures
        return Chunk(chunk.worker, out, failures, chunk.flush, traced)

    def _call(
        self,
        rec: Rec,
        made: int,
        now: float,
        parked: _Parked,
        *,
        out: list[Rec],
        failed: list[Failure],
    ) -> int:
        """Call the step for ``rec`` (``made`` calls made before); returns records dropped."""
        try:
            result: Any = self.fn(step_argument(rec, self.takes_message))
            if not self.record:
                result = materialise(result)
        except Exception as exc:
            self._failed(rec, exc, made + 1, now, parked, failed=failed)
            return 0
        return self._emit(rec, result, out)

    def _failed(
        self,
        rec: Rec,
        exc: Exception,
        made: int,
        now: float,
        parked: _Parked,
        *,
        failed: list[Failure],
    ) -> None:
        """``rec``'s ``made``-th call raised ``exc``: park it for a retry, or fail it."""
        policy = self.policy
        if made < policy.attempts and policy.retryable(exc):
            due = now + policy.delay_s(made)
            heapq.heappush(parked.heap, (due, next(self._seq), rec, made))
            return
        failed += attempt_failures(self.flow, self.node, error_kind_of(exc), rec, exc, made=made)

    def _emit(self, rec: Rec, result: Any, out: list[Rec]) -> int:
        """Pass on a successful call's result; returns the input records it dropped."""
        return emit_result(rec, result, out, record=self.record, node=self.node, traced=True)
