"""Run ``tests.kafka.service_app`` as a real process, configured by env vars only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.kafka.support import Cluster, wait_until

ROOT = Path(__file__).resolve().parents[2]


def service_env(
    cluster: Cluster, topics: dict[str, str], group: str, **extra: Any
) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("LOOM_", "OTEL_"))
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "LOOM_KAFKA__BOOTSTRAP_SERVERS": cluster.bootstrap,
            "LOOM_KAFKA__GROUP_ID": group,
            "LOOM_KAFKA__CONSUMER": '{"auto.commit.interval.ms": 200}',
            "LOOM_LOG_LEVEL": "WARNING",
            "LOOM_OBSERVABILITY__PROMETHEUS_PORT": str(free_port()),
            **{f"LOOM_TOPICS__{name.upper()}": topic for name, topic in topics.items()},
            **{key: str(value) for key, value in extra.items()},
        }
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


class ServiceProcess:
    """One service process; stopped with SIGTERM or killed with SIGKILL."""

    def __init__(self, env: dict[str, str], module: str = "tests.kafka.service_app") -> None:
        self.probe_url = f"http://127.0.0.1:{env['LOOM_OBSERVABILITY__PROMETHEUS_PORT']}"
        # Files, not pipes: an unread pipe that fills up would block the service.
        self._stdout = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in __exit__
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            cwd=ROOT,
            stdout=self._stdout,
            stderr=self._stderr,
            text=True,
        )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll /readyz until every worker has its partitions."""
        wait_until(
            lambda: (
                self.process.poll() is not None or http_get(f"{self.probe_url}/readyz")[0] == 200
            ),
            timeout_s,
            "the service to become ready",
        )
        if self.process.poll() is not None:
            raise AssertionError(f"the service exited early: {self.output()[1]}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return self.process.returncode

    def output(self) -> tuple[str, str]:
        """What the process printed so far (stdout, stderr)."""
        self._stdout.seek(0)
        self._stderr.seek(0)
        return self._stdout.read(), self._stderr.read()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._stdout.close()
        self._stderr.close()
