"""Per-run and per-worker state shared by the source and the sinks of a worker."""

from __future__ import annotations

import threading

from loom.delivery.acks import WorkerProgress
from loom.delivery.transport import TransportWriter
from loom.streaming.bytewax.records import Failure


class WorkerState:
    """What one Bytewax worker's source and sinks share.

    Only that worker's thread touches it, except ``RunState.stop``.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.progress = WorkerProgress()
        self.writers: list[TransportWriter] = []
        self._late: list[Failure] = []
        self.fatal: BaseException | None = None
        """An error that must stop the run before anything more is committed."""
        self.async_backlog: dict[str, int] = {}
        """Per async node: records waiting beyond its backlog limit (> 0 pauses polling)."""

    def report(self, failures: list[Failure]) -> None:
        """Failures found outside the operators (refused deliveries)."""
        self._late.extend(failures)

    def take_late_failures(self) -> list[Failure]:
        late, self._late = self._late, []
        return late

    @property
    def saturated(self) -> bool:
        """An async node holds too many waiting records: stop reading for now."""
        return any(excess > 0 for excess in self.async_backlog.values())

    def poll_writers(self) -> None:
        for writer in self.writers:
            writer.poll()

    def flush_writers(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for every writer's pending deliveries."""
        for writer in self.writers:
            writer.flush(timeout_s)


class GracefulStop(Exception):
    """Ends a recovery-enabled run after a complete drain (see ``RunState``)."""


class RunState:
    """State of one prepared run: its workers and the stop request.

    With Bytewax recovery on, a source that *finishes* is recorded as done in
    the recovery store, and a later execution would end at once. A drained
    run therefore ends by raising :class:`GracefulStop` once every local
    worker has drained, and the runner treats that as a clean stop.
    """

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self._workers: dict[int, WorkerState] = {}
        self._ready: set[int] = set()
        self._lock = threading.Lock()
        self.expected_workers = 1
        """Workers of this process; the run is ready when all have their partitions."""
        self.recovery = False
        self.abandoned = False
        """A drain gave up on unfinished records (force_shutdown_timeout_ms)."""
        self._drained: set[int] = set()
        self.stopped_gracefully = False

    def worker(self, index: int) -> WorkerState:
        with self._lock:
            state = self._workers.get(index)
            if state is None:
                state = self._workers[index] = WorkerState(index)
            return state

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

    def workers(self) -> list[WorkerState]:
        with self._lock:
            return list(self._workers.values())
