"""A real Prometheus (the Debian package) scrapes a live generated service.

The template is rendered and ``python -m orders_enricher`` runs from its
``src/`` on the kit's runtime against the dev broker, with its metrics port.
Prometheus runs with a generated configuration (1 s scrape and evaluation)
and the service's own ``observability/alerts.yml``, only the ``for:``
durations cut to 0 s: the expressions and thresholds are the generated ones.
Everything is checked through Prometheus' HTTP API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from loom.devtools.broker import DevBroker, free_port
from loom.devtools.pytest_plugin import http_get
from loom.devtools.pytest_plugin import produce as produce_records
from tests.containers.support import wait_for
from tests.template.prometheus_tools import prometheus_binary
from tests.template.support import render

SERVICE = "orders-enricher"
PACKAGE = "orders_enricher"


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """``values`` keyed ``k-0``, ``k-1``, ... (spread over the partitions)."""
    produce_records(
        bootstrap, topic, [(f"k-{i}".encode(), value) for i, value in enumerate(values)]
    )


@dataclass
class Stack:
    broker: DevBroker
    topics: dict[str, str]
    prometheus_url: str

    def query(self, expression: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        answer = get_json(url)
        return answer["data"]["result"] if answer and answer["status"] == "success" else []

    def last_evaluation(self) -> float:
        """When the rule group was last evaluated (Unix time; 0 before the first)."""
        answer = get_json(f"{self.prometheus_url}/api/v1/rules")
        groups = answer["data"]["groups"] if answer else []
        stamps = [group["lastEvaluation"] for group in groups if group["name"] == SERVICE]
        if not stamps or stamps[0].startswith("0001"):
            return 0.0
        # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
        whole, _, fraction = stamps[0].rstrip("Z").partition(".")
        stamp = f"{whole}.{(fraction or '0')[:6]}+00:00"
        return datetime.fromisoformat(stamp).timestamp()

    def alerts(self) -> list[dict[str, Any]]:
        answer = get_json(f"{self.prometheus_url}/api/v1/alerts")
        return answer["data"]["alerts"] if answer else []


class Process:
    """A child process with its output in a file; stopped by its own handle."""

    def __init__(self, command: list[str | Path], log: Path, **kwargs: Any) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [str(part) for part in command], stdout=out, stderr=subprocess.STDOUT, **kwargs
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]


def fast_rules(alerts: Path, destination: Path) -> Path:
    """The generated rules with every ``for:`` at 0 s (nothing else changed)."""
    document = yaml.safe_load(alerts.read_text(encoding="utf-8"))
    for group in document["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["for"] = "0s"
    destination.write_text(yaml.safe_dump(document), encoding="utf-8")
    return destination


@pytest.fixture(scope="module")
def stack(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = prometheus_binary("prometheus")
    root = tmp_path_factory.mktemp("prometheus-live")
    service = render(template_repo, root / SERVICE, {"loom_runtime_source": "path"})
    suffix = uuid.uuid4().hex[:8]
    topics = {logical: f"{SERVICE}.{logical}.{suffix}" for logical in ("input", "output", "dlq")}
    metrics_port, web_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(fast_rules(service / "observability/alerts.yml", root / "rules.yml"))],
        "scrape_configs": [
            {"job_name": SERVICE, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with DevBroker() as broker:
        broker.create_topics(dict.fromkeys(topics.values(), 2))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "OTEL_"))},
            "PYTHONPATH": str(service / "src"),
            "LOOM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            **{f"LOOM_TOPICS__{name.upper()}": topic for name, topic in topics.items()},
            "LOOM_OBSERVABILITY__PROMETHEUS_PORT": str(metrics_port),
            "LOOM_LOG_LEVEL": "WARNING",
            "OTEL_TRACES_EXPORTER": "none",
        }
        app = Process([sys.executable, "-m", PACKAGE], root / "service.log", env=env, cwd=service)
        server = Process(
            [
                prometheus,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
                "--log.level=warn",
            ],
            root / "prometheus.log",
            cwd=root,
        )
        url = f"http://127.0.0.1:{web_port}"
        try:
            wait_for(
                lambda: not server.alive() or get_json(f"{url}/api/v1/status/buildinfo"),
                30,
                "Prometheus to answer",
            )
            assert server.alive(), f"prometheus exited: {server.output()}"
            wait_for(
                lambda: (
                    not app.alive() or http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200
                ),
                60,
                "the service to be ready",
            )
            assert app.alive(), f"the service exited: {app.output()}"
            yield Stack(broker, topics, url)
        finally:
            app.stop()
            server.stop()


def test_prometheus_scrapes_the_service_as_its_job(stack: Stack) -> None:
    def up() -> list[dict[str, Any]]:
        answer = get_json(f"{stack.prometheus_url}/api/v1/targets") or {"data": {}}
        targets = answer["data"].get("activeTargets", [])
        return [t for t in targets if t["labels"]["job"] == SERVICE and t["health"] == "up"]

    [target] = wait_for(up, 30, "the service's target to be up")
    assert target["lastError"] == ""


def test_the_loom_metrics_are_queryable(stack: Stack) -> None:
    orders = [json.dumps({"id": f"o-{i}", "amount": 10 + i}).encode() for i in range(20)]
    produce(stack.broker.bootstrap_servers, stack.topics["input"], orders)
    expression = (
        f'sum(loom_records_produced_total{{job="{SERVICE}", topic="{stack.topics["output"]}"}})'
    )
    wait_for(
        lambda: [r for r in stack.query(expression) if float(r["value"][1]) >= 20],
        60,
        "Prometheus to see the 20 records produced",
    )
    assert stack.query(f'loom_committed_offset{{job="{SERVICE}"}}')
    assert stack.query(f'process_start_time_seconds{{job="{SERVICE}"}}')


def test_poison_records_fire_the_dead_letter_alert(stack: Stack) -> None:
    bootstrap, source = stack.broker.bootstrap_servers, stack.topics["input"]
    counter = f'loom_records_dead_lettered_total{{job="{SERVICE}", kind="wire"}}'
    # rate() needs a series Prometheus has already scraped: a first poison
    # record makes it, then the burst raises its rate above the threshold.
    produce(bootstrap, source, [b"not json"])
    wait_for(lambda: stack.query(counter), 60, "Prometheus to scrape the dead-letter counter")
    produce(bootstrap, source, [b"not json"] * 300)

    def firing() -> list[dict[str, Any]]:
        return [
            alert
            for alert in stack.alerts()
            if alert["labels"]["alertname"] == "LoomDeadLettersHigh" and alert["state"] == "firing"
        ]

    [alert] = wait_for(firing, 60, "LoomDeadLettersHigh to fire")
    assert alert["labels"]["kind"] == "wire"
    assert alert["annotations"]["runbook_url"].endswith("/docs/runbook.md#dead-letters-growing")


def test_a_service_that_keeps_up_fires_no_other_alert(stack: Stack) -> None:
    orders = [json.dumps({"id": f"h-{i}", "amount": 1 + i}).encode() for i in range(50)]
    produce(stack.broker.bootstrap_servers, stack.topics["input"], orders)
    caught_up = f'sum(loom_consumer_lag{{job="{SERVICE}"}}) == 0'
    wait_for(lambda: stack.query(caught_up), 60, "Prometheus to see the service caught up")
    seen = time.time()
    wait_for(lambda: stack.last_evaluation() > seen, 30, "the rules to be evaluated again")
    firing = {alert["labels"]["alertname"] for alert in stack.alerts()}
    assert firing <= {"LoomDeadLettersHigh"}, firing
