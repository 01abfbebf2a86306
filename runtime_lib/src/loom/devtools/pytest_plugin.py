"""Pytest plugin of ``loom-runtime[dev]``: a service's integration-test plumbing.

Registered as the ``pytest11`` entry point ``loom``, so a service that installs
``loom-runtime[dev]`` gets these fixtures without a conftest (``-p no:loom``
turns it off):

- ``loom_broker`` (session): a :class:`~loom.devtools.broker.DevBroker`.
- ``loom_topics`` (session): ``loom_topics("input", "output", partitions=2)``
  creates fresh topics on the broker and returns ``{logical: physical}``.
- ``loom_service`` (session): a :class:`ServiceRunner` that builds a service's
  environment (``environment(topics, **settings)``), starts ``python -m
  <package>`` and waits for ``/healthz`` (``start``), or runs it to its exit
  (``run``); every process still running at the end of the session is killed.

And helpers: :func:`free_port`, :func:`wait_for` (poll with a deadline, fail
naming what was awaited), :func:`produce`, :func:`read_topic`,
:func:`committed_offset` and :func:`http_get`.

Kafka clients and the broker are imported when a fixture or helper is used,
so the plugin costs nothing to a test run that needs none of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from loom.devtools.broker import free_port as free_port  # noqa: PLC0414 (re-export)

if TYPE_CHECKING:
    from confluent_kafka import Message

    from loom.devtools.broker import DevBroker

__all__ = [
    "ServiceProcess",
    "ServiceRunner",
    "committed_offset",
    "free_port",
    "http_get",
    "produce",
    "read_topic",
    "wait_for",
]

POLL_INTERVAL_S = 0.05


def wait_for(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    *,
    details: Callable[[], str] | None = None,
) -> None:
    """Poll until ``predicate()`` holds; fail naming ``what`` after ``timeout_s``.

    ``details`` (for example a service's log) is called only on failure and
    appended to the message.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            message = f"timed out after {timeout_s:g} s waiting for {what}"
            if details is not None:
                message += f"\n{details()}"
            raise AssertionError(message)
        time.sleep(POLL_INTERVAL_S)


def http_get(url: str, *, timeout_s: float = 2.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; ``(0, "")`` when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def produce(
    bootstrap_servers: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None]],
    *,
    timeout_s: float = 30.0,
) -> None:
    """Write ``(key, value)`` records to ``topic`` and wait until all are acknowledged."""
    from confluent_kafka import Producer  # noqa: PLC0415

    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, value, key)
    unsent = producer.flush(timeout_s)
    if unsent:
        raise AssertionError(f"{unsent} records to {topic} still unsent after {timeout_s:g} s")


def _partitions(consumer: Any, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=10)
    return sorted(metadata.topics[topic].partitions)


def read_topic(
    bootstrap_servers: str, topic: str, expected: int, *, timeout_s: float = 60.0
) -> list[Message]:
    """Read ``topic`` from the start of every partition until ``expected`` records arrived.

    Returns what arrived by the deadline (possibly fewer: assert on the length),
    without committing anything.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"loom-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    records: list[Message] = []
    try:
        partitions = _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            records += [m for m in consumer.consume(1000, timeout=0.2) if m.error() is None]
    finally:
        consumer.close()
    return records


def committed_offset(bootstrap_servers: str, group: str, topic: str) -> int:
    """The sum over ``topic``'s partitions of ``group``'s committed offsets (none: 0)."""
    from confluent_kafka import Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group})
    try:
        partitions = _partitions(consumer, topic)
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        consumer.close()
    return sum(tp.offset for tp in found if tp.offset >= 0)


class ServiceProcess:
    """A service started by :meth:`ServiceRunner.start`, serving on ``port``."""

    def __init__(self, process: subprocess.Popen[bytes], log: IO[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self._log = log

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: ``/healthz``, ``/readyz``, ``/metrics``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def metrics(self) -> str:
        """The ``/metrics`` page (fails unless it answers 200)."""
        status, body = http_get(f"{self.url}/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}\n{self.log()}")
        return body

    def stop(self, sig: signal.Signals = signal.SIGTERM, *, timeout_s: float = 30.0) -> int:
        """Send ``sig`` and return the exit code (fail with the log if it does not exit)."""
        if self.running:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the service did not exit within {timeout_s:g} s of {sig.name}\n{self.log()}"
            ) from None

    def kill(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()


class ServiceRunner:
    """Runs a service package as a process against ``broker``."""

    def __init__(self, broker: DevBroker, logs: Path) -> None:
        self.broker = broker
        self.logs = logs
        self._started: list[ServiceProcess] = []

    def environment(self, topics: Mapping[str, str], **settings: str) -> dict[str, str]:
        """This process's environment without ``LOOM_*``/``OTEL_*``, plus the broker,
        ``LOOM_TOPICS__<LOGICAL>`` per topic, INFO logs, no trace export, and
        ``settings`` (``LOOM_RUNTIME__ASYNC_BACKEND="trio"``, ...)."""
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("LOOM_", "OTEL_"))
        }
        return {
            **inherited,
            "LOOM_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            **{f"LOOM_TOPICS__{logical.upper()}": name for logical, name in topics.items()},
            "LOOM_LOG_LEVEL": "INFO",
            "OTEL_TRACES_EXPORTER": "none",
            **settings,
        }

    def start(
        self, package: str, env: Mapping[str, str], *, ready_timeout_s: float = 30.0
    ) -> ServiceProcess:
        """``python -m <package>`` with ``env``, once ``/healthz`` answers 200.

        The metrics port is ``LOOM_OBSERVABILITY__PROMETHEUS_PORT`` from ``env``,
        or a free one. Fails with the log if the process exits first.
        """
        env = dict(env)
        port = int(env.setdefault("LOOM_OBSERVABILITY__PROMETHEUS_PORT", str(free_port())))
        log = (self.logs / f"{package}-{uuid.uuid4().hex[:8]}.log").open("w+b")
        process = subprocess.Popen([sys.executable, "-m", package], env=env, stdout=log, stderr=log)
        service = ServiceProcess(process, log, port)
        self._started.append(service)

        def serving() -> bool:
            return not service.running or http_get(f"{service.url}/healthz")[0] == 200

        wait_for(serving, ready_timeout_s, f"{package}'s /healthz", details=service.log)
        if not service.running:
            raise AssertionError(f"{package} exited {service.returncode} at start\n{service.log()}")
        return service

    def run(
        self, package: str, env: Mapping[str, str], *, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``python -m <package>`` with ``env`` to its exit (for start-up failures)."""
        return subprocess.run(
            [sys.executable, "-m", package],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def close(self) -> None:
        """Kill what still runs and close the logs."""
        for service in self._started:
            service.kill()
            service._log.close()
        self._started.clear()


@pytest.fixture(scope="session")
def loom_broker() -> Iterator[DevBroker]:
    """One in-memory Kafka-protocol broker for the session (Loom's dev broker)."""
    from loom.devtools.broker import DevBroker  # noqa: PLC0415

    with DevBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def loom_topics(loom_broker: DevBroker) -> Callable[..., dict[str, str]]:
    """Factory: ``loom_topics(*logical, partitions=2, prefix="test")`` creates one
    fresh topic per logical name and returns ``{logical: physical}``."""

    def create(*logical: str, partitions: int = 2, prefix: str = "test") -> dict[str, str]:
        suffix = uuid.uuid4().hex[:8]
        names = {name: f"{prefix}.{name}.{suffix}" for name in logical}
        loom_broker.create_topics(dict.fromkeys(names.values(), partitions))
        return names

    return create


@pytest.fixture(scope="session")
def loom_service(
    loom_broker: DevBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceRunner]:
    """Starts services as processes against ``loom_broker`` (see :class:`ServiceRunner`)."""
    runner = ServiceRunner(loom_broker, tmp_path_factory.mktemp("loom-services"))
    yield runner
    runner.close()
