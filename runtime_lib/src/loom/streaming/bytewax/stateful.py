"""The operators of the stateful nodes: ``StatefulStep`` and ``WindowAggregate``.

Both keep their state in :mod:`loom.streaming.bytewax.state` (per worker, per
input partition, snapshotted by the worker loop) and follow its rules:

- a record already in the restored state (:class:`~.state.AppliedOffsets`)
  is skipped: its ack is released, it is not applied twice;
- an applied record's ack is held until its snapshot is saved
  (``WorkerState.hold``), and every result takes the current barrier as its
  ack (``WorkerState.output_ack``);
- a record that fails (its function raised, it has no key, it is late) is
  not marked applied: it goes to its error route, and a replay sends it
  there again rather than losing it.

Event time is per input partition (``PartitionState.watermark``): the
largest record time seen, moved on by the wall clock while the partition is
read to its end (``TransportReader.caught_up``). Windows close when the
watermark passes their end plus the grace; closing is checked after each
chunk and on the loop's ticks, and never on a drain's flush (open windows
stay in the snapshot and continue after a restart).
"""

from __future__ import annotations

import heapq
import math
import types
from collections.abc import Callable
from typing import Any

from loom.observability.metrics import FlowMetrics
from loom.streaming.bytewax.records import Chunk, Failure, Rec, error_kind_of, failures_for
from loom.streaming.bytewax.state import NodeState, PartitionState
from loom.streaming.bytewax.worker import RunState, WorkerLoop
from loom.streaming.errors import ErrorKind
from loom.streaming.plan import STATE_TICK_MS, StatefulPlan, WindowPlan
from loom.streaming.windows import Hopping, Session, Tumbling, Window

_NO_KEY = "the record has no key; state is kept per Kafka record key (or give key=...)"
_NO_ORIGIN = "the record has no input record to track (it comes from a batch)"
_SEVERAL = (list, tuple, types.GeneratorType)
"""Outputs a StatefulStep returns as several records (any other value is one)."""


def key_bytes(key: Any) -> bytes | None:
    """The Kafka key of a result: the state key as bytes."""
    if key is None or isinstance(key, bytes):
        return key
    return str(key).encode()


def observe(part: PartitionState, stamp: int, now: float) -> None:
    """The partition's clock takes in a record's event time."""
    if stamp > part.max_event:
        part.max_event, part.arrival = stamp, now
        part.watermark = max(part.watermark, stamp)


class _StateOp:
    """What both stateful operators share: per-worker state and the idle clock."""

    def __init__(self, flow: str, node_id: str, run: RunState, metrics: FlowMetrics | None) -> None:
        self.flow = flow
        self.node = node_id
        self.run = run
        self.clock = run.clock
        self.metrics = metrics
        self._workers: dict[int, tuple[WorkerLoop, NodeState]] = {}
        self._idle_checked: dict[int, float] = {}

    def _make_state(self) -> NodeState:
        return NodeState(self.node, self.clock)

    def _worker(self, index: int) -> tuple[WorkerLoop, NodeState]:
        found = self._workers.get(index)
        if found is None:
            loop = self.run.worker(index)
            if loop.state is None:
                raise RuntimeError(f"{self.node}: worker {index} has no state (no store)")
            state = loop.state.node(self.node, self._make_state)
            if self.metrics is not None:
                state.report = self._reporter(str(index))
                state.report(state)
            found = self._workers[index] = (loop, state)
        return found

    def _reporter(self, worker: str) -> Callable[[NodeState], None]:
        """Publish a worker's gauges of this node (after each snapshot cut)."""
        assert self.metrics is not None
        labels = (self.flow, self.node, worker)
        keys = self.metrics.state_keys.labels(*labels)
        size = self.metrics.state_bytes.labels(*labels)
        windows = self.metrics.windows_open.labels(*labels)

        def report(state: NodeState) -> None:
            count = state.keys()
            keys.set(count)
            size.set(count * state.entry_bytes)
            if isinstance(state, WindowState):
                windows.set(state.open_count)

        return report

    def _follow_idle(self, loop: WorkerLoop, state: NodeState, now: float) -> None:
        """Move the event time of idle partitions on with the wall clock (every tick at most)."""
        if now - self._idle_checked.get(loop.index, -math.inf) < STATE_TICK_MS:
            return
        self._idle_checked[loop.index] = now
        reader = loop.reader
        for partition, part in state.partitions.items():
            if reader.caught_up(partition):
                part.idle(now)


# -- StatefulStep ---------------------------------------------------------------


class StatefulOp(_StateOp):
    """``StatefulStep``: ``fn(state, value) -> (state, output)`` per record, by key."""

    def __init__(
        self, flow: str, plan: StatefulPlan, run: RunState, metrics: FlowMetrics | None
    ) -> None:
        super().__init__(flow, plan.node_id, run, metrics)
        self.fn = plan.fn
        self.key = plan.key
        self.ttl_ms = plan.ttl_ms
        self._next_expiry: dict[tuple[int, int], int] = {}
        self.expired = metrics.expired_keys.labels(flow, plan.node_id) if metrics else None

    def __call__(self, chunk: Chunk) -> Chunk:
        loop, state = self._worker(chunk.worker)
        worker_state = loop.state
        assert worker_state is not None
        now = self.clock()
        out: list[Rec] = []
        failed: list[Failure] = []
        fn, key_of, ttl = self.fn, self.key, self.ttl_ms
        hold, output_ack = worker_state.hold, worker_state.output_ack
        part: PartitionState | None = None
        for rec in chunk.records:
            origin = rec.origin
            if origin is None:
                failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, _NO_ORIGIN)
                continue
            partition = origin.partition() or 0
            if part is None or part.partition != partition:
                part = state.partition(partition)
            offset = origin.offset() or 0
            applied = part.applied
            if applied.seen(offset):
                rec.ack.release()  # in the restored state already: applied once
                continue
            observe(part, origin.timestamp()[1], now)
            try:
                key = origin.key() if key_of is None else key_of(rec.value)
                if key is None:
                    failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, _NO_KEY)
                    continue
                entries = part.entries
                current = entries.get(key)
                if ttl is not None and current is not None:
                    current = current[0]
                new_state, output = fn(current, rec.value)
            except Exception as exc:
                failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
                continue
            if new_state is None:
                entries.pop(key, None)
            else:
                entries[key] = new_state if ttl is None else (new_state, part.max_event)
            part.dirty.add(key)
            applied.mark(offset)
            hold(rec.ack)
            if output is not None:
                _emit(rec, output, out, output_ack)
        if chunk.records:
            state.changed = True
        self._follow_idle(loop, state, now)
        if ttl is not None:
            self._expire(state, ttl, chunk.worker)
        failures = chunk.failures + failed if failed else chunk.failures
        return Chunk(chunk.worker, out, failures, chunk.flush, False)

    def _expire(self, state: NodeState, ttl: int, worker: int) -> None:
        """Delete keys not updated for ``ttl`` of event time (a scan every quarter ttl)."""
        for partition, part in state.partitions.items():
            due = self._next_expiry.get((worker, partition))
            if due is not None and part.watermark < due:
                continue
            self._next_expiry[(worker, partition)] = part.watermark + max(ttl // 4, 1)
            limit = part.watermark - ttl
            stale = [key for key, (_, updated) in part.entries.items() if updated <= limit]
            for key in stale:
                del part.entries[key]
                part.dirty.add(key)
            if stale:
                state.changed = True
                if self.expired is not None:
                    self.expired.inc(len(stale))


def _emit(rec: Rec, output: Any, out: list[Rec], output_ack: Callable[[], Any]) -> None:
    """Pass on a StatefulStep's output: one value, or each of a list, tuple or generator."""
    rec.span = None  # the input's span ends with its snapshot (it is held)
    if isinstance(output, _SEVERAL):
        for value in output:
            child = Rec(None, rec.origin, output_ack(), None, rec.key, rec.headers)
            child.set_result(value)
            out.append(child)
    else:
        rec.set_result(output)
        rec.ack = output_ack()
        out.append(rec)


# -- WindowAggregate ------------------------------------------------------------


class WindowState(NodeState):
    """A window node's state: per key, its open windows; and when each closes.

    Entries map a key to ``{start_ms: acc}`` (tumbling, hopping) or to a list
    of sessions ``[start_ms, last_ms, acc]`` ordered by start. ``deadlines``
    (per partition) is a heap of ``(end_ms, key, start_ms)``, derived from the
    entries (rebuilt on restore, never saved); an entry of a session that
    grew since is stale and skipped when it comes up.
    """

    def __init__(self, node_id: str, clock: Callable[[], float], spec: Any) -> None:
        super().__init__(node_id, clock)
        self.spec = spec
        self.deadlines: dict[int, list[tuple[int, Any, int]]] = {}
        self.open_count = 0
        """Windows (or sessions) waiting to close, kept up to date as they open and close."""

    def heap(self, partition: int) -> list[tuple[int, Any, int]]:
        heap = self.deadlines.get(partition)
        if heap is None:
            heap = self.deadlines[partition] = []
        return heap

    def restored(self, part: PartitionState) -> None:
        heap = self.heap(part.partition)
        spec = self.spec
        for key, windows in part.entries.items():
            self.open_count += len(windows)
            if isinstance(spec, Session):
                heap += [(last + spec.gap_ms, key, start) for start, last, _ in windows]
            else:
                heap += [(start + spec.size_ms, key, start) for start in windows]
        heapq.heapify(heap)


class WindowOp(_StateOp):
    """``WindowAggregate``: fold records into windows per key; emit each window once closed."""

    def __init__(
        self, flow: str, plan: WindowPlan, run: RunState, metrics: FlowMetrics | None
    ) -> None:
        super().__init__(flow, plan.node_id, run, metrics)
        self.spec = plan.window
        self.aggregate = plan.aggregate
        self.key = plan.key
        self.event_time = plan.event_time
        self.grace = plan.grace_ms
        self.late = metrics.late_records.labels(flow, plan.node_id) if metrics else None

    def _make_state(self) -> NodeState:
        return WindowState(self.node, self.clock, self.spec)

    def __call__(self, chunk: Chunk) -> Chunk:
        loop, state = self._worker(chunk.worker)
        assert isinstance(state, WindowState)
        worker_state = loop.state
        assert worker_state is not None
        now = self.clock()
        failed: list[Failure] = []
        touched: set[int] = set()
        if chunk.records:
            if isinstance(self.spec, Session):
                self._sessions(chunk, state, failed, touched, now)
            else:
                self._fixed(chunk, state, failed, touched, now)
            state.changed = True
        self._follow_idle(loop, state, now)
        out: list[Rec] = []
        for part in state.partitions.values():
            self._close(state, part, out, worker_state.output_ack)
        failures = chunk.failures + failed if failed else chunk.failures
        return Chunk(chunk.worker, out, failures, chunk.flush, False)

    def _observe(self, part: PartitionState, rec: Rec, now: float) -> int:
        """The record's event time; the partition's clock takes it in."""
        origin = rec.origin
        assert origin is not None
        stamp = origin.timestamp()[1] if self.event_time is None else self.event_time(rec.value)
        observe(part, stamp, now)
        return int(stamp)

    def _late(self, rec: Rec, t: int, window: Window, part: PartitionState) -> list[Failure]:
        if self.late is not None:
            self.late.inc()
        message = (
            f"event time {t} belongs to the window [{window.start_ms}, {window.end_ms}), "
            f"closed at event time {window.end_ms + self.grace} (now {part.watermark})"
        )
        return failures_for(self.flow, self.node, ErrorKind.LATE, rec, message)

    def _fixed(
        self,
        chunk: Chunk,
        state: WindowState,
        failed: list[Failure],
        touched: set[int],
        now: float,
    ) -> None:
        """Tumbling and hopping windows: each record adds to every window it is in."""
        spec = self.spec
        assert isinstance(spec, Tumbling | Hopping)
        size, grace = spec.size_ms, self.grace
        step = spec.size_ms if isinstance(spec, Tumbling) else spec.step_ms
        initial, add = self.aggregate.initial, self.aggregate.add
        key_of = self.key
        worker_state = self.run.worker(chunk.worker).state
        assert worker_state is not None
        hold = worker_state.hold
        part: PartitionState | None = None
        heap: list[tuple[int, Any, int]] = []
        for rec in chunk.records:
            origin = rec.origin
            if origin is None:
                failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, _NO_ORIGIN)
                continue
            partition = origin.partition() or 0
            if part is None or part.partition != partition:
                part = state.partition(partition)
                heap = state.heap(partition)
                touched.add(partition)
            offset = origin.offset() or 0
            if part.applied.seen(offset):
                rec.ack.release()
                continue
            try:
                t = self._observe(part, rec, now)
                key = origin.key() if key_of is None else key_of(rec.value)
            except Exception as exc:
                failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
                continue
            if key is None:
                failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, _NO_KEY)
                continue
            first = t - t % step - size + step  # the earliest window holding t
            if first + size + grace <= part.watermark:
                failed += self._late(rec, t, Window(first, first + size), part)
                continue
            windows = part.entries.get(key)
            if windows is None:
                windows = part.entries[key] = {}
            try:
                state.open_count += _add_to_windows(
                    windows,
                    value=rec.value,
                    starts=range(first, t - t % step + 1, step),
                    size=size,
                    key=key,
                    heap=heap,
                    initial=initial,
                    add=add,
                )
            except Exception as exc:
                failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
                continue
            part.dirty.add(key)
            part.applied.mark(offset)
            hold(rec.ack)

    def _sessions(
        self,
        chunk: Chunk,
        state: WindowState,
        failed: list[Failure],
        touched: set[int],
        now: float,
    ) -> None:
        """Session windows: a record joins (and may bridge) the sessions within the gap."""
        spec = self.spec
        assert isinstance(spec, Session)
        gap, grace = spec.gap_ms, self.grace
        aggregate = self.aggregate
        key_of = self.key
        worker_state = self.run.worker(chunk.worker).state
        assert worker_state is not None
        for rec in chunk.records:
            origin = rec.origin
            if origin is None:
                failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, _NO_ORIGIN)
                continue
            partition = origin.partition() or 0
            part = state.partition(partition)
            touched.add(partition)
            offset = origin.offset() or 0
            if part.applied.seen(offset):
                rec.ack.release()
                continue
            try:
                t = self._observe(part, rec, now)
                key = origin.key() if key_of is None else key_of(rec.value)
                if key is None:
                    failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, _NO_KEY)
                    continue
                sessions = part.entries.get(key) or []
                joined = [s for s in sessions if s[0] - gap < t < s[1] + gap]
                if not joined and t + gap + grace <= part.watermark:
                    failed += self._late(rec, t, Window(t, t + gap), part)
                    continue
                # Joined sessions merge in time order, then the record is added.
                acc = joined[0][2] if joined else aggregate.initial()
                for session in joined[1:]:
                    acc = aggregate.merge(acc, session[2])
                acc = aggregate.add(acc, rec.value)
                start = min([t, *(session[0] for session in joined)])
                last = max([t, *(session[1] for session in joined)])
            except Exception as exc:
                failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
                continue
            state.open_count += 1 - len(joined)
            kept = [s for s in sessions if s not in joined]
            kept.append([start, last, acc])
            kept.sort(key=_session_start)
            part.entries[key] = kept
            heapq.heappush(state.heap(partition), (last + gap, key, start))
            part.dirty.add(key)
            part.applied.mark(offset)
            worker_state.hold(rec.ack)

    def _close(
        self,
        state: WindowState,
        part: PartitionState,
        out: list[Rec],
        output_ack: Callable[[], Any],
    ) -> None:
        """Emit every window of ``part`` whose end plus grace event time has passed."""
        heap = state.heap(part.partition)
        limit = part.watermark - self.grace
        if not heap or heap[0][0] > limit:
            return
        spec, result, entries = self.spec, self.aggregate.result, part.entries
        session = isinstance(spec, Session)
        gap = spec.gap_ms if isinstance(spec, Session) else 0
        while heap and heap[0][0] <= limit:
            end, key, start = heapq.heappop(heap)
            windows = entries.get(key)
            if windows is None:
                continue
            if session:
                found = next((s for s in windows if s[0] == start and s[1] + gap == end), None)
                if found is None:
                    continue  # the session grew (or merged) since this deadline
                windows.remove(found)
                acc = found[2]
            else:
                acc = windows.pop(start)
            if not windows:
                del entries[key]
            state.open_count -= 1
            part.dirty.add(key)
            state.changed = True
            value = result(key, Window(start, end), acc)
            out.append(Rec(value, None, output_ack(), key=key_bytes(key)))


def _add_to_windows(
    windows: dict[int, Any],
    *,
    value: Any,
    starts: range,
    size: int,
    key: Any,
    heap: list[tuple[int, Any, int]],
    initial: Callable[[], Any],
    add: Callable[[Any, Any], Any],
) -> int:
    """Add ``value`` to the windows of ``key`` starting at ``starts``; return how many opened."""
    opened = 0
    for start in starts:
        acc = windows.get(start)
        if acc is None:
            acc = initial()
            heapq.heappush(heap, (start + size, key, start))
            opened += 1
        windows[start] = add(acc, value)
    return opened


def _session_start(session: list[Any]) -> Any:
    return session[0]
