"""Start-up time of a service: process start to ready (partitions assigned, first poll).

Runs a service the way a generated one runs (``python -m <package>``,
configured by ``LOOM_*`` variables only; ``tests/kafka/service_app.py`` is the
same shape as the template's service) against the dev broker, and times the
process from ``exec`` until ``/readyz`` answers 200, which happens when every
worker has built its source and assigned its partitions, right before its
first poll. Median of ``--runs``. Target (DESIGN.md section 8): under 2 s.

    .venv/bin/python bench/startup.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loom.devtools.broker import DevBroker, free_port

ROOT = Path(__file__).resolve().parents[1]


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def one_start(broker: DevBroker, topics: dict[str, str]) -> float:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "OTEL_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "LOOM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "LOOM_KAFKA__GROUP_ID": "startup",
        "LOOM_KAFKA__CONSUMER": '{"enable.auto.commit": false}',
        "LOOM_OBSERVABILITY__PROMETHEUS_PORT": str(port),
        "LOOM_LOG_LEVEL": "WARNING",
        **{f"LOOM_TOPICS__{name.upper()}": topic for name, topic in topics.items()},
    }
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "tests.kafka.service_app"], env=env, cwd=ROOT)
    try:
        deadline = started + 30
        while not ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready")
            time.sleep(0.005)  # polling interval of the measurement
        return time.monotonic() - started
    finally:
        process.terminate()
        process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with DevBroker() as broker:
        topics = {name: f"startup-{name}" for name in ("input", "output", "dlq")}
        broker.create_topics(dict.fromkeys(topics.values(), 3))
        times = []
        for run in range(args.runs):
            elapsed = one_start(broker, topics)
            times.append(elapsed)
            print(f"run {run + 1}: ready after {elapsed:.2f} s")
    median = statistics.median(times)
    verdict = "PASS" if median < 2.0 else "MISS"
    print(
        f"\nmedian start-up {median:.2f} s (min {min(times):.2f}, max {max(times):.2f})  {verdict}"
    )
    print("target: import + compile + build + first poll under 2 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
