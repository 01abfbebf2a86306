"""The README's demo: generate a service from the template and run it for real.

Generates ``orders-demo`` with ``copier copy`` (runtime from this checkout),
starts the dev broker (Tansu, in memory), sends sample orders plus bad
records, runs ``python -m orders_demo`` configured by environment variables
only, and reports what happened. No Docker needed; under a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from confluent_kafka import Producer

from loom.devtools.broker import DevBroker, free_port

REPO = Path(__file__).resolve().parents[1]
SERVICE, PACKAGE = "orders-demo", "orders_demo"
ORDERS = int(os.environ.get("DEMO_ORDERS", "20000"))
BAD = [b"not json", b'{"id": "o-x"}', b'{"id": "o-y", "amount": -1}']


def metric(text: str, name: str, topic: str | None = None) -> float:
    """Sum of a Prometheus counter's samples (of one topic, if given)."""
    total = 0.0
    for labels, value in re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
        if topic is None or f'topic="{topic}"' in labels:
            total += float(value)
    return total


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""


def main() -> int:
    target = REPO / "build" / "demo" / SERVICE
    shutil.rmtree(target, ignore_errors=True)
    print(f"1. copier copy template -> {target.relative_to(REPO)}")
    rendered = subprocess.run(
        [
            sys.executable,
            "-m",
            "copier",
            "copy",
            "--trust",
            "--defaults",
            "--quiet",
            "--data",
            f"service_name={SERVICE}",
            "--data",
            "loom_runtime_source=path",
            "--data",
            f"loom_runtime_path={REPO / 'runtime_lib'}",
            str(REPO),
            str(target),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if rendered.returncode != 0:
        print(rendered.stdout + rendered.stderr, file=sys.stderr)
        return 1
    topics = {name: f"{SERVICE}.{name}" for name in ("input", "output", "dlq")}
    with DevBroker() as broker:
        print(f"2. dev broker on {broker.bootstrap_servers}; topics {', '.join(topics.values())}")
        broker.create_topics(dict.fromkeys(topics.values(), 3))
        producer = Producer(
            {
                "bootstrap.servers": broker.bootstrap_servers,
                "linger.ms": 5,
                "log.connection.close": False,
            }
        )
        for i in range(ORDERS):
            value = json.dumps({"id": f"o-{i}", "amount": round(i * 1.37, 2)}).encode()
            while True:
                try:
                    producer.produce(topics["input"], value, f"o-{i}".encode())
                    break
                except BufferError:
                    producer.poll(0.05)
        for index, value in enumerate(BAD):
            producer.produce(topics["input"], value, f"bad-{index}".encode())
        producer.flush(30)
        print(f"3. sent {ORDERS} orders and {len(BAD)} bad records")

        port = free_port("127.0.0.1")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "OTEL_"))}
        env |= {
            "PYTHONPATH": str(target / "src"),
            "LOOM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "LOOM_TOPICS__INPUT": topics["input"],
            "LOOM_TOPICS__OUTPUT": topics["output"],
            "LOOM_TOPICS__DLQ": topics["dlq"],
            "LOOM_OBSERVABILITY__PROMETHEUS_PORT": str(port),
            "LOOM_LOG_LEVEL": "WARNING",
        }
        print(f"4. python -m {PACKAGE} (environment variables only)")
        started = time.monotonic()
        service = subprocess.Popen([sys.executable, "-m", PACKAGE], env=env)
        deadline = started + 50
        produced = dead = 0.0
        first_read = None
        try:
            while time.monotonic() < deadline and service.poll() is None:
                text = scrape(port)
                if first_read is None and metric(text, "loom_records_consumed_total") > 0:
                    first_read = time.monotonic()
                produced = metric(text, "loom_records_produced_total", topics["output"])
                dead = metric(text, "loom_records_dead_lettered_total")
                if produced >= ORDERS and dead >= len(BAD):
                    break
                time.sleep(0.05)
            done = time.monotonic()
            elapsed = done - (first_read or started)
            service.send_signal(signal.SIGTERM)
            code = service.wait(timeout=30)
        finally:
            if service.poll() is None:
                service.kill()
    print(
        f"\n   records out:           {int(produced)} to {topics['output']}\n"
        f"   records dead-lettered: {int(dead)} to {topics['dlq']}\n"
        f"   throughput:            {produced / elapsed:,.0f} records/s "
        f"({elapsed:.1f} s from the first record read; start-up "
        f"{(first_read or done) - started:.1f} s)\n"
        f"   exit code after SIGTERM: {code}"
    )
    return 0 if produced >= ORDERS and dead >= len(BAD) and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
