"""Helpers for tests against the real (Tansu) broker: topics, records, runs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from loom.streaming.bytewax.runner import StreamingRunner


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Cluster:
    """The test broker, seen through plain confluent-kafka clients."""

    bootstrap: str
    admin: AdminClient = field(init=False)

    def __post_init__(self) -> None:
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})

    def topic(self, partitions: int = 1, prefix: str = "t") -> str:
        """Create a fresh, uniquely named topic."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.admin.create_topics([NewTopic(name, partitions)])[name].result()
        return name

    def flow_config(
        self,
        topics: dict[str, str],
        *,
        kafka: dict[str, Any] | None = None,
        runtime: dict[str, Any] | None = None,
        observability: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A runner config for ``topics`` on this broker: a fresh group, tracked commits."""
        return {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": f"g-{uuid.uuid4().hex[:8]}",
                "consumer": {"enable.auto.commit": False, "auto.commit.interval.ms": 100},
                **(kafka or {}),
            },
            "topics": topics,
            "streaming": {"runtime": runtime or {}},
            "observability": observability or {},
        }

    def produce(
        self,
        topic: str,
        values: Iterable[bytes | None],
        *,
        keys: Iterable[bytes | None] | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> int:
        """Produce ``values``; ``timestamp_ms`` gives them one Kafka timestamp (event time)."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        count = 0
        key_list = list(keys) if keys is not None else None
        for index, value in enumerate(values):
            key = key_list[index] if key_list is not None else None
            kwargs: dict[str, Any] = {"headers": headers} if headers else {}
            if partition is not None:
                kwargs["partition"] = partition
            if timestamp_ms is not None:
                kwargs["timestamp"] = timestamp_ms
            while True:
                try:
                    producer.produce(topic, value, key, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.05)
            count += 1
        assert producer.flush(30) == 0
        return count

    def read(self, topic: str, expected: int, *, timeout_s: float = 30.0) -> list[Message]:
        """Read ``topic`` from the beginning until ``expected`` records arrived."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        partitions = self.admin.list_topics(timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Message] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(records) < expected and time.monotonic() < deadline:
                records += [m for m in consumer.consume(10_000, timeout=0.2) if not m.error()]
            while True:  # then whatever else is already there
                more = [m for m in consumer.consume(10_000, timeout=0.3) if not m.error()]
                if not more:
                    break
                records += more
        finally:
            consumer.close()
        return records

    def end_offsets(self, topic: str, total: int) -> dict[int, int]:
        """Log end per partition of a topic holding ``total`` records.

        Counted by reading: Tansu's ListOffsets is wrong for batched produce.
        """
        ends: dict[int, int] = {}
        for record in self.read(topic, total):
            ends[record.partition()] = max(ends.get(record.partition(), 0), record.offset() + 1)
        return ends

    def committed(self, group: str, topic: str) -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            partitions = self.admin.list_topics(timeout=10).topics[topic].partitions
            found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        finally:
            consumer.close()
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


class TopicTail:
    """Follows a topic from the beginning, collecting every record as it arrives."""

    def __init__(self, cluster: Cluster, topic: str) -> None:
        self.topic = topic
        self.records: list[Message] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": cluster.bootstrap,
                "group.id": f"tail-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        partitions = cluster.admin.list_topics(timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def poll(self) -> list[Message]:
        """Everything read so far, after taking what has arrived since the last call."""
        self.records += [m for m in self._consumer.consume(10_000, timeout=0.1) if not m.error()]
        return self.records

    def close(self) -> None:
        self._consumer.close()


class BackgroundRun:
    """``runner.run()`` on a thread, stoppable like a SIGTERM'd service."""

    def __init__(self, runner: StreamingRunner) -> None:
        self.runner = runner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="loom-run", daemon=True)

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> BackgroundRun:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.runner.request_stop()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise AssertionError(f"the run did not stop within {timeout_s:g} s")
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc_info: object) -> None:
        if self.thread.is_alive():
            self.stop()
