"""The Kafka transport, on confluent-kafka.

Each Bytewax worker gets its own consumer and its own producer (librdkafka
clients are thread-safe, but a worker's delivery callbacks must run on the
worker's thread, where its acks live). Partitions are spread over all workers
of all processes: partition ``p`` belongs to global worker
``p % worker_count``, and each worker ``assign()``s its partitions, resuming
from the group's committed offsets (``auto.offset.reset`` when none).

Offsets are committed by :mod:`loom.streaming.bytewax.source`, which calls
:meth:`KafkaReader.commit` with finished offsets only (at-least-once), unless
the delivery guarantee is at-most-once, in which case librdkafka commits
consumed positions on its own schedule. Which applies is decided by
:mod:`loom.config.delivery`; this module only carries it out, and owns
``enable.auto.commit`` accordingly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

from confluent_kafka import (
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, not in __all__
    AdminClient,
    ClusterMetadata,
)
from confluent_kafka.cimpl import NewTopic

from loom.config.context import KafkaSettings
from loom.delivery.acks import Ack, release_all
from loom.delivery.transport import FailureReport, Origin, OutRecord
from loom.errors import ConfigPathError
from loom.errors import KafkaStartupError as KafkaStartupError  # noqa: PLC0414 (re-export)

logger = logging.getLogger("loom.transports.kafka")
client_logger = logging.getLogger("loom.transports.kafka.librdkafka")
"""librdkafka's own log lines, routed through Python logging instead of stderr."""

CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    # An end-of-partition event per catch-up tells a reader that a partition is
    # read to its end before it read anything (caught_up, for event time).
    "enable.partition.eof": True,
    "session.timeout.ms": 6000,
    "fetch.wait.max.ms": 100,
    # librdkafka's default (1000 ms) stops fetching for a second whenever its
    # prefetch queue is full; a consumer faster than the queue then starves.
    "fetch.queue.backoff.ms": 10,
    # Bound librdkafka's prefetch (default 64 MiB): with a slow broker its
    # bigger, later fetches showed up as a growing RSS in the 10-minute soak.
    "queued.max.messages.kbytes": 8192,
    "log.connection.close": False,
    "logger": client_logger,
}
PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 5,
    "acks": "all",
    "enable.idempotence": True,
    "allow.auto.create.topics": False,
    "log.connection.close": False,
    "logger": client_logger,
}
BACKPRESSURE_POLL_S = 0.05
METADATA_ROUND_S = 0.25
"""Longest single metadata request while waiting for the broker at start-up."""
CLOSE_FLUSH_TIMEOUT_S = 30.0


def _admin(settings: KafkaSettings) -> AdminClient:
    config = {**settings.client_config(), "logger": client_logger}
    return AdminClient(config)


_message_error = Message.error
"""``Message.error`` unbound: ``map`` calls it per record without a Python frame."""


_SHARED_SETTINGS = [
    ("kafka", name)
    for name in ("security_protocol", "sasl_mechanism", "sasl_username", "sasl_password")
] + [("kafka", "ssl_ca_location")]
"""Settings common to consumers and producers: at fault when both refuse alike."""


def _check_client_settings(*, consumer: dict[str, Any], producer: dict[str, Any]) -> None:
    """Have librdkafka check the client settings now, before any worker starts.

    librdkafka checks its settings only when a client is made, and the
    workers make theirs deep inside Bytewax's start-up, where a bad
    ``LOOM_KAFKA__CONSUMER`` value would surface as a stack of Bytewax
    errors. One client of each kind is made here without brokers (so no
    connection is opened) and dropped. When both refuse for the same reason,
    the settings they share (security, SASL, TLS) are at fault.

    :raises ConfigPathError: naming the settings and librdkafka's reason.
    """
    refused = _client_problem(Consumer, consumer)
    refused_producer = _client_problem(Producer, producer)
    if refused is not None and refused == refused_producer:
        raise ConfigPathError([(_SHARED_SETTINGS, refused)])
    problems = [
        ([path], problem)
        for path, problem in (
            (("kafka", "consumer"), refused),
            (("kafka", "producer"), refused_producer),
        )
        if problem is not None
    ]
    if problems:
        raise ConfigPathError(problems)


def _client_problem(make: type[Consumer] | type[Producer], config: dict[str, Any]) -> str | None:
    """librdkafka's objection to ``config``, from a client made without brokers."""
    offline = {key: value for key, value in config.items() if key != "bootstrap.servers"}
    offline["log_level"] = 0  # no "no bootstrap.servers" warning from the probe client
    try:
        client = make(offline)
    except KafkaException as exc:
        return str(exc.args[0].str() if exc.args else exc)
    if isinstance(client, Consumer):
        client.close()
    return None


class KafkaReader:
    """A worker's consumer of the partitions it owns."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        partitions: list[int],
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.partitions = partitions
        self._last_error: str | None = None
        self._ends: dict[int, int] = {}
        """Offsets at which each partition was last reported read to its end."""
        if partitions:
            consumer.assign([TopicPartition(topic, p, OFFSET_STORED) for p in partitions])

    def poll(self, max_records: int) -> list[Origin]:
        if not self.partitions:
            return []
        messages = self.consumer.consume(num_messages=max_records, timeout=0)
        if not any(map(_message_error, messages)):
            return cast("list[Origin]", messages)
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.fatal():
                raise KafkaException(error)
            elif error.code() == KafkaError._PARTITION_EOF:  # news, not a problem
                self._ends[message.partition() or 0] = message.offset() or 0
            else:
                self._log_error(error)
        return cast("list[Origin]", good)

    def _log_error(self, error: KafkaError) -> None:
        text = f"{error.name()}: {error.str()}"
        if text != self._last_error:  # one line per distinct error, not per poll
            logger.warning("consumer error on %s (retrying): %s", self.topic, text)
            self._last_error = text

    def commit(self, offsets: Mapping[int, int]) -> None:
        self.consumer.commit(
            offsets=[TopicPartition(self.topic, p, offset) for p, offset in offsets.items()],
            asynchronous=True,
        )

    def exhausted(self) -> bool:
        return False

    def end_offsets(self, partitions: Mapping[int, int]) -> dict[int, int]:
        """High watermarks as last seen in fetch responses (no broker round trip)."""
        ends = {}
        for partition in partitions:
            _low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), cached=True
            )
            if high >= 0:
                ends[partition] = high
        return ends

    def caught_up(self, partition: int) -> bool:
        """The position has reached the high watermark of the last fetch response."""
        tp = TopicPartition(self.topic, partition)
        _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
        if high < 0:
            return False
        position = self.consumer.position([tp])[0].offset
        if position < 0:  # nothing consumed yet: where the fetcher reached the end, if it did
            position = self._ends.get(partition, -1)
        return position >= high

    def close(self) -> None:
        """Leave the group; an auto-commit consumer commits its positions here."""
        self.consumer.close()


class DeliveryWindow:
    """Confirms a worker's produced records in windows instead of one by one.

    The producer reports errors only (``delivery.report.only.error``): a
    per-record delivery callback costs more than producing the record. The
    window holds every record produced since the last confirmation; every
    ``confirm_interval_s`` (or ``max_records``) :meth:`settle` flushes the
    producer, and once ``flush()`` has returned with nothing outstanding,
    every record of the window is either reported as failed or was
    acknowledged by the broker, so its ack is released. Commits therefore
    still never pass an unconfirmed record. Whenever the producer has nothing
    outstanding at all, the window is confirmed at once, without a flush.
    """

    confirm_interval_s = 0.2
    max_records = 20_000
    flush_timeout_s = 1.0

    def __init__(self, config: dict[str, Any]) -> None:
        self.producer = Producer(
            {**config, "delivery.report.only.error": True, "on_delivery": self.on_error}
        )
        self._batches: list[tuple[str, list[OutRecord], list[Ack], FailureReport]] = []
        self._count = 0
        self._failed: dict[tuple[str, bytes | None, bytes | None], list[KafkaError]] = {}
        self._opened = 0.0

    def on_error(self, error: KafkaError | None, message: Any) -> None:
        """The producer's delivery callback: called for failed records only."""
        if error is not None:
            key = (message.topic(), message.key(), message.value())
            self._failed.setdefault(key, []).append(error)

    def add(
        self, topic: str, records: list[OutRecord], acks: list[Ack], report: FailureReport
    ) -> None:
        """Hold a produced batch until its confirmation."""
        if not records:
            return
        if not self._batches:
            self._opened = time.monotonic()
        self._batches.append((topic, records, acks, report))
        self._count += len(records)

    def settle(self, *, force: bool = False, timeout_s: float | None = None) -> None:
        """:meth:`confirm` the window, or serve the producer's callbacks when it is empty.

        Error reports need no serving before a confirmation: an unserved one
        keeps the producer's queue non-empty, and the flush that then confirms
        the window serves it first.
        """
        if self._batches:
            self.confirm(force=force, timeout_s=timeout_s)
        else:
            self.producer.poll(0)

    def confirm(self, *, force: bool = False, timeout_s: float | None = None) -> None:
        """Confirm the window if it is due (or ``force``) and the producer drained.

        Waits up to ``timeout_s`` (default ``flush_timeout_s``) for the broker.
        """
        if not self._batches:
            return
        producer = self.producer
        # Nothing outstanding (every record delivered, every error report
        # served: librdkafka counts unserved reports too): confirm at once.
        if len(producer):
            due = self._count >= self.max_records or (
                time.monotonic() - self._opened >= self.confirm_interval_s
            )
            if not (due or force):
                return
            if producer.flush(self.flush_timeout_s if timeout_s is None else timeout_s) > 0:
                return  # the broker is slow or away: confirm on a later call
        batches, self._batches, self._count = self._batches, [], 0
        failed = self._failed
        for topic, records, acks, report in batches:
            if not failed:
                release_all(acks)
                continue
            for record, ack in zip(records, acks, strict=True):
                errors = failed.get((topic, record[0], record[1]))
                if errors:
                    report(record, ack, KafkaException(errors.pop()))
                else:
                    ack.release()
        failed.clear()

    def __len__(self) -> int:
        return self._count


class KafkaWriter:
    """Produces one topic's records through the worker's producer."""

    def __init__(
        self, producer: Producer, window: DeliveryWindow, topic: str, report: FailureReport
    ) -> None:
        self.producer = producer
        self.window = window
        self.topic = topic
        self.report = report

    def write(self, records: list[OutRecord], acks: list[Ack]) -> None:
        produce, topic = self.producer.produce, self.topic
        refused: set[int] = set()
        for index, (key, value, headers, _source) in enumerate(records):
            # The producer takes header lists only, and a keyword argument costs a
            # dict per call: pass headers only when there are any.
            header_list: Any = list(headers) if headers else None
            while True:
                try:
                    if header_list is None:
                        produce(topic, value, key)
                    else:
                        produce(topic, value, key, headers=header_list)
                    break
                except BufferError:
                    # The local queue is full: let the producer send, then retry.
                    self.producer.poll(BACKPRESSURE_POLL_S)
                except KafkaException as exc:
                    # Refused before sending (e.g. larger than message.max.bytes).
                    if exc.args[0].fatal():
                        raise
                    self.report(records[index], acks[index], exc)
                    refused.add(index)
                    break
        if refused:
            records = [r for i, r in enumerate(records) if i not in refused]
            acks = [a for i, a in enumerate(acks) if i not in refused]
        self.window.add(topic, records, acks, self.report)
        self.window.confirm()

    def poll(self) -> None:
        self.window.settle()

    def flush(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.window):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.window.settle(force=True, timeout_s=remaining)

    def close(self) -> None:
        self.flush(CLOSE_FLUSH_TIMEOUT_S)
        if len(self.window):
            logger.warning(
                "%d records to %s were not confirmed before close", len(self.window), self.topic
            )


class KafkaTransport:
    """Builds per-worker Kafka readers and writers from :class:`KafkaSettings`."""

    def __init__(self, settings: KafkaSettings) -> None:
        if not settings.bootstrap_servers:
            raise ConfigPathError(
                [([("kafka", "bootstrap_servers")], "required: the Kafka brokers, host:port[,...]")]
            )
        if not settings.group_id:
            # No fallback name: a group shared by unrelated services would mix
            # their committed offsets (and split their partitions).
            raise ConfigPathError(
                [
                    (
                        [("kafka", "group_id")],
                        "required: the consumer group that holds this flow's committed "
                        "offsets, one per service",
                    )
                ]
            )
        self.settings = settings
        self.delivery = settings.delivery
        if self.delivery.auto_commit:
            logger.warning(
                "at-most-once delivery: librdkafka auto-commits offsets whether or not "
                "their records were processed (%s)",
                self.delivery.reason,
            )
        _check_client_settings(consumer=self._consumer_config(), producer=self._producer_config())
        self._windows: dict[int, DeliveryWindow] = {}
        """Per worker: its producer and the records awaiting confirmation."""
        self._partitions: dict[str, int] = {}

    # -- start-up ---------------------------------------------------------

    def preflight(
        self,
        source: str,
        sinks: Sequence[str],
        stopping: threading.Event,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        """Check the cluster has ``source`` and ``sinks`` before any worker starts.

        Fails with one clear :class:`KafkaStartupError` for an unreachable
        cluster or missing topics (creating them instead when
        ``create_topics`` is on, for local development). Returns early once
        ``stopping`` is set.
        """
        admin = _admin(self.settings)
        metadata = self._metadata(admin, stopping, timeout_s)
        if metadata is None:
            return
        needed = [source, *sinks]
        missing = [topic for topic in dict.fromkeys(needed) if topic not in metadata.topics]
        if missing and self.settings.create_topics:
            self._create(admin, missing, timeout_s)
            metadata = admin.list_topics(timeout=timeout_s)
            missing = [topic for topic in missing if topic not in metadata.topics]
        if missing:
            raise KafkaStartupError(
                f"topics missing on {self.settings.bootstrap_servers}: {', '.join(missing)} "
                "(create them, or set LOOM_KAFKA__CREATE_TOPICS=true for local development)"
            )
        for topic in dict.fromkeys(needed):
            self._partitions[topic] = len(metadata.topics[topic].partitions)
        if self._partitions[source] == 0:
            raise KafkaStartupError(f"topic {source} has no partitions to read")

    def _metadata(
        self, admin: AdminClient, stopping: threading.Event, timeout_s: float
    ) -> ClusterMetadata | None:
        """The cluster's metadata, asked in short rounds so a stop is seen promptly.

        ``None`` when ``stopping`` was set first. A blocking call of the full
        time-out would hold off a SIGTERM until it returns (the handler runs
        between Python bytecodes, not inside librdkafka).
        """
        deadline = time.monotonic() + timeout_s
        while not stopping.is_set():
            remaining = deadline - time.monotonic()
            try:
                return admin.list_topics(timeout=max(0.01, min(METADATA_ROUND_S, remaining)))
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise KafkaStartupError(
                        f"cannot reach Kafka at {self.settings.bootstrap_servers} within "
                        f"{timeout_s:g} s ({exc.args[0].str() if exc.args else exc})"
                    ) from None
        return None

    def _create(self, admin: AdminClient, topics: list[str], timeout_s: float) -> None:
        logger.warning("creating missing topics for local development: %s", ", ".join(topics))
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=-1) for topic in topics], request_timeout=timeout_s
        )
        for topic, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaStartupError(f"cannot create topic {topic}: {exc}") from None

    def partition_count(self, topic: str) -> int:
        """Partitions of ``topic`` (looked up once, then cached)."""
        if topic not in self._partitions:
            admin = _admin(self.settings)
            metadata = admin.list_topics(timeout=10)
            if topic not in metadata.topics:
                raise KafkaStartupError(f"topic {topic} does not exist")
            self._partitions[topic] = len(metadata.topics[topic].partitions)
        return self._partitions[topic]

    # -- per worker -------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        settings = self.settings
        return {
            **CONSUMER_DEFAULTS,
            **settings.consumer,  # adds to Loom's defaults; cannot change the commit mode
            "group.id": settings.group_id,
            "enable.auto.commit": self.delivery.auto_commit,
            **settings.client_config(),
        }

    def _producer_config(self) -> dict[str, Any]:
        return {**PRODUCER_DEFAULTS, **self.settings.producer, **self.settings.client_config()}

    def reader(self, topic: str, worker_index: int, worker_count: int) -> KafkaReader:
        config = self._consumer_config()
        partitions = [
            p for p in range(self.partition_count(topic)) if p % worker_count == worker_index
        ]
        if not partitions:
            logger.warning(
                "worker %d of %d has no partition of %s to read (the topic has fewer "
                "partitions than workers)",
                worker_index,
                worker_count,
                topic,
            )
        return KafkaReader(
            Consumer(config),
            topic,
            partitions,
        )

    def writer(self, topic: str, worker_index: int, report: FailureReport) -> KafkaWriter:
        window = self._windows.get(worker_index)
        if window is None:
            window = self._windows[worker_index] = DeliveryWindow(self._producer_config())
        return KafkaWriter(window.producer, window, topic, report)
