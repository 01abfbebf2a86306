"""The alert rules generated with a service, checked by Prometheus' own tool:
``promtool check rules`` accepts them, the generated ``alerts.test.yml``
passes ``promtool test rules`` (and fails when an alert no longer fires), the
PrometheusRule carries the same groups, every expression uses metrics the
runtime exposes, and every alert links to a runbook section that says what
to do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loom.observability.metrics import FlowMetrics, new_registry
from tests.template.prometheus_tools import github_anchor, prometheus_binary
from tests.template.support import render, run

SERVICE = "orders-enricher"
RUNBOOK_SECTIONS = (
    "Consumer lag growing",
    "Dead letters growing",
    "Commits stalled",
    "Crash loop",
    "Not ready",
    "Cluster peer lost",
    "Partitions added",
    "Scaling replicas",
)


@pytest.fixture(scope="module")
def service(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("alerts") / SERVICE
    return render(template_repo, destination, {"loom_runtime_source": "path", "team": "payments"})


def rules(service: Path) -> list[dict[str, Any]]:
    document = yaml.safe_load((service / "observability/alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules(service: Path) -> None:
    promtool = prometheus_binary("promtool")
    done = run([promtool, "check", "rules", "observability/alerts.yml"], cwd=service)
    assert f"SUCCESS: {len(rules(service))} rules found" in done.stdout


def test_the_generated_rule_tests_pass(service: Path) -> None:
    promtool = prometheus_binary("promtool")
    done = run([promtool, "test", "rules", "observability/alerts.test.yml"], cwd=service)
    assert "SUCCESS" in done.stdout


def test_the_rule_tests_fail_when_an_alert_stops_firing(service: Path, tmp_path: Path) -> None:
    promtool = prometheus_binary("promtool")
    alerts = (service / "observability/alerts.yml").read_text(encoding="utf-8")
    raised = alerts.replace("[5m])) > 0.1", "[5m])) > 10")
    assert raised != alerts
    (tmp_path / "alerts.yml").write_text(raised, encoding="utf-8")
    (tmp_path / "alerts.test.yml").write_bytes(
        (service / "observability/alerts.test.yml").read_bytes()
    )
    done = run([promtool, "test", "rules", "alerts.test.yml"], cwd=tmp_path, check=False)
    assert done.returncode == 1
    assert "alertname: LoomDeadLettersHigh" in done.stdout + done.stderr


def test_every_alert_is_unit_tested(service: Path) -> None:
    tests = yaml.safe_load((service / "observability/alerts.test.yml").read_text("utf-8"))
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == {rule["alert"] for rule in rules(service)}


def test_the_prometheus_rule_is_the_rule_file_as_a_custom_resource(
    service: Path, tmp_path: Path
) -> None:
    resource = yaml.safe_load((service / "k8s/prometheusrule.yaml").read_text(encoding="utf-8"))
    alerts = yaml.safe_load((service / "observability/alerts.yml").read_text(encoding="utf-8"))
    # kubernetes-validate has no schema for this CRD: its shape, then its rules by promtool.
    assert (resource["apiVersion"], resource["kind"]) == (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    )
    assert resource["metadata"]["name"] == SERVICE
    assert resource["metadata"]["labels"]["app.kubernetes.io/name"] == SERVICE
    assert resource["spec"] == {"groups": alerts["groups"]}
    (tmp_path / "spec.yml").write_text(yaml.safe_dump(resource["spec"]), encoding="utf-8")
    run([prometheus_binary("promtool"), "check", "rules", "spec.yml"], cwd=tmp_path)


def runtime_metric_names() -> set[str]:
    """Every sample name a service's /metrics can have (Loom's and the process collector's)."""
    registry = new_registry()
    metrics = FlowMetrics(registry)
    metrics.consumed.labels("f", "t").inc()
    metrics.dead_lettered.labels("f", "t", "WIRE", "n").inc()
    metrics.committed.labels("f", "t", "0").set(1)
    metrics.lag.labels("f", "t", "0").set(1)
    metrics.ready.labels("f").set(1)
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {sample.name for family in families for sample in family.samples}


def test_the_rules_select_metrics_the_runtime_exposes_by_the_service_job(service: Path) -> None:
    exposed = runtime_metric_names()
    for rule in rules(service):
        used = set(re.findall(r"\b((?:loom|process)_[a-z_]+)\{", rule["expr"]))
        assert used <= exposed, f"{rule['alert']}: {used - exposed} not exposed by the runtime"
        for name in used:
            assert re.search(rf'\b{name}\{{job="{SERVICE}"\}}', rule["expr"]), rule["alert"]


def test_every_alert_says_what_it_is_and_links_to_its_runbook_section(service: Path) -> None:
    runbook = (service / "docs/runbook.md").read_text(encoding="utf-8")
    anchors = {github_anchor(line[3:]) for line in runbook.splitlines() if line.startswith("## ")}
    url = f"https://git.example.com/payments/{SERVICE}/blob/main/docs/runbook.md#"
    for rule in rules(service):
        assert rule["labels"] == {
            "severity": rule["labels"]["severity"],
            "service": SERVICE,
            "team": "payments",
        }
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        link = rule["annotations"]["runbook_url"]
        assert link.startswith(url), link
        assert link.removeprefix(url) in anchors, f"{rule['alert']}: no section {link}"


def test_the_runbook_gives_each_situation_its_signal_and_commands(service: Path) -> None:
    runbook = (service / "docs/runbook.md").read_text(encoding="utf-8")
    parts = re.split(r"^## ", runbook, flags=re.M)[1:]
    sections = {part.split("\n", 1)[0]: part for part in parts}
    assert tuple(sections) == RUNBOOK_SECTIONS
    for title, text in sections.items():
        assert "**Signal" in text, title
        assert "```bash\n" in text, title
    assert (
        "kubectl delete pod -l app.kubernetes.io/name=orders-enricher"
        in sections["Cluster peer lost"]
    )
    assert "kubectl rollout restart statefulset/orders-enricher" in sections["Partitions added"]
