"""Dead letters as a workflow: read, summarise and replay a dead-letter topic.

``read`` is the API for notebooks and scripts; ``summarise`` and ``Replay``
are what ``loom dlq inspect`` and ``loom dlq replay`` run
(:mod:`loom.dlq_cli`). Every client here uses ``assign()`` with explicit
offsets, never ``subscribe()``, and never commits: the ``group.id``
librdkafka insists on is unique per client (``loom-dlq-<random>``) and no
offset is ever stored under it, so a service's group is never disturbed.

**Where a read ends.** At start, the end of each partition is its high
watermark, then a probe reads from there until a poll returns nothing
(:data:`PROBE_IDLE_S`, at most :data:`PROBE_MAX_S`): on Apache Kafka the
watermark is exact and the probe only adds what was written meanwhile; on
the test broker (Tansu), whose watermark lags the log end, it finds the
records the watermark does not count yet. Records written after that are
not read. A replay stores these ends in its state, so a resumed or repeated
replay never reads past them (not even its own new dead letters).

**Replay state** (one JSON file per job, see :class:`ReplayState`): the job
(topic, destination, filters, limit) names the file; it holds the ends and
the next offset per partition, written atomically (temp file, fsync,
rename) only after the producer confirmed every record before that offset.
A SIGKILL re-sends at most the records produced since the last checkpoint
(one window: :data:`CHECKPOINT_RECORDS` records or :data:`CHECKPOINT_S`
seconds); nothing is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from loom.config.context import KafkaSettings
from loom.config.settings import load_config
from loom.errors import DlqError as DlqError  # noqa: PLC0414 (re-export)
from loom.streaming.bytewax.records import ATTEMPT_HEADER
from loom.streaming.errors import ErrorEnvelope, ErrorKind

PROBE_IDLE_S = 1.0
"""A probe past the high watermark stops at the first poll that returns nothing for this long."""
PROBE_MAX_S = 10.0
"""A probe past the high watermark stops after this long even on a busy topic."""
STALL_S = 30.0
"""A read that gets nothing for this long before its ends fails (it never silently stops short)."""
CHECKPOINT_RECORDS = 500
"""A replay flushes, checks deliveries and writes its state at least every this many records..."""
CHECKPOINT_S = 0.5
"""... and at least this often (seconds)."""

REPLAY_ID_HEADER = "loom-replay-id"
REPLAY_TOPIC_HEADER = "loom-replay-dlq-topic"
REPLAY_PARTITION_HEADER = "loom-replay-dlq-partition"
REPLAY_OFFSET_HEADER = "loom-replay-dlq-offset"
_REPLAY_HEADERS = frozenset(
    {ATTEMPT_HEADER, REPLAY_ID_HEADER, REPLAY_TOPIC_HEADER, REPLAY_PARTITION_HEADER}
    | {REPLAY_OFFSET_HEADER}
)
_GROUP_KEYS = frozenset(
    {
        "group.id",
        "group.instance.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.commit.interval.ms",
        "auto.offset.reset",
        "partition.assignment.strategy",
        "group.protocol",
        "session.timeout.ms",
        "heartbeat.interval.ms",
    }
)


class DeadLetter(NamedTuple):
    """One record of a dead-letter topic: where it is and its envelope."""

    topic: str
    partition: int
    offset: int
    envelope: ErrorEnvelope


class Undecodable(NamedTuple):
    """A record of the dead-letter topic that is not a Loom envelope."""

    topic: str
    partition: int
    offset: int
    error: str


# --------------------------------------------------------------------- filters

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it has no offset) or an age: ``30m``, ``2h``, ``7d``."""
    found = _DURATION.fullmatch(text.strip())
    if found:
        delta = timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: ISO 8601 (2026-12-01T09:00:00Z) or an age (30m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filters:
    """Which dead letters to select: values of one filter are OR'ed, filters AND'ed."""

    kinds: frozenset[ErrorKind] = frozenset()
    nodes: frozenset[str] = frozenset()
    exceptions: frozenset[str] = frozenset()
    source_topics: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    as_given: tuple[str | None, str | None] = (None, None)
    """``since``/``until`` as the user wrote them (``2h``): a replay job's identity
    keeps these, its state the times they meant when the job started."""

    @classmethod
    def of(
        cls,
        *,
        kind: ErrorKind | str | Iterable[ErrorKind | str] | None = None,
        node: str | Iterable[str] | None = None,
        exception: str | Iterable[str] | None = None,
        source_topic: str | Iterable[str] | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
    ) -> Filters:
        return cls(
            kinds=frozenset(ErrorKind(k) for k in _many(kind)),
            nodes=frozenset(_many(node)),
            exceptions=frozenset(_many(exception)),
            source_topics=frozenset(_many(source_topic)),
            since=parse_time(since) if isinstance(since, str) else since,
            until=parse_time(until) if isinstance(until, str) else until,
            as_given=(
                since if isinstance(since, str) else None,
                until if isinstance(until, str) else None,
            ),
        )

    def matches(self, envelope: ErrorEnvelope) -> bool:
        if self.kinds and envelope.kind not in self.kinds:
            return False
        if self.nodes and envelope.node not in self.nodes:
            return False
        if self.exceptions and envelope.exception_type not in self.exceptions:
            return False
        if self.source_topics and envelope.topic not in self.source_topics:
            return False
        occurred = envelope.occurred_at
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=UTC)
        if self.since is not None and occurred < self.since:
            return False
        return self.until is None or occurred < self.until

    def as_json(self) -> dict[str, Any]:
        """A canonical form: part of a replay job's identity."""
        return {
            "kind": sorted(k.value for k in self.kinds),
            "node": sorted(self.nodes),
            "exception": sorted(self.exceptions),
            "source_topic": sorted(self.source_topics),
            "since": self.as_given[0] or (self.since.isoformat() if self.since else None),
            "until": self.as_given[1] or (self.until.isoformat() if self.until else None),
        }


def _many(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | ErrorKind):
        return [value]
    return list(value)


# --------------------------------------------------------------------- clients


def kafka_settings(
    bootstrap_servers: str | None = None,
    settings: KafkaSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> KafkaSettings:
    """The service's ``LOOM_KAFKA__*`` settings, ``bootstrap_servers`` over them.

    :raises SettingsError: a ``LOOM_*`` variable is invalid.
    :raises DlqError: no brokers are given at all.
    """
    kafka = settings if settings is not None else load_config(environ=environ).kafka
    if bootstrap_servers:
        kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
    if not kafka.bootstrap_servers:
        raise DlqError("no brokers: pass --bootstrap-servers or set LOOM_KAFKA__BOOTSTRAP_SERVERS")
    return kafka


def consumer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """A reader that joins no group and commits nothing (its group id is unique)."""
    config = {k: v for k, v in kafka.consumer.items() if k not in _GROUP_KEYS}
    config.update(kafka.client_config())
    config.update(
        {
            "group.id": f"loom-dlq-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
        }
    )
    return config


def producer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """An idempotent producer (``acks=all``) with the service's producer extras."""
    config = dict(kafka.producer)
    config.update(kafka.client_config())
    config.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
    return config


def _partitions(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise DlqError(f"cannot reach the brokers to read {topic!r}: {exc}") from None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise DlqError(f"topic {topic!r} does not exist")
    return sorted(found.partitions)


def log_bounds(consumer: Consumer, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """``(starts, ends)`` per partition: low watermarks and log ends (see the module doc)."""
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for partition in _partitions(consumer, topic):
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10, cached=False
            )
        except KafkaException as exc:
            raise DlqError(f"cannot read the offsets of {topic}[{partition}]: {exc}") from None
        starts[partition], ends[partition] = max(low, 0), max(high, 0)
    consumer.assign([TopicPartition(topic, p, ends[p]) for p in ends])
    started = idle_since = time.monotonic()
    try:
        while (now := time.monotonic()) - started < PROBE_MAX_S:
            batch = [m for m in consumer.consume(1000, timeout=0.1) if not m.error()]
            if not batch:
                if now - idle_since >= PROBE_IDLE_S:
                    break
                continue
            idle_since = time.monotonic()
            for message in batch:
                _, partition, offset = coordinates(message)
                ends[partition] = max(ends[partition], offset + 1)
    finally:
        consumer.unassign()
    return starts, ends


def coordinates(message: Message) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset (always set on a record)."""
    return str(message.topic()), int(message.partition() or 0), int(message.offset() or 0)


def decode(message: Message) -> DeadLetter | Undecodable:
    """A dead-letter record's envelope (JSON, or msgpack for a msgpack DLQ)."""
    topic, partition, offset = coordinates(message)
    value = message.value()
    if value is None:
        return Undecodable(topic, partition, offset, "a tombstone (no value)")
    try:
        return DeadLetter(topic, partition, offset, _JSON.decode(value))
    except msgspec.DecodeError as exc:
        try:
            return DeadLetter(topic, partition, offset, _MSGPACK.decode(value))
        except msgspec.DecodeError:
            return Undecodable(topic, partition, offset, str(exc))


_JSON = msgspec.json.Decoder(ErrorEnvelope)
_MSGPACK = msgspec.msgpack.Decoder(ErrorEnvelope)


def scan(
    consumer: Consumer,
    topic: str,
    starts: Mapping[int, int],
    ends: Mapping[int, int],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[Message]:
    """The records of ``topic`` from ``starts`` up to (not including) ``ends``.

    In offset order per partition.

    :raises DlqError: nothing arrives for :data:`STALL_S` before the ends are reached.
    """
    pending = {p: end for p, end in ends.items() if starts.get(p, 0) < end}
    if not pending:
        return
    consumer.assign([TopicPartition(topic, p, starts.get(p, 0)) for p in pending])
    last_progress = time.monotonic()
    try:
        while pending:
            batch = consumer.consume(500, timeout=0.1)
            delivered = 0
            for message in batch:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise DlqError(f"reading {topic}: {error}")
                _, partition, offset = coordinates(message)
                end = pending.get(partition)
                if end is None or offset >= end:
                    continue
                delivered += 1
                yield message
                if offset + 1 >= end:
                    del pending[partition]
            if delivered:
                last_progress = time.monotonic()
                if on_batch is not None:
                    on_batch(delivered)
            else:
                _drop_reached(consumer, topic, pending)
                if pending and time.monotonic() - last_progress > STALL_S:
                    where = ", ".join(f"[{p}] before {e}" for p, e in sorted(pending.items()))
                    raise DlqError(f"reading {topic} stalled for {STALL_S:g} s {where}")
    finally:
        consumer.unassign()


def _drop_reached(consumer: Consumer, topic: str, pending: dict[int, int]) -> None:
    """Partitions whose position reached the end without a record there (gaps, markers)."""
    positions = consumer.position([TopicPartition(topic, p) for p in pending])
    for tp in positions:
        if tp.offset >= 0 and tp.offset >= pending.get(tp.partition, 0):
            pending.pop(tp.partition, None)


def read_letters(
    topic: str,
    kafka: KafkaSettings,
    filters: Filters | None = None,
    *,
    undecodable: list[Undecodable] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[DeadLetter]:
    """The selected dead letters of ``topic`` with their coordinates.

    Records that are not envelopes go to ``undecodable`` (when given);
    ``on_start(total)`` gets the number of records to read.
    """
    consumer = Consumer(consumer_config(kafka))
    try:
        starts, ends = log_bounds(consumer, topic)
        if on_start is not None:
            on_start(sum(max(0, ends[p] - starts[p]) for p in ends))
        for message in scan(consumer, topic, starts, ends, on_batch=on_batch):
            letter = decode(message)
            if isinstance(letter, Undecodable):
                if undecodable is not None:
                    undecodable.append(letter)
            elif filters is None or filters.matches(letter.envelope):
                yield letter
    finally:
        consumer.close()


def read(
    topic: str,
    *,
    bootstrap_servers: str | None = None,
    settings: KafkaSettings | None = None,
    kind: ErrorKind | str | Iterable[ErrorKind | str] | None = None,
    node: str | Iterable[str] | None = None,
    exception: str | Iterable[str] | None = None,
    source_topic: str | Iterable[str] | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
) -> Iterator[ErrorEnvelope]:
    """The dead letters of ``topic`` as envelopes, original key and value as bytes.

    Reads from the beginning to the end seen at start (see the module doc),
    with the service's ``LOOM_KAFKA__*`` settings (or ``settings``) and
    ``bootstrap_servers`` over them. Filters as in ``loom dlq inspect``;
    ``since``/``until`` take datetimes, ISO 8601 text or ages (``2h``).
    Records that are not Loom envelopes are skipped. Joins no group,
    commits nothing.
    """
    filters = Filters.of(
        kind=kind,
        node=node,
        exception=exception,
        source_topic=source_topic,
        since=since,
        until=until,
    )
    kafka = kafka_settings(bootstrap_servers, settings)
    for letter in read_letters(topic, kafka, filters):
        yield letter.envelope


# --------------------------------------------------------------------- summary

PREVIEW_CHARS = 120


def preview(data: bytes | None, limit: int = PREVIEW_CHARS) -> str | None:
    """Bytes for a human: UTF-8 text, else ``base64:...``, cut to ``limit`` characters."""
    if data is None:
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        import base64  # noqa: PLC0415 - rare path

        text = "base64:" + base64.b64encode(data).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Group:
    kind: str
    node: str
    exception_type: str
    count: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    flows: set[str] = field(default_factory=set)
    sources: dict[str, set[int]] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    sample: dict[str, Any] | None = None

    def add(self, letter: DeadLetter) -> None:
        envelope = letter.envelope
        self.count += 1
        seen = envelope.occurred_at
        if self.first_seen is None or seen < self.first_seen:
            self.first_seen = seen
        if self.last_seen is None or seen > self.last_seen:
            self.last_seen = seen
        self.flows.add(envelope.flow)
        if envelope.topic is not None:
            partitions = self.sources.setdefault(envelope.topic, set())
            if envelope.partition is not None:
                partitions.add(envelope.partition)
        self.attempts[envelope.attempt] = self.attempts.get(envelope.attempt, 0) + 1
        if self.sample is None:
            self.sample = {
                "dlq_partition": letter.partition,
                "dlq_offset": letter.offset,
                "source_topic": envelope.topic,
                "source_partition": envelope.partition,
                "source_offset": envelope.offset,
                "occurred_at": envelope.occurred_at.isoformat(),
                "message": preview(envelope.message.encode(), 300),
                "key": preview(envelope.key),
                "value": preview(envelope.value),
            }

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": self.node,
            "exception_type": self.exception_type,
            "count": self.count,
            "first_seen": self.first_seen.isoformat() if self.first_seen else None,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "flows": sorted(self.flows),
            "source_topics": {t: sorted(p) for t, p in sorted(self.sources.items())},
            "attempts": {str(a): n for a, n in sorted(self.attempts.items())},
            "sample": self.sample,
        }


@dataclass
class Summary:
    topic: str
    total: int = 0
    groups: dict[tuple[str, str, str], Group] = field(default_factory=dict)
    undecodable: list[Undecodable] = field(default_factory=list)

    def add(self, letter: DeadLetter) -> None:
        envelope = letter.envelope
        key = (envelope.kind.value, envelope.node, envelope.exception_type)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(*key)
        group.add(letter)
        self.total += 1

    def sorted_groups(self) -> list[Group]:
        return sorted(self.groups.values(), key=lambda g: (-g.count, g.kind, g.node))

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "total": self.total,
            "groups": [g.as_json() for g in self.sorted_groups()],
            "undecodable": len(self.undecodable),
        }


def summarise(
    letters: Iterable[DeadLetter], topic: str, undecodable: Sequence[Undecodable] = ()
) -> Summary:
    """Dead letters grouped by (kind, node, exception type), biggest group first."""
    summary = Summary(topic)
    for letter in letters:
        summary.add(letter)
    summary.undecodable = list(undecodable)
    return summary


# --------------------------------------------------------------------- replay


def replay_headers(letter: DeadLetter, replay_id: str) -> list[tuple[str, str | bytes | None]]:
    """The original headers, marked as a replay of ``letter``.

    ``loom-attempt`` is the envelope's attempt: when the record fails again,
    its new dead letter has attempt + 1.
    """
    envelope = letter.envelope
    headers: list[tuple[str, str | bytes | None]] = [
        (k, v) for k, v in envelope.headers if k not in _REPLAY_HEADERS
    ]
    headers += [
        (ATTEMPT_HEADER, str(envelope.attempt).encode()),
        (REPLAY_ID_HEADER, replay_id.encode()),
        (REPLAY_TOPIC_HEADER, letter.topic.encode()),
        (REPLAY_PARTITION_HEADER, str(letter.partition).encode()),
        (REPLAY_OFFSET_HEADER, str(letter.offset).encode()),
    ]
    return headers


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/loom/dlq-replay`` when that is set, else ``./.loom-dlq-replay``."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_STATE_HOME")
    return Path(xdg) / "loom" / "dlq-replay" if xdg else Path(".loom-dlq-replay")


class ReplayState(msgspec.Struct, kw_only=True):
    """A replay job's durable progress (its JSON state file).

    ``next`` is, per DLQ partition, the first offset not yet handled: every
    record before it was replayed (delivery confirmed) or deliberately not
    selected. ``ends`` are fixed when the job starts.
    """

    version: int = 1
    replay_id: str
    job: dict[str, Any]
    ends: dict[int, int]
    next: dict[int, int]
    replayed: int = 0
    not_selected: int = 0
    unroutable: int = 0
    undecodable: int = 0
    complete: bool = False
    since: datetime | None = None
    """The ``--since`` in force for the whole job (an age is resolved when it starts)."""
    until: datetime | None = None
    started_at: datetime
    updated_at: datetime


def job_key(job: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def state_path(state_dir: Path, job: Mapping[str, Any]) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(job["dlq_topic"]))
    return state_dir / f"{safe}-{job_key(job)}.json"


def load_state(path: Path) -> ReplayState | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgspec.json.decode(data, type=ReplayState)
    except msgspec.DecodeError as exc:
        raise DlqError(
            f"replay state {path} is unreadable ({exc}); move it away to start over"
        ) from None


def save_state(path: Path, state: ReplayState) -> None:
    """Write ``state`` atomically: a temp file beside it, fsync, rename, fsync the folder."""
    state.updated_at = datetime.now(UTC)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as out:
        out.write(msgspec.json.format(msgspec.json.encode(state)))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextlib.contextmanager
def job_lock(path: Path) -> Iterator[None]:
    """One replay of a job at a time (an advisory lock beside its state file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DlqError(f"another replay of this job is running (lock {lock.name})") from None
        yield


@dataclass
class ReplayOutcome:
    state: ReplayState
    path: Path
    interrupted: bool = False
    already_complete: bool = False
    problem: str | None = None
    this_run: int = 0


@dataclass
class Replay:
    """One replay job: ``loom dlq replay`` without its command line."""

    dlq_topic: str
    kafka: KafkaSettings
    to: str | None = None
    filters: Filters = field(default_factory=Filters)
    limit: int | None = None
    rate: float | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    dry_run: bool = False
    say: Callable[[str], None] = print
    stop_requested: bool = False

    @property
    def job(self) -> dict[str, Any]:
        return {
            "dlq_topic": self.dlq_topic,
            "bootstrap_servers": self.kafka.bootstrap_servers,
            "to": self.to,
            "to_source": self.to is None,
            "filters": self.filters.as_json(),
            "limit": self.limit,
        }

    def request_stop(self, *_: object) -> None:
        self.stop_requested = True

    def run(self) -> ReplayOutcome:
        path = state_path(self.state_dir, self.job)
        if self.dry_run:
            return self._run(path)
        with job_lock(path):
            return self._run(path)

    def _run(self, path: Path) -> ReplayOutcome:
        consumer = Consumer(consumer_config(self.kafka))
        try:
            state = load_state(path)
            if state is not None and state.complete:
                return ReplayOutcome(state, path, already_complete=True)
            if state is None:
                starts, ends = log_bounds(consumer, self.dlq_topic)
                now = datetime.now(UTC)
                state = ReplayState(
                    replay_id=uuid.uuid4().hex,
                    job=self.job,
                    ends=ends,
                    next=starts,
                    since=self.filters.since,
                    until=self.filters.until,
                    started_at=now,
                    updated_at=now,
                )
                if not self.dry_run:  # the id and the ends hold from now on, even after a kill
                    save_state(path, state)
            if self.to is not None:
                _partitions(consumer, self.to)
            return self._replay(consumer, state, path)
        finally:
            consumer.close()

    def _replay(  # noqa: PLR0915 - one loop, its checkpoints kept beside it
        self, consumer: Consumer, state: ReplayState, path: Path
    ) -> ReplayOutcome:
        outcome = ReplayOutcome(state, path)
        filters = dataclasses.replace(self.filters, since=state.since, until=state.until)
        producer = None if self.dry_run else Producer(producer_config(self.kafka))
        failures: list[str] = []

        def delivered(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                failures.append(f"{message.topic()}: {error.str()}")

        destinations: dict[str, int] = {}
        done = dict(state.next)  # handled, not yet checkpointed
        counts = {"replayed": 0, "not_selected": 0, "unroutable": 0, "undecodable": 0}
        since_checkpoint = 0
        last_checkpoint = time.monotonic()
        pace = _Pace(self.rate)

        def checkpoint(final: bool = False) -> bool:
            nonlocal since_checkpoint, last_checkpoint
            if producer is not None:
                remaining = producer.flush(30)
                if remaining:
                    failures.append(f"{remaining} records not confirmed within 30 s")
            if failures:
                outcome.problem = f"delivery failed: {failures[0]}" + (
                    f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
                )
                return False
            state.next = dict(done)
            for name, count in counts.items():
                setattr(state, name, getattr(state, name) + count)
                counts[name] = 0
            state.complete = final
            if not self.dry_run:
                save_state(path, state)
            since_checkpoint, last_checkpoint = 0, time.monotonic()
            return True

        limit_left = None if self.limit is None else self.limit - state.replayed
        reached_limit = limit_left is not None and limit_left <= 0

        def guarded(records: Iterator[Message]) -> Iterator[Message]:
            try:
                yield from records
            except DlqError as exc:  # stalled, or an error reading: keep what was confirmed
                outcome.problem = str(exc)

        messages = (
            iter(()) if reached_limit else scan(consumer, self.dlq_topic, state.next, state.ends)
        )
        for message in guarded(messages):
            if self.stop_requested:
                break
            letter = decode(message)
            _, partition, offset = coordinates(message)
            if isinstance(letter, Undecodable):
                counts["undecodable"] += 1
                self.say(f"not an envelope, left out: {letter.topic}[{partition}]@{offset}")
            elif not filters.matches(letter.envelope):
                counts["not_selected"] += 1
            else:
                target = self.to if self.to is not None else letter.envelope.topic
                if target is None:
                    counts["unroutable"] += 1
                    self.say(
                        f"no source topic (a derived record), left out: "
                        f"{self.dlq_topic}[{partition}]@{offset}; replay it with --to TOPIC"
                    )
                else:
                    if target not in destinations:
                        try:
                            destinations[target] = len(_partitions(consumer, target))
                        except DlqError as exc:
                            checkpoint()
                            outcome.problem = outcome.problem or str(exc)
                            return outcome
                    keep = letter.envelope.partition if self.to is None else None
                    if keep is not None and keep >= destinations[target]:
                        keep = None
                    pace.wait(lambda: self.stop_requested)
                    if self.stop_requested:
                        break
                    try:
                        self._send(
                            producer=producer,
                            target=target,
                            partition=keep,
                            letter=letter,
                            replay_id=state.replay_id,
                            on_delivery=delivered,
                        )
                    except KafkaException as exc:
                        outcome.problem = f"producing to {target}: {exc}"
                        break
                    counts["replayed"] += 1
                    outcome.this_run += 1
                    since_checkpoint += 1
                    if limit_left is not None:
                        limit_left -= 1
            done[partition] = offset + 1
            if limit_left is not None and limit_left <= 0:
                reached_limit = True
                break
            if since_checkpoint >= CHECKPOINT_RECORDS or (
                time.monotonic() - last_checkpoint >= CHECKPOINT_S
            ):
                if not checkpoint():
                    return outcome
                if producer is not None:
                    producer.poll(0)
        if outcome.problem:
            problem = outcome.problem
            if not checkpoint():  # keep what the broker confirmed before the problem
                outcome.problem = f"{problem}; {outcome.problem}"
            return outcome
        if self.stop_requested and not reached_limit:
            outcome.interrupted = True
            checkpoint()
            return outcome
        checkpoint(final=True)
        return outcome

    def _send(
        self,
        *,
        producer: Producer | None,
        target: str,
        partition: int | None,
        letter: DeadLetter,
        replay_id: str,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        envelope = letter.envelope
        where = f"{target}[{partition}]" if partition is not None else target
        if producer is None:
            self.say(
                f"would replay {letter.topic}[{letter.partition}]@{letter.offset} "
                f"({envelope.kind.value}/{envelope.node}/{envelope.exception_type}, "
                f"key {preview(envelope.key, 40)!s}) to {where}"
            )
            return
        kwargs: dict[str, Any] = {"on_delivery": on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        headers = replay_headers(letter, replay_id)
        while True:
            try:
                producer.produce(target, envelope.value, envelope.key, headers=headers, **kwargs)
                return
            except BufferError:
                producer.poll(0.1)


class _Pace:
    """At most ``rate`` records per second (none: as fast as the producer goes)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next = time.monotonic()

    def wait(self, stop: Callable[[], bool]) -> None:
        if not self.interval:
            return
        while not stop():
            left = self.next - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.1))  # pacing, checked for a stop request
        self.next = max(self.next, time.monotonic() - self.interval) + self.interval


@contextlib.contextmanager
def stop_on_signals(replay: Replay) -> Iterator[None]:
    """SIGINT and SIGTERM finish the current window, checkpoint and stop."""
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        replay.request_stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
