"""A freshly generated service, for real in containers: its image is built
offline from a wheelhouse, its own docker-compose.yml runs it (plus
docker-compose.test.yml: host networking on loopback, local stand-ins for the
images no registry serves here), ``up --wait`` waits for its HEALTHCHECK,
records (bad ones included) flow to the output and dead-letter topics,
/metrics answers and is scraped, spans reach the collector, and ``docker
stop`` ends it with exit code 0 and every offset committed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests.containers.conftest import Engine
from tests.containers.support import (
    committed,
    http_get,
    http_json,
    metric,
    port_in_use,
    read_all,
    wait_for,
)
from tests.template.support import render, run, runtime_version, snapshot_template_repo

pytestmark = [pytest.mark.containers, pytest.mark.timeout(900)]

SERVICE = "orders-enricher"  # the defaults: the name comes from the folder
INPUT, OUTPUT, DLQ = (f"{SERVICE}.{logical}" for logical in ("input", "output", "dlq"))
PARTITIONS = 3  # as the compose file's `topics` creates them
KAFKA = "127.0.0.1:9092"  # the EXTERNAL listener, as a user on the host reaches it
METRICS = "http://127.0.0.1:9464"
PROMETHEUS = "http://127.0.0.1:9090"
JAEGER = "http://127.0.0.1:16686"
PORTS = (9092, 29092, 9464, 4318, 16686, 9090)
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Stack:
    engine: Engine
    path: Path
    project: str
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        files = ["-f", "docker-compose.yml", "-f", "docker-compose.test.yml"]
        done = self.engine(
            "compose",
            "-p",
            self.project,
            *files,
            *args,
            cwd=self.path,
            env=self.env,
            timeout=timeout,
            check=check,
        )
        return done.stdout + done.stderr

    def container(self, service: str) -> str:
        return self.compose("ps", "--all", "--quiet", service).strip()

    def inspect(self, target: str, template: str) -> str:
        return self.engine("inspect", "--format", template, target).stdout.strip()

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = time.monotonic() - started


def wheelhouse(service: Path) -> None:
    """Every wheel the image needs, in the service's wheels/ (the offline build)."""
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:"]
    wheels = service / "wheels"
    # The files requirements.lock.txt pins by hash (the image installs it in
    # hash-checking mode) and the service's build backend, for this platform
    # (the image's: Linux x86_64, CPython 3.11), from the index alone (no wheel
    # directories of this machine: their builds have other hashes);
    # loom-runtime is the bundled wheel copier put in wheels/.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    run([*pip, "--dest", wheels, "-r", "requirements.lock.txt"], cwd=service, env=env)
    run([*pip, "--dest", wheels, "hatchling>=1.26,<2"], cwd=service, env=env)


@pytest.fixture(scope="module")
def stack(
    engine: Engine, standin_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    busy = [port for port in PORTS if port_in_use(port)]
    if busy:
        pytest.skip(f"127.0.0.1 ports {busy} are in use; the host-network test stack needs them")
    started = time.monotonic()
    root = tmp_path_factory.mktemp("containers")
    template = snapshot_template_repo(root / "loom", f"v{runtime_version()}")
    service = render(template, root / SERVICE, {})
    wheelhouse(service)
    env = engine.env(
        PIP_NO_INDEX="1",  # the build reaches no index (and no network: BUILD_NETWORK=none)
        KAFKA_IMAGE=standin_images["kafka"],
        JAEGER_IMAGE=standin_images["jaeger"],
        PROMETHEUS_IMAGE=standin_images["prometheus"],
    )
    built = Stack(engine, service, f"loom-containers-{uuid.uuid4().hex[:6]}", env)
    built.timed("render + wheelhouse", started)
    try:
        yield built
    finally:
        built.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


def test_the_image_builds_offline_and_runs_the_service_as_non_root(stack: Stack) -> None:
    started = time.monotonic()
    # --no-cache: every run proves the build needs no network (nor an earlier build).
    stack.compose("build", "--no-cache", SERVICE, timeout=600)
    stack.timed("image build (offline)", started)
    image = f"{SERVICE}:dev"
    assert stack.inspect(image, "{{.Config.User}}") == "10001:10001"
    assert json.loads(stack.inspect(image, "{{json .Config.Entrypoint}}")) == [SERVICE]
    health = json.loads(stack.inspect(image, "{{json .Config.Healthcheck}}"))
    assert "/healthz" in " ".join(health["Test"])
    # Nothing of the build stage in the final image: no sources, no wheelhouse.
    listing = stack.engine("run", "--rm", "--network", "none", "--entrypoint", "ls", image, "/")
    assert "build" not in listing.stdout.split()


def test_the_compose_stack_processes_records_and_stops_cleanly(stack: Stack) -> None:
    try:
        started = time.monotonic()
        # --wait: every service running, and healthy where it has a HEALTHCHECK
        # (the service's own, from its Dockerfile, on /healthz).
        stack.compose("up", "--wait", "--wait-timeout", "180", timeout=300)
        stack.timed("compose up --wait", started)
        check_the_running_stack(stack)
    except AssertionError as error:
        logs = stack.compose("logs", "--no-color", "--tail", "60", check=False)
        raise AssertionError(f"{error}\n--- docker compose logs\n{logs}") from None
    finally:
        print("\ncontainer test timings:")
        for name, seconds in stack.timings.items():
            print(f"  {name:<34} {seconds:6.1f} s")
        print(stack.engine.setup_log)


def check_the_running_stack(stack: Stack) -> None:
    service = stack.container(SERVICE)
    assert stack.inspect(service, "{{.State.Health.Status}}") == "healthy"
    # PID 1 is the service itself, running as the unprivileged user.
    status = stack.engine("exec", service, "cat", "/proc/1/status").stdout
    assert re.search(r"^Uid:\s+10001\s", status, re.M), status
    cmdline = stack.engine("exec", service, "cat", "/proc/1/cmdline").stdout
    assert SERVICE in cmdline.replace("\0", " ")

    started = time.monotonic()
    valid = [
        (f"o-{i}".encode(), json.dumps({"id": f"o-{i}", "amount": i * 10.5}).encode())
        for i in range(20)
    ]
    invalid = [
        (b"bad-1", b"not json"),
        (b"bad-2", b'{"id": "o-x"}'),
        (b"bad-3", b'{"id": "o-y", "amount": -1}'),
    ]
    producer = Producer({"bootstrap.servers": KAFKA, "linger.ms": 5})
    for key, value in valid + invalid:
        # One traced record: its `process` span must reach the collector.
        headers = [("traceparent", TRACEPARENT)] if key == b"o-7" else None
        producer.produce(INPUT, value, key, headers=headers)
    assert producer.flush(30) == 0, "records still unsent after 30 s"
    records = len(valid) + len(invalid)

    outputs = read_all(KAFKA, OUTPUT, PARTITIONS, len(valid))
    letters = read_all(KAFKA, DLQ, PARTITIONS, len(invalid))
    assert len(outputs) == len(valid)
    assert len(letters) == len(invalid)
    by_key = {m.key(): json.loads(m.value() or b"") for m in outputs}
    assert set(by_key) == {key for key, _ in valid}
    assert by_key[b"o-3"] == {"id": "o-3", "amount": 31.5, "amount_cents": 3150, "size": "small"}
    envelopes = [json.loads(m.value() or b"") for m in letters]
    assert sorted(e["kind"] for e in envelopes) == ["business", "wire", "wire"]
    assert {m.key() for m in letters} == {key for key, _ in invalid}
    stack.timed("records through the service", started)

    # /metrics from the host, and as Prometheus (scraping the compose name) sees it.
    status, page = http_get(f"{METRICS}/metrics")
    assert status == 200
    assert metric(page, "loom_records_consumed_total") == records
    assert metric(page, "loom_records_produced_total", topic=OUTPUT) == len(valid)
    assert metric(page, "loom_records_dead_lettered_total") == len(invalid)

    def scraping() -> list[dict[str, str]]:
        answer = http_json(f"{PROMETHEUS}/api/v1/targets")
        targets = answer["data"]["activeTargets"] if answer else []
        return [target for target in targets if target["health"] == "up"]

    targets = wait_for(scraping, 30, "Prometheus to scrape the service")
    assert targets[0]["scrapeUrl"] == f"http://{SERVICE}:9464/metrics"

    def scraped_consumed() -> bool:
        answer = http_json(f"{PROMETHEUS}/api/v1/query?query=loom_records_consumed_total")
        result = answer["data"]["result"] if answer else []
        return bool(result) and float(result[0]["value"][1]) == records

    wait_for(scraped_consumed, 30, "Prometheus to see every consumed record")

    # Everything processed is committed while it runs: no lag left.
    def lag() -> float | None:
        code, text = http_get(f"{METRICS}/metrics")
        return metric(text, "loom_consumer_lag") if code == 200 else None

    wait_for(lambda: lag() == 0, 30, "loom_consumer_lag to reach 0")

    # docker stop: SIGTERM to PID 1, which drains, commits and exits 0 in time.
    started = time.monotonic()
    stack.engine("stop", service, timeout=60)
    stack.timed("docker stop", started)
    assert stack.inspect(service, "{{.State.ExitCode}}") == "0"
    assert stack.inspect(service, "{{.State.OOMKilled}}") == "false"
    output = stack.engine("logs", service)
    logs = output.stdout + output.stderr
    assert "Traceback" not in logs
    assert '"message": "stopped"' in logs

    # Committed offsets are the ends of the input partitions: a restart reads
    # nothing twice. (Ends are counted from the records themselves.)
    ends: dict[int, int] = {}
    for message in read_all(KAFKA, INPUT, PARTITIONS, records):
        ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)
    assert sum(ends.values()) == records
    offsets = committed(KAFKA, SERVICE, INPUT, PARTITIONS)
    assert {p: o for p, o in offsets.items() if p in ends} == ends

    # The traced record's span reached the collector (jaeger:4318 in the stack).
    operations = wait_for(
        lambda: (http_json(f"{JAEGER}/api/services/{SERVICE}/operations") or {}).get("data"),
        30,
        "the service's spans at the trace collector",
    )
    assert f"process {SERVICE}" in operations
