"""Loom's pytest plugin (``loom.devtools.pytest_plugin``), as a service's tests use it.

The helpers and the service runner run here against the kit's session broker
and ``tests.kafka.service_app`` (a service like a generated one); what only a
pytest run shows (the entry point loads the fixtures, a session kills what it
left running) runs in a small suite in a child pytest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from loom.devtools.broker import DevBroker
from loom.devtools.pytest_plugin import (
    ServiceRunner,
    committed_offset,
    free_port,
    http_get,
    produce,
    read_topic,
    wait_for,
)
from tests.template.support import REPO

APP = "tests.kafka.service_app"
ORDERS = [(f"k{i}".encode(), json.dumps({"id": f"o{i}", "amount": i}).encode()) for i in range(10)]


def topics(broker: DevBroker, *logical: str, partitions: int = 2) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    names = {name: f"plugin.{name}.{suffix}" for name in logical}
    broker.create_topics(dict.fromkeys(names.values(), partitions))
    return names


@pytest.fixture
def runner(broker: DevBroker, tmp_path: Path) -> ServiceRunner:
    return ServiceRunner(broker, tmp_path)


def app_env(runner: ServiceRunner, names: dict[str, str]) -> dict[str, str]:
    return runner.environment(
        names, LOOM_KAFKA__GROUP_ID=f"g-{uuid.uuid4().hex[:8]}", PYTHONPATH=str(REPO)
    )


def child_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LOOM_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_wait_for_fails_after_its_deadline_naming_what_it_waited_for() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2 s waiting for the moon\nlog"):
        wait_for(lambda: False, 0.2, "the moon", details=lambda: "log")
    assert time.monotonic() - started >= 0.2


def test_wait_for_returns_as_soon_as_the_predicate_holds() -> None:
    calls = iter([False, False, True])
    wait_for(lambda: next(calls), 10, "the third call")


def test_http_get_answers_0_when_nothing_listens() -> None:
    assert http_get(f"http://127.0.0.1:{free_port()}/healthz") == (0, "")


def test_produce_then_read_topic_round_trips_every_partition(broker: DevBroker) -> None:
    names = topics(broker, "input", partitions=3)
    produce(broker.bootstrap_servers, names["input"], ORDERS)
    found = read_topic(broker.bootstrap_servers, names["input"], len(ORDERS), timeout_s=30)
    assert sorted((m.key(), m.value()) for m in found) == sorted(ORDERS)
    assert {m.partition() for m in found} <= {0, 1, 2}


def test_read_topic_returns_what_arrived_by_its_deadline(broker: DevBroker) -> None:
    names = topics(broker, "input")
    produce(broker.bootstrap_servers, names["input"], ORDERS[:2])
    assert len(read_topic(broker.bootstrap_servers, names["input"], 5, timeout_s=1)) == 2


def test_the_environment_keeps_no_loom_or_otel_variables_of_the_caller(
    runner: ServiceRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_KAFKA__GROUP_ID", "leaked")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "leaked")
    env = runner.environment({"input": "a.b"}, LOOM_RUNTIME__ASYNC_BACKEND="trio")
    assert "LOOM_KAFKA__GROUP_ID" not in env
    assert "OTEL_SERVICE_NAME" not in env
    assert env["LOOM_TOPICS__INPUT"] == "a.b"
    assert env["LOOM_KAFKA__BOOTSTRAP_SERVERS"] == runner.broker.bootstrap_servers
    assert env["LOOM_RUNTIME__ASYNC_BACKEND"] == "trio"
    assert env["OTEL_TRACES_EXPORTER"] == "none"


def test_a_started_service_serves_processes_and_exits_0_on_sigterm_with_offsets_committed(
    broker: DevBroker, runner: ServiceRunner
) -> None:
    names = topics(broker, "input", "output", "dlq")
    produce(broker.bootstrap_servers, names["input"], ORDERS)
    env = app_env(runner, names)
    service = runner.start(APP, env)
    assert http_get(f"{service.url}/healthz")[0] == 200
    found = read_topic(broker.bootstrap_servers, names["output"], len(ORDERS))
    assert len(found) == len(ORDERS), service.log()
    assert "loom_records_consumed_total" in service.metrics()
    assert service.stop(signal.SIGTERM) == 0, service.log()
    group = env["LOOM_KAFKA__GROUP_ID"]
    assert committed_offset(broker.bootstrap_servers, group, names["input"]) == len(ORDERS)
    assert "starting with at-least-once delivery" in service.log()


def test_start_fails_with_the_exit_code_and_log_of_a_service_that_exits_at_start(
    broker: DevBroker, runner: ServiceRunner
) -> None:
    env = app_env(runner, topics(broker, "input", "output", "dlq"))
    env["LOOM_RUNTIME__WORKERS_PER_PROCESS"] = "zero"
    with pytest.raises(AssertionError, match=r"exited 2 at start\n(.|\n)*WORKERS_PER_PROCESS"):
        runner.start(APP, env)


def test_run_returns_the_exit_code_and_output_of_a_service(
    broker: DevBroker, runner: ServiceRunner
) -> None:
    env = app_env(runner, topics(broker, "input", "output", "dlq"))
    env["LOOM_RUNTIME__WORKERS_PER_PROCESS"] = "zero"
    done = runner.run(APP, env)
    assert done.returncode == 2
    assert "LOOM_RUNTIME__WORKERS_PER_PROCESS" in done.stderr


def test_the_entry_point_gives_a_pytest_run_the_fixtures(tmp_path: Path) -> None:
    listed = child_pytest(tmp_path, "--fixtures")
    for fixture in ("loom_broker", "loom_topics", "loom_service"):
        assert fixture in listed.stdout, listed.stdout
    assert "loom_broker" not in child_pytest(tmp_path, "--fixtures", "-p", "no:loom").stdout


def test_a_session_ends_with_its_services_killed_and_its_fixtures_work(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    (tmp_path / "test_left_running.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path

            from loom.devtools.pytest_plugin import produce, read_topic


            def test_left_running(loom_broker, loom_topics, loom_service):
                names = loom_topics("input", "output", "dlq", partitions=1, prefix="child")
                produce(loom_broker.bootstrap_servers, names["input"], [(b"k", b"{{}}")])
                env = loom_service.environment(names, LOOM_KAFKA__GROUP_ID="child")
                service = loom_service.start({APP!r}, env)
                assert len(read_topic(loom_broker.bootstrap_servers, names["dlq"], 1)) == 1
                Path({str(pid_file)!r}).write_text(str(service.process.pid))
            """
        ),
        encoding="utf-8",
    )
    done = child_pytest(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    pid = int(pid_file.read_text(encoding="utf-8"))

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, 10, f"service process {pid} to be gone")
