"""One Bytewax worker's control loop, and the run state its workers share.

Bytewax calls the flow source's ``next_batch`` on each worker's thread. For
Loom that call is the worker's whole control loop, in this order:

1. **serve the writers**: delivery reports of produced records come back
   (a confirmed record releases its ack; a refused one becomes a failure);
2. **take late failures** from the :class:`DeliveryFeedback` channel, the
   one way back from the sinks to the source: refused outputs re-enter the
   dataflow at the top as ``DELIVERY`` errors, and an error that must stop
   the run (a dead letter the broker refused) is raised here;
3. **poll** the reader, unless too much is in flight or an async step is
   saturated (the decoding is the source's job);
4. **commit** the finished prefix of every partition, when the
   :class:`CommitPolicy` says it is due.

A flow with stateful nodes also **snapshots** (:mod:`.state`): at the top of
each turn the worker's ready snapshots are saved, releasing the records they
hold; every ``snapshot_interval_s`` a new snapshot is cut. Such a flow ticks
while idle, so event time can follow the wall clock.

On a stop request (or finite input) the loop *drains* instead: it stops
reading, flushes buffering operators (open windows stay open: they are
snapshotted), waits until every consumed record is finished (or the drain
timeout passes), commits, and ends.

Everything here runs on the worker's own thread; only ``RunState.stop`` and
the readiness bookkeeping cross threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from loom.config.delivery import Delivery
from loom.delivery.acks import WorkerProgress
from loom.delivery.transport import Origin, TransportReader, TransportWriter
from loom.errors import LoomError
from loom.observability import ObservabilityRuntime
from loom.streaming.bytewax.records import Chunk, Failure, Rec
from loom.streaming.bytewax.state import StateStore, WorkerState

logger = logging.getLogger("loom.streaming.worker")

_MAX_TICK_MS = 5
"""Idle workers with unfinished records wake at least this often (ms), to poll
delivery reports and let batch timeouts and async results progress."""
_DRAIN_POLL = timedelta(milliseconds=1)
_MAX_UNSAVED_SNAPSHOTS = 8
"""Cut snapshots not yet saved (results undelivered) before held records count as
in flight again, so a worker whose results cannot be delivered stops reading."""

Reader = Callable[[list[Origin]], tuple[list[Rec], list[Failure]]]
"""Turns polled input records into records in flight and decode failures."""


@dataclass(frozen=True)
class CommitPolicy:
    """When a worker commits offsets: decided once, when a run is prepared.

    ``tracked`` (at-least-once) commits the finished prefix of each partition
    at most every ``interval_s`` while records keep arriving, and within
    ``idle_interval_s`` once the worker has caught up. Untracked
    (at-most-once), librdkafka commits on its own and the loop never does.
    """

    tracked: bool = True
    interval_s: float = 1.0
    idle_interval_s: float = 0.1

    @classmethod
    def for_delivery(cls, delivery: Delivery, interval_ms: int) -> CommitPolicy:
        """The policy of a delivery guarantee (``loom.config.delivery``)."""
        return cls(tracked=not delivery.auto_commit, interval_s=interval_ms / 1000)

    def due(self, last_commit: float, now: float, *, idle: bool) -> bool:
        if not self.tracked:
            return False
        interval = min(self.interval_s, self.idle_interval_s) if idle else self.interval_s
        return now >= last_commit + interval


@dataclass(frozen=True)
class SourceSettings:
    """How a worker polls, commits and drains."""

    max_poll_records: int = 1000
    """Records taken per poll (one chunk). Every operator makes a pass over a
    chunk; at ~1,000 records a chunk's objects stay in the CPU cache between
    passes (5,000 measured ~25% slower per record), while Bytewax's per-chunk
    cost stays small."""
    max_in_flight: int = 100_000
    """Consumed-but-unfinished records per worker before polling pauses."""
    commits: CommitPolicy = CommitPolicy()
    drain_timeout_s: float | None = None
    """How long a drain waits for in-flight records; None waits for all."""
    snapshot_interval_s: float = 1.0
    """How often a flow with state cuts a snapshot (``state.snapshot_interval_ms``)."""


class DeliveryFeedback:
    """The channel from a worker's sinks back to its loop.

    A sink's writer learns of a refused record long after the record left the
    dataflow (in a delivery report); it reports it here, and the loop feeds it
    back in at the top, as a failure of the next chunk. A sink that hits an
    error the run cannot survive sets it with :meth:`fail`; the loop raises
    it before anything more is committed.
    """

    def __init__(self) -> None:
        self._late: list[Failure] = []
        self.fatal: BaseException | None = None

    def refused(self, failures: list[Failure]) -> None:
        self._late.extend(failures)

    def fail(self, error: BaseException) -> None:
        self.fatal = error

    def take(self) -> list[Failure]:
        late, self._late = self._late, []
        return late


class GracefulStop(LoomError):
    """Internal: ends a recovery-enabled run after a complete drain (see :class:`RunState`)."""


class WorkerLoop:
    """One worker's loop: poll, serve the writers, take late failures, commit.

    Sinks register their writers and report through :attr:`feedback` while
    the dataflow is built; the source attaches its reader and calls
    :meth:`next_chunks` from ``next_batch``.
    """

    def __init__(self, index: int, run: RunState) -> None:
        self.index = index
        self.run = run
        self.progress = WorkerProgress()
        self.feedback = DeliveryFeedback()
        self.writers: list[TransportWriter] = []
        self.async_backlog: dict[str, int] = {}
        """Per async node: records waiting beyond its backlog limit (> 0 pauses polling)."""
        self._reader: TransportReader | None = None
        self._last_commit = time.monotonic()
        self._draining = False
        self._drain_deadline: float | None = None
        self._idle = False
        self._tick = timedelta(milliseconds=_MAX_TICK_MS)
        self._metrics: _CommitMetrics | None = None
        self.committed: dict[int, int] = {}
        """The last offset committed per partition (the next to read)."""
        self.state: WorkerState | None = None
        """The worker's keyed state, when the flow has stateful nodes (see ``state.py``)."""
        if run.store is not None:
            self.state = WorkerState(index, run.store, run.clock)
        self._last_cut = time.monotonic()
        self._drain_passes = 0
        self.settled = False
        """At the end of the last turn: nothing read, nothing in flight but what state holds."""

    def attach(
        self,
        reader: TransportReader,
        *,
        tick_ms: int | None,
        flow: str,
        topic: str,
        observability: ObservabilityRuntime | None,
    ) -> None:
        """Give the loop its reader (the source does, when Bytewax builds it)."""
        self._reader = reader
        self._tick = timedelta(milliseconds=min(tick_ms or _MAX_TICK_MS, _MAX_TICK_MS))
        self._flow, self._topic = flow, topic
        if observability is not None:
            self._metrics = _CommitMetrics(observability, flow, topic, self.index)
            if self.state is not None:
                histogram = observability.metrics.snapshot_seconds.labels(flow, str(self.index))
                self.state.timed = histogram.observe

    @property
    def reader(self) -> TransportReader:
        if self._reader is None:
            raise RuntimeError(f"worker {self.index} has no reader attached")
        return self._reader

    # -- the loop ---------------------------------------------------------

    def next_chunks(self, read: Reader) -> list[Chunk]:
        """One turn of the loop; ``read`` decodes what the reader returned."""
        settings = self.run.settings
        for writer in self.writers:
            writer.poll()
        if self.feedback.fatal is not None:
            raise self.feedback.fatal
        if not self._draining and (self.run.stop.is_set() or self.reader.exhausted()):
            self._start_drain()
        if self._draining:
            return self._drain_step()
        state = self.state
        held = 0
        if state is not None:
            state.advance()
            # Records held by state keep only their acks (no memory to bound), but
            # snapshots waiting for their results' delivery do: stop reading then.
            held = state.held if len(state.saving) < _MAX_UNSAVED_SNAPSHOTS else 0
        in_flight = self.progress.advance()
        records: list[Rec] = []
        failures = self.feedback.take()
        if in_flight - held < settings.max_in_flight and not self._saturated():
            origins = self.reader.poll(settings.max_poll_records)
            if origins:
                records, decode_failures = read(origins)
                failures += decode_failures
        self._idle = not records and not failures
        if self._idle and in_flight:
            # Caught up with the input: confirm outputs now, so their offsets are
            # committed soon rather than at the next interval (nothing else to do).
            for writer in self.writers:
                writer.flush(self._tick.total_seconds())
        now = time.monotonic()
        if state is not None and now >= self._last_cut + settings.snapshot_interval_s:
            self._last_cut = now
            if state.due:
                state.cut(self.committed)
        if settings.commits.due(self._last_commit, now, idle=self._idle):
            self._last_commit = now
            self._commit()
        # Nothing moving but what state holds (TestRunner advances time only then).
        self.settled = self._idle and in_flight == held
        if self._idle and in_flight == 0 and state is None:
            return []
        return [Chunk(self.index, records, failures)]

    def next_awake(self) -> datetime | None:
        if self._draining:
            return datetime.now(UTC) + _DRAIN_POLL
        if self._idle and (self.state is not None or self.progress.advance()):
            return datetime.now(UTC) + self._tick
        return None

    # -- internals --------------------------------------------------------

    def _saturated(self) -> bool:
        """An async node holds too many waiting records: stop reading for now."""
        return any(excess > 0 for excess in self.async_backlog.values())

    def _commit(self) -> None:
        offsets = self.progress.committable()
        if offsets and self.run.settings.commits.tracked:
            self.reader.commit(offsets)
            self.committed.update(offsets)
        if self._metrics is not None:
            self._metrics.record(self.reader, offsets, self.progress.advance())

    def _start_drain(self) -> None:
        self._draining = True
        timeout = self.run.settings.drain_timeout_s
        self._drain_deadline = None if timeout is None else time.monotonic() + timeout

    def _drain_step(self) -> list[Chunk]:
        state = self.state
        if state is not None:
            # Open windows stay in state: the last snapshot takes them along, with
            # event time as the drain's first pass left it (later moves of an idle
            # clock alone would keep the drain cutting for ever).
            state.advance()
            if state.changed or (state.due and self._drain_passes == 1):
                state.cut(self.committed)
        self._commit()
        late = self.feedback.take()
        in_flight = self.progress.advance()
        if in_flight == 0 and not late and self._state_settled():
            return self._finish()
        deadline = self._drain_deadline
        if deadline is not None and time.monotonic() >= deadline:
            self.run.abandoned = True
            logger.warning(
                "stopping with %d records unfinished after the drain timeout; "
                "they stay uncommitted and will be read again",
                in_flight,
                extra={"flow": self._flow, "topic": self._topic, "worker": self.index},
            )
            return self._finish()
        self._drain_passes += 1
        return [Chunk(self.index, [], late, flush=True)]

    def _state_settled(self) -> bool:
        """Stateful nodes saw the drain (to close what event time closed) and all is saved."""
        state = self.state
        if state is None:
            return True
        return self._drain_passes > 0 and not state.saving and not state.changed

    def _finish(self) -> list[Chunk]:
        """End this worker's input: EOF, or a graceful abort under recovery."""
        if not self.run.recovery:
            raise StopIteration
        if self.run.mark_drained(self.index):
            raise GracefulStop(f"{self._flow} drained")
        return []  # wait for the other local workers to drain


def _wall_ms() -> float:
    return time.time() * 1000


class _CommitMetrics:
    """Committed offsets, consumer lag and records in flight of one worker."""

    def __init__(self, observability: ObservabilityRuntime, flow: str, topic: str, worker: int):
        metrics = observability.metrics
        self.metrics, self.flow, self.topic = metrics, flow, topic
        self.in_flight = metrics.in_flight.labels(flow, str(worker))

    def record(self, reader: TransportReader, offsets: dict[int, int], in_flight: int) -> None:
        if offsets:
            ends = reader.end_offsets(offsets)
            for partition, offset in offsets.items():
                label = (self.flow, self.topic, str(partition))
                self.metrics.committed.labels(*label).set(offset)
                end = ends.get(partition)
                if end is not None:
                    self.metrics.lag.labels(*label).set(max(0, end - offset))
        self.in_flight.set(in_flight)


class RunState:
    """State of one prepared run: its settings, its workers' loops, the stop request.

    With Bytewax recovery on, a source that *finishes* is recorded as done in
    the recovery store, and a later execution would end at once. A drained
    run therefore ends by raising :class:`GracefulStop` once every local
    worker has drained, and the runner treats that as a clean stop.
    """

    def __init__(
        self,
        settings: SourceSettings | None = None,
        *,
        expected_workers: int = 1,
        recovery: bool = False,
        stop: threading.Event | None = None,
        store: StateStore | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings or SourceSettings()
        self.store = store
        """Where stateful nodes' snapshots go (None: the flow keeps no state)."""
        self.clock = clock or _wall_ms
        """Wall-clock milliseconds, for event time while the input is idle."""
        self.stop = stop or threading.Event()
        self.expected_workers = expected_workers
        """Workers of this process; the run is ready when all have their partitions."""
        self.recovery = recovery
        self.abandoned = False
        """A drain gave up on unfinished records (force_shutdown_timeout_ms)."""
        self.stopped_gracefully = False
        self._workers: dict[int, WorkerLoop] = {}
        self._ready: set[int] = set()
        self._drained: set[int] = set()
        self._lock = threading.Lock()

    def worker(self, index: int) -> WorkerLoop:
        """The loop of worker ``index``, made by whichever of its parts asks first."""
        with self._lock:
            loop = self._workers.get(index)
            if loop is None:
                loop = self._workers[index] = WorkerLoop(index, self)
            return loop

    def mark_drained(self, index: int) -> bool:
        """Record a worker's finished drain; True once every local worker drained."""
        with self._lock:
            self._drained.add(index)
            done = len(self._drained) >= self.expected_workers
            if done:
                self.stopped_gracefully = True
            return done

    def mark_ready(self, index: int) -> None:
        with self._lock:
            self._ready.add(index)

    @property
    def ready(self) -> bool:
        with self._lock:
            return len(self._ready) >= self.expected_workers

    def workers(self) -> list[WorkerLoop]:
        with self._lock:
            return list(self._workers.values())
