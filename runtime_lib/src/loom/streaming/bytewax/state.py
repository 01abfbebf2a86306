"""Keyed state of one worker: what it holds, how it is snapshotted, when records finish.

A stateful node (``StatefulStep``, ``WindowAggregate``) keeps its state per
input partition, on the worker that reads the partition, so no record and no
ack leaves the worker (the invariant of :mod:`loom.delivery.acks`). Each
worker has one :class:`WorkerState`; it makes the state durable with
*snapshots*, and ties commits to them:

- A record applied to state does not finish: its ack is **held** by the
  current :class:`Barrier`. Every result a stateful node emits takes the
  barrier as its ack, so the barrier also waits for the delivery of every
  result emitted before the cut.
- At a **cut** (every ``snapshot_interval_ms``), the changes since the last
  cut are captured (keys changed, clocks, applied offsets) and a new barrier
  opens. Once the barrier's results are delivered *and* every earlier
  barrier is saved, the captured changes are written to the store (one
  durable transaction) and only then are the held acks released: the commit
  point moves past a record only once its effect is in a saved snapshot, and
  a saved snapshot never misses a result that it removed from state.
- After a crash the worker loads the last saved snapshot and reads from the
  committed offsets, which are at or before the snapshot's. Each node
  remembers, per partition, which offsets its state already contains
  (:class:`AppliedOffsets`) and skips those records when they are read
  again. Every record is therefore applied exactly once; results emitted
  after the snapshot are emitted again, whole.

``docs/stateful.md`` explains the guarantee for users; ``docs/architecture.md``
places this module.
"""

from __future__ import annotations

import logging
import operator
import pickle
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from loom.delivery.acks import Ack, release_all
from loom.errors import KeySpansPartitions, StateLayoutError

logger = logging.getLogger("loom.streaming.state")


class Change(NamedTuple):
    """One partition's captured changes, pickled at the cut in one piece.

    ``data`` is the pickle of ``(updates, deletes, meta)``: the changed keys'
    values, the deleted keys, the partition's metadata (applied offsets,
    clock). ``base`` says it holds *every* entry (a compaction: the earlier
    changes of the partition can go).
    """

    data: bytes
    base: bool


Delta = dict[str, dict[int, Change]]
"""A cut's changes, by node id and partition."""
Loaded = dict[str, dict[int, tuple[dict[Any, Any], Any]]]
"""A worker's saved state, by node id and partition: its entries and metadata."""

_PICKLE = pickle.HIGHEST_PROTOCOL
_COMPACT_RATIO = 2
_COMPACT_MIN_BYTES = 1 << 20
"""A partition's changes are compacted into one base once they exceed this
many bytes and twice the size of its last base: the log stays within ~3x the
live state, and each change is rewritten a bounded number of times."""


class AppliedOffsets:
    """Which offsets of one input partition a node's state already contains.

    A bitmap from ``base`` (a multiple of 8, at or below the committed
    offset), so records applied out of order (after a retry or an async
    step) are remembered exactly. Offsets below ``base`` were committed: they
    are never read again. In the usual in-order case a check is one
    comparison with ``top``, the highest offset applied.
    """

    __slots__ = ("base", "bits", "top")

    def __init__(self, base: int = 0, bits: bytes = b"", top: int = -1) -> None:
        self.base = base
        self.bits = bytearray(bits)
        self.top = top

    def seen(self, offset: int) -> bool:
        if offset > self.top:
            return False
        i = offset - self.base
        return i < 0 or bool(self.bits[i >> 3] >> (i & 7) & 1)

    def mark(self, offset: int) -> None:
        i = offset - self.base
        if i < 0:
            return
        byte = i >> 3
        bits = self.bits
        if byte >= len(bits):
            bits.extend(bytes(max(byte + 1 - len(bits), 1024)))
        bits[byte] |= 1 << (i & 7)
        self.top = max(self.top, offset)

    def mark_all(self, offsets: list[int]) -> None:
        """:meth:`mark` each of ``offsets`` (a chunk's, in one call)."""
        if not offsets:
            return
        bits, base = self.bits, self.base
        highest = max(offsets)
        needed = ((highest - base) >> 3) + 1
        if needed > len(bits):
            bits.extend(bytes(max(needed - len(bits), 1024)))
        for offset in offsets:
            i = offset - base
            if i >= 0:
                bits[i >> 3] |= 1 << (i & 7)
        self.top = max(self.top, highest)

    def prune(self, committed: int) -> None:
        """Forget offsets below ``committed`` (the partition's committed offset)."""
        drop = (committed - self.base) >> 3
        if drop > 0:
            del self.bits[:drop]
            self.base += drop * 8

    def state(self) -> tuple[int, bytes, int]:
        used = ((self.top - self.base) >> 3) + 1 if self.top >= self.base else 0
        return self.base, bytes(self.bits[:used]), self.top


class PartitionState:
    """A node's state for one input partition: entries by key, clock, applied offsets.

    ``watermark`` is the partition's event time: the largest record time seen
    (``max_event``), moved on by the wall clock while the partition is idle
    (see :meth:`idle`). ``arrival`` is the wall time at which ``max_event``
    was seen.
    """

    __slots__ = (
        "applied",
        "arrival",
        "base_bytes",
        "dirty",
        "entries",
        "logged",
        "max_event",
        "partition",
        "watermark",
    )

    NO_TIME = -(2**62)

    def __init__(self, partition: int, now_ms: float) -> None:
        self.partition = partition
        self.entries: dict[Any, Any] = {}
        self.dirty: set[Any] = set()
        self.applied = AppliedOffsets()
        self.max_event = self.NO_TIME
        self.watermark = self.NO_TIME
        self.arrival = now_ms
        self.base_bytes = 0
        """Size of the partition's last compacted snapshot."""
        self.logged = _COMPACT_MIN_BYTES + 1
        """Bytes of changes saved since then (a restored partition compacts first)."""

    def idle(self, now_ms: float) -> bool:
        """The partition is read to its end: event time follows the wall clock.

        Returns whether the watermark moved.
        """
        if self.max_event == self.NO_TIME:
            return False
        advanced = self.max_event + int(now_ms - self.arrival)
        if advanced <= self.watermark:
            return False
        self.watermark = advanced
        return True

    def meta(self) -> tuple[Any, ...]:
        return (self.applied.state(), self.max_event, self.watermark)

    def restore(self, entries: dict[Any, Any], meta: tuple[Any, ...], now_ms: float) -> None:
        """Take saved state; the downtime does not count as idle time."""
        applied, max_event, self.watermark = meta
        self.applied = AppliedOffsets(*applied)
        self.entries = entries
        # Idle time counts on from the watermark reached, not from the last record.
        self.max_event = max(max_event, self.watermark)
        self.arrival = now_ms


class NodeState:
    """One stateful node's state on one worker, by input partition.

    Subclasses (the node operators' state, :mod:`loom.streaming.bytewax.stateful`)
    add what their node derives from the entries (window deadlines).
    """

    def __init__(self, node_id: str, clock: Callable[[], float]) -> None:
        self.node_id = node_id
        self.clock = clock
        self.partitions: dict[int, PartitionState] = {}
        self.changed = False
        """Something was applied, deleted or emitted since the last cut."""
        self.moved = False
        """Only event time moved (an idle partition) since the last cut."""
        self.entry_bytes = 0.0
        """Mean pickled size of an entry in recent snapshots (for ``loom_state_bytes``)."""
        self.report: Callable[[NodeState], None] | None = None
        """Called after each cut, to publish the node's gauges."""

    def partition(self, partition: int) -> PartitionState:
        part = self.partitions.get(partition)
        if part is None:
            part = self.partitions[partition] = PartitionState(partition, self.clock())
        return part

    def restore(self, saved: dict[int, tuple[dict[Any, Any], Any]]) -> None:
        now = self.clock()
        for partition, (entries, meta) in saved.items():
            self.partition(partition).restore(entries, meta, now)
            self.restored(self.partitions[partition])

    def restored(self, part: PartitionState) -> None:
        """Hook: rebuild what a subclass derives from ``part.entries``."""

    def capture(self, committed: dict[int, int]) -> dict[int, Change]:
        """The changes since the last cut, pickled now (state keeps changing after).

        One pickle per partition, not per key: pickling a key's value on its
        own, then writing it as a row, measured 8.6 µs a changed key; one
        pickle of the changed keys and one row, 0.5 µs.
        """
        delta: dict[int, Change] = {}
        for partition, part in self.partitions.items():
            if partition in committed:
                part.applied.prune(committed[partition])
            entries, dirty = part.entries, part.dirty
            base = part.logged > max(_COMPACT_MIN_BYTES, _COMPACT_RATIO * part.base_bytes)
            deletes: list[Any] = []
            if base:
                updates = entries
            else:
                updates, deletes = _changes(entries, dirty)
            data = pickle.dumps((updates, deletes, part.meta()), _PICKLE)
            part.dirty = set()
            if base:
                part.base_bytes, part.logged = len(data), 0
            else:
                part.logged += len(data)
            if updates and (base or len(updates) >= 100):
                mean = len(data) / len(updates)
                self.entry_bytes = (
                    mean if not self.entry_bytes else 0.8 * self.entry_bytes + 0.2 * mean
                )
            delta[partition] = Change(data, base)
        self.changed = self.moved = False
        if self.report is not None:
            self.report(self)
        return delta

    def keys(self) -> int:
        return sum(len(part.entries) for part in self.partitions.values())

    def check_one_partition(self, key: Any, partition: int) -> None:
        """Refuse a key that already has state for another input partition of this worker.

        State is kept per input partition, so a key function must keep each
        key in one partition (``docs/stateful.md``); one that does not would
        split the key's state silently. Checked when a key gets new state,
        for key functions only (Kafka partitions by the record key).
        """
        for other, part in self.partitions.items():
            if other != partition and key in part.entries:
                raise KeySpansPartitions(
                    f"key {key!r} has state for input partition {other} and now comes from "
                    f"partition {partition}: the key function groups records across "
                    "partitions; re-key them through a topic first (docs/stateful.md)"
                )

    def open_windows(self) -> int | None:
        """Windows waiting to close, for nodes that have windows."""
        return None


def _changes(entries: dict[Any, Any], dirty: set[Any]) -> tuple[dict[Any, Any], list[Any]]:
    """The values of the changed keys still present, and the changed keys deleted.

    Set operations and ``itemgetter`` keep the per-key work in C: a
    comprehension over the changed keys measured ~25% of a deduplicating
    worker's time.
    """
    present = list(dirty & entries.keys())
    deleted = list(dirty - entries.keys())
    if len(present) == 1:
        return {present[0]: entries[present[0]]}, deleted
    values = operator.itemgetter(*present)(entries) if present else ()
    return dict(zip(present, values, strict=True)), deleted


class Barrier(Ack):
    """Holds the acks of records applied between two cuts, until their snapshot is saved.

    Pending counts one for the open interval (released at the cut) and one per
    result emitted in it (released on delivery). When it reaches zero the
    barrier is ``ready``; :meth:`WorkerState.advance` saves ready barriers in
    order, then releases their ``members``.
    """

    __slots__ = ("delta", "members", "outputs", "ready")

    def __init__(self) -> None:
        self.pending = 1
        self.members: list[Ack] = []
        self.delta: Delta | None = None
        self.outputs = 0
        self.ready = False

    def _finished(self) -> None:
        self.ready = True


class StateStore(Protocol):
    """Where a run's snapshots are saved: per worker, one transaction per cut."""

    def load(self, worker: int) -> Loaded: ...

    def save(self, worker: int, delta: Delta) -> None:
        """Apply ``delta`` to the worker's saved state, durably, before returning."""
        ...

    def close(self) -> None: ...


class WorkerState:
    """Every stateful node's state on one worker, its barriers, and its snapshots."""

    def __init__(self, worker: int, store: StateStore, clock: Callable[[], float]) -> None:
        self.worker = worker
        self.store = store
        self.clock = clock
        self.nodes: dict[str, NodeState] = {}
        self.barrier = Barrier()
        self.saving: deque[Barrier] = deque()
        self.held = 0
        """Records applied to state whose snapshot is not saved yet (in flight, but
        not holding memory: only their acks are kept)."""
        self.timed: Callable[[float], None] | None = None
        """Told the seconds each save took (``loom_state_snapshot_seconds``)."""
        self._saved = store.load(worker)

    def node(self, node_id: str, make: Callable[[], NodeState]) -> NodeState:
        """The state of ``node_id`` on this worker, restored from the last snapshot."""
        state = self.nodes.get(node_id)
        if state is None:
            state = self.nodes[node_id] = make()
            saved = self._saved.pop(node_id, None)
            if saved:
                state.restore(saved)
        return state

    # -- the record side (the node operators) ------------------------------

    def hold(self, ack: Ack) -> None:
        """A record's effect is in state: it finishes when its snapshot is saved."""
        self.barrier.members.append(ack)
        self.held += 1

    def hold_all(self, acks: list[Ack]) -> None:
        self.barrier.members += acks
        self.held += len(acks)

    def output_ack(self) -> Ack:
        """The ack of a result emitted now: the cut waits for its delivery."""
        return self.output_acks(1)

    def output_acks(self, count: int) -> Ack:
        """The ack shared by ``count`` results emitted now."""
        barrier = self.barrier
        barrier.pending += count
        barrier.outputs += count
        return barrier

    # -- the loop side (WorkerLoop) ------------------------------------------

    @property
    def changed(self) -> bool:
        """Records applied or results emitted since the last cut (a drain saves them)."""
        barrier = self.barrier
        return bool(barrier.members or barrier.outputs) or any(
            node.changed for node in self.nodes.values()
        )

    @property
    def due(self) -> bool:
        """Anything to snapshot at a cut: a change, or event time that moved."""
        return self.changed or any(node.moved for node in self.nodes.values())

    def cut(self, committed: dict[int, int]) -> None:
        """Capture the changes since the last cut and open the next interval."""
        barrier = self.barrier
        barrier.delta = {node_id: node.capture(committed) for node_id, node in self.nodes.items()}
        self.saving.append(barrier)
        self.barrier = Barrier()
        barrier.release()  # the interval is closed; its results may still be in flight

    def advance(self) -> int:
        """Save the ready snapshots in order, then release what they hold; return how many."""
        saved = 0
        saving = self.saving
        while saving and saving[0].ready:
            barrier = saving.popleft()
            assert barrier.delta is not None
            started = time.perf_counter()
            self.store.save(self.worker, barrier.delta)
            if self.timed is not None:
                self.timed(time.perf_counter() - started)
            barrier.delta = None
            self.held -= len(barrier.members)
            release_all(barrier.members)
            saved += 1
        return saved


# -- stores -------------------------------------------------------------------


def replay(changes: list[bytes]) -> tuple[dict[Any, Any], Any]:
    """A partition's entries and metadata from its saved changes, oldest first."""
    entries: dict[Any, Any] = {}
    meta: Any = None
    for data in changes:
        updates, deletes, meta = pickle.loads(data)
        entries.update(updates)
        for key in deletes:
            entries.pop(key, None)
    return entries, meta


class MemoryStateStore:
    """Snapshots kept in this process only (``state.durability = "volatile"``).

    They survive a run of the same runner (``TestRunner`` runs one after the
    other see the state as a restarted service would), not the process.
    """

    def __init__(self) -> None:
        self._logs: dict[tuple[int, str, int], list[bytes]] = {}
        self._lock = threading.Lock()

    def load(self, worker: int) -> Loaded:
        loaded: Loaded = {}
        with self._lock:
            for (owner, node, partition), changes in self._logs.items():
                if owner == worker:
                    loaded.setdefault(node, {})[partition] = replay(changes)
        return loaded

    def save(self, worker: int, delta: Delta) -> None:
        with self._lock:
            for node, partitions in delta.items():
                for partition, change in partitions.items():
                    log = self._logs.setdefault((worker, node, partition), [])
                    if change.base:
                        log.clear()
                    log.append(change.data)

    def close(self) -> None:
        return None


_WORKER_FILE = re.compile(r"worker-(\d+)-of-(\d+)\.sqlite3$")


class SqliteStateStore:
    """Snapshots in one SQLite file per worker under ``directory``.

    ``worker-<i>-of-<n>.sqlite3`` holds, per node and partition, a log of
    changes (one row per cut), compacted into one base row from time to time.
    State is partitioned across ``n`` workers, so a directory written by
    another number of workers is refused (:class:`~loom.errors.StateLayoutError`)
    rather than silently read in part. Each save is one transaction with
    ``synchronous=FULL``: it is on disk when :meth:`save` returns.
    """

    def __init__(self, directory: Path, workers: int) -> None:
        self.directory = directory
        self.workers = workers
        directory.mkdir(parents=True, exist_ok=True)
        others = sorted(
            {int(m.group(2)) for p in directory.iterdir() if (m := _WORKER_FILE.match(p.name))}
            - {workers}
        )
        if others:
            raise StateLayoutError(
                [
                    (
                        [("streaming", "runtime", "workers_per_process"), ("state", "dir")],
                        f"the state in {directory} was written by {others[0]} workers and this "
                        f"run has {workers}; run with {others[0]} workers (replicas x workers "
                        "per process), or empty the directory to start the state afresh",
                    )
                ]
            )
        self._connections: dict[int, sqlite3.Connection] = {}
        self._lock = threading.Lock()

    def _connection(self, worker: int) -> sqlite3.Connection:
        with self._lock:
            connection = self._connections.get(worker)
            if connection is None:
                path = self.directory / f"worker-{worker}-of-{self.workers}.sqlite3"
                connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY, node TEXT,"
                    " part INTEGER, data BLOB)"
                )
                self._connections[worker] = connection
            return connection

    def load(self, worker: int) -> Loaded:
        logs: dict[tuple[str, int], list[bytes]] = {}
        rows = self._connection(worker).execute("SELECT node, part, data FROM changes ORDER BY seq")
        for node, part, data in rows:
            logs.setdefault((node, part), []).append(data)
        loaded: Loaded = {}
        for (node, part), changes in logs.items():
            loaded.setdefault(node, {})[part] = replay(changes)
        return loaded

    def save(self, worker: int, delta: Delta) -> None:
        db = self._connection(worker)
        db.execute("BEGIN")
        try:
            for node, partitions in delta.items():
                for part, change in partitions.items():
                    if change.base:
                        db.execute("DELETE FROM changes WHERE node = ? AND part = ?", (node, part))
                    db.execute(
                        "INSERT INTO changes (node, part, data) VALUES (?, ?, ?)",
                        (node, part, change.data),
                    )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()
