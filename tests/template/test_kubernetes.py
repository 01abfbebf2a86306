"""The Kubernetes manifests and the catalog entry generated with a service.

kubernetes-validate checks every built-in kind (the PodDisruptionBudget and
NetworkPolicy included); it has no schema for the Prometheus Operator's
custom resources, which are checked here by shape (the PrometheusRule's
rules by promtool in test_alerts.py). The service's own
tests/test_deployment.py keeps the files consistent after the team edits
them: it passes as generated, and fails on a grace period shorter than the
shutdown timeout or replicas that differ.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.template.support import applied_manifests, manifest_files, render, run, tool

SERVICE = "orders-enricher"
OPERATOR_KINDS = {"PrometheusRule", "ServiceMonitor"}
"""monitoring.coreos.com/v1 resources: no schema in kubernetes-validate."""
ODD = {
    "service_name": "loyalty-ledger",
    "team": "loyalty",
    "description": 'Projects "loyalty" points & ledgers \\ for <reporting>: #1',
    "input_topic": "prod.loyalty.events.v1",
    "include_k8s": False,
    "loom_runtime_source": "path",
}


@pytest.fixture(scope="module")
def service(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("k8s") / SERVICE
    return render(template_repo, destination, {"loom_runtime_source": "path"})


@pytest.fixture(scope="module")
def odd_service(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("no-k8s") / "loyalty"
    return render(template_repo, destination, ODD)


def documents(service: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every manifest by kind (and by ``kind/name``), with its file."""
    found = {}
    for path in manifest_files(service):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            found[document["kind"]] = (path, document)
            found[f"{document['kind']}/{document['metadata']['name']}"] = (path, document)
    return found


def deployment_tests(service: Path) -> tuple[int, str]:
    """The service's own tests/test_deployment.py, on the kit's runtime."""
    env = {**os.environ, "PYTHONPATH": str(service / "src")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    done = run([*command, "tests/test_deployment.py"], cwd=service, env=env, check=False)
    return done.returncode, done.stdout + done.stderr


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} in {path}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_kubernetes_validate_passes_every_built_in_kind(service: Path, tmp_path: Path) -> None:
    found = documents(service)
    assert {"PodDisruptionBudget", "NetworkPolicy", "StatefulSet"} <= set(found)
    built_in = sorted({path for path, doc in found.values() if doc["kind"] not in OPERATOR_KINDS})
    run([tool("kubernetes-validate"), "--strict", "--quiet", *built_in], cwd=service)
    # And as applied: kustomize renders k8s/ (every manifest, replicas copied in).
    applied = applied_manifests(service, tmp_path / "applied.yaml")
    kinds = {doc["kind"] for doc in yaml.safe_load_all(applied.read_text(encoding="utf-8"))}
    assert kinds == {doc["kind"] for _, doc in found.values()}
    run([tool("kubernetes-validate"), "--quiet", applied], cwd=service)
    # Skipped there on purpose: the operator's kinds, and nothing else.
    operator = {
        doc["kind"] for _, doc in found.values() if doc["apiVersion"].startswith("monitoring.")
    }
    assert operator == OPERATOR_KINDS


def test_the_service_monitor_scrapes_the_metrics_service_as_the_rules_job(service: Path) -> None:
    found = documents(service)
    _, monitor = found["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    _, metrics = found[f"Service/{SERVICE}-metrics"]
    labels = metrics["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in metrics["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The job label Prometheus gives the targets is the one the alert rules select.
    assert labels[monitor["spec"]["jobLabel"]] == SERVICE
    assert f'job="{SERVICE}"' in (service / "observability/alerts.yml").read_text("utf-8")


def pod_env(statefulset: dict[str, Any]) -> dict[str, str]:
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container["env"]}


def applied_statefulset(service: Path, tmp_path: Path) -> dict[str, Any]:
    applied = applied_manifests(service, tmp_path / "applied.yaml")
    [statefulset] = [
        doc
        for doc in yaml.safe_load_all(applied.read_text(encoding="utf-8"))
        if doc["kind"] == "StatefulSet"
    ]
    return statefulset


def test_replicas_are_stated_once_and_kustomize_copies_them_into_the_pods(
    service: Path, tmp_path: Path
) -> None:
    _, written = documents(service)["StatefulSet"]
    assert written["spec"]["replicas"] == 2
    assert not pod_env(written)["LOOM_RUNTIME__REPLICAS"].isdigit()  # no second statement
    assert pod_env(applied_statefulset(service, tmp_path))["LOOM_RUNTIME__REPLICAS"] == "2"
    copy = tmp_path / SERVICE
    run(["cp", "-r", service, copy])
    edit(copy / "k8s/statefulset.yaml", "  replicas: 2\n", "  replicas: 5\n")  # scaling
    assert pod_env(applied_statefulset(copy, tmp_path))["LOOM_RUNTIME__REPLICAS"] == "5"
    code, output = deployment_tests(copy)
    assert code == 0, output


def test_the_budget_and_the_spread_never_keep_the_cluster_from_running(service: Path) -> None:
    found = documents(service)
    budget = found["PodDisruptionBudget"][1]["spec"]
    assert budget["maxUnavailable"] == 1
    assert "minAvailable" not in budget
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pod = found["StatefulSet"][1]["spec"]["template"]["spec"]
    assert {spread["whenUnsatisfiable"] for spread in pod["topologySpreadConstraints"]} == {
        "ScheduleAnyway"
    }


def test_the_deployment_tests_of_the_service_pass_as_generated(service: Path) -> None:
    code, output = deployment_tests(service)
    assert code == 0, output


def test_a_grace_period_within_the_shutdown_timeout_fails_the_deployment_tests(
    service: Path, tmp_path: Path
) -> None:
    copy = tmp_path / SERVICE
    run(["cp", "-r", service, copy])
    edit(
        copy / "k8s/statefulset.yaml",
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: 20",
    )
    code, output = deployment_tests(copy)
    assert code == 1
    assert (
        "FAILED tests/test_deployment.py::test_the_grace_period_outlasts_the_shutdown_timeout"
        in output
    )


def test_a_kustomization_that_no_longer_copies_replicas_fails_the_deployment_tests(
    service: Path, tmp_path: Path
) -> None:
    copy = tmp_path / SERVICE
    run(["cp", "-r", service, copy])
    text = (copy / "k8s/kustomization.yaml").read_text(encoding="utf-8")
    (copy / "k8s/kustomization.yaml").write_text(text.split("replacements:")[0], "utf-8")
    code, output = deployment_tests(copy)
    assert code == 1
    assert "test_each_pod_derives_its_place_in_the_cluster_from_its_name" in output


def test_the_network_policy_missing_the_brokers_port_fails_the_deployment_tests(
    service: Path, tmp_path: Path
) -> None:
    copy = tmp_path / SERVICE
    run(["cp", "-r", service, copy])
    edit(
        copy / "k8s/configmap.yaml",
        "kafka-bootstrap.kafka.svc:9092",
        "kafka-bootstrap.kafka.svc:9093",
    )
    code, output = deployment_tests(copy)
    assert code == 1
    assert "the NetworkPolicy lets no traffic out to ports {9093}" in output


ENTITY_NAME = re.compile(r"^[A-Za-z0-9]+([-_.][A-Za-z0-9]+)*$")
ANNOTATION_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$"
)


def test_the_catalog_entry_is_a_backstage_component_owned_by_the_team(odd_service: Path) -> None:
    # check-jsonschema has no Backstage schema: the fields Backstage's catalog validates.
    entity = yaml.safe_load((odd_service / "catalog-info.yaml").read_text(encoding="utf-8"))
    assert entity["apiVersion"] == "backstage.io/v1alpha1"
    assert entity["kind"] == "Component"
    metadata, spec = entity["metadata"], entity["spec"]
    assert metadata["name"] == ODD["service_name"]
    assert ENTITY_NAME.match(metadata["name"])
    assert len(metadata["name"]) <= 63
    assert metadata["description"] == ODD["description"]
    assert all(ANNOTATION_KEY.match(key) for key in metadata["annotations"]), metadata[
        "annotations"
    ]
    assert all(isinstance(value, str) for value in metadata["annotations"].values())
    assert spec == {"type": "service", "lifecycle": "production", "owner": ODD["team"]}


def test_the_catalog_entry_names_the_topics_and_links_the_runbook(odd_service: Path) -> None:
    entity = yaml.safe_load((odd_service / "catalog-info.yaml").read_text(encoding="utf-8"))
    annotations = entity["metadata"]["annotations"]
    assert annotations["loom/input-topic"] == ODD["input_topic"]
    assert annotations["loom/output-topic"] == "loyalty-ledger.output"
    assert annotations["loom/dlq-topic"] == "loyalty-ledger.dlq"
    links = {link["title"]: link["url"] for link in entity["metadata"]["links"]}
    repository = "https://git.example.com/loyalty/loyalty-ledger"
    assert links["Runbook"] == f"{repository}/blob/main/docs/runbook.md"
    assert links["Grafana dashboard"] == f"{repository}/blob/main/observability/dashboard.json"
    assert links["Alert rules"] == f"{repository}/blob/main/observability/alerts.yml"
    for url in links.values():
        assert (odd_service / url.removeprefix(f"{repository}/blob/main/")).is_file(), url


def test_without_kubernetes_the_runbook_has_no_kubectl(odd_service: Path) -> None:
    assert not (odd_service / "k8s").exists()
    runbook = (odd_service / "docs/runbook.md").read_text(encoding="utf-8")
    assert "kubectl" not in runbook
    assert "k8s/" not in runbook
    assert "docker compose restart loyalty-ledger" in runbook
