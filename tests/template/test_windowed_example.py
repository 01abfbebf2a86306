"""``example=windowed``: a service whose flow aggregates per key and minute.

Rendered as a team would (every other answer defaulted: the bundled runtime
wheel and its locks), and once without ``k8s/``. Checked: nothing left
unrendered; the state directory (``LOOM_STATE__DIR``) on a volume wherever
the service runs (compose's named volume, created in the image for the
service user; a PersistentVolumeClaim per pod) and documented; the
Kubernetes manifests valid; the README and the runbook saying what the
windows, late records and the state mean. Then the service is installed
from its committed wheel and passes ruff, mypy --strict, ``loom graph
--check`` and its own test suite (the flow on TestRunner; the process on the
dev broker, SIGKILL and restart included; its deployment contract tests).
The default example must render none of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.template.support import (
    ServiceVenv,
    bundled_wheel,
    compose_binary,
    manifest_files,
    render,
    run,
    runtime_version,
    tool,
    unrendered,
)

SERVICE = "payments-totals"
PACKAGE = "payments_totals"
STATE_DIR = f"/var/lib/{SERVICE}/state"
OPERATOR_KINDS = {"PrometheusRule", "ServiceMonitor"}
"""monitoring.coreos.com/v1 resources: no schema in kubernetes-validate."""


@dataclass(frozen=True)
class Service:
    path: Path

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text(encoding="utf-8")

    def yaml(self, relative: str) -> Any:
        return yaml.safe_load(self.read(relative))

    def manifests(self) -> dict[str, dict[str, Any]]:
        return {
            document["kind"]: document
            for path in manifest_files(self.path)
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        }


@pytest.fixture(scope="module")
def windowed(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    destination = tmp_path_factory.mktemp("windowed") / SERVICE
    return Service(render(template_repo, destination, {"example": "windowed"}))


@pytest.fixture(scope="module")
def windowed_without_k8s(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    destination = tmp_path_factory.mktemp("windowed-no-k8s") / SERVICE
    data = {"example": "windowed", "include_k8s": False, "loom_runtime_source": "path"}
    return Service(render(template_repo, destination, data))


@pytest.fixture(scope="module")
def orders(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Service:
    destination = tmp_path_factory.mktemp("orders") / "orders-enricher"
    return Service(render(template_repo, destination, {"loom_runtime_source": "path"}))


# ---------------------------------------------------------------- rendering


def test_nothing_is_left_unrendered(windowed: Service, windowed_without_k8s: Service) -> None:
    assert unrendered(windowed.path) == []
    assert unrendered(windowed_without_k8s.path) == []
    assert not (windowed_without_k8s.path / "k8s").exists()
    [trapezoid] = [line for line in windowed.read("README.md").splitlines() if '[/"' in line]
    assert trapezoid.startswith('    n2[/"WindowAggregate: totals<br/>tumbling 60000 ms')


def test_the_answers_record_the_example_and_the_description_follows_it(
    windowed: Service, orders: Service
) -> None:
    answers = windowed.yaml(".copier-answers.yml")
    assert answers["example"] == "windowed"
    assert answers["description"] == (
        f"Counts and sums amounts per key and minute from {SERVICE}.input into {SERVICE}.output."
    )
    assert "state_dir" not in answers  # computed, follows the template
    assert orders.yaml(".copier-answers.yml")["example"] == "orders"


def test_the_flow_is_a_windowed_aggregation_with_every_error_dead_lettered(
    windowed: Service,
) -> None:
    flow = windowed.read(f"src/{PACKAGE}/flow.py")
    assert 'FromTopic("input", payload=Payment)' in flow
    assert "WindowAggregate(Tumbling(WINDOW_MS), CountAndSum(), grace_ms=GRACE_MS" in flow
    assert 'IntoTopic("output", payload=WindowResult[Totals])' in flow
    assert 'errors=IntoTopic("dlq")' in flow
    tests = windowed.read("tests/test_flow.py")
    assert "timestamp_ms=" in tests
    assert "advance_ms=" in tests
    assert "ErrorKind.LATE" in tests


def test_the_compose_service_keeps_its_state_on_a_named_volume(windowed: Service) -> None:
    run([compose_binary(), "config", "--quiet"], cwd=windowed.path)
    run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=windowed.path,
    )
    compose = windowed.yaml("docker-compose.yml")
    service = compose["services"][SERVICE]
    assert service["environment"]["LOOM_STATE__DIR"] == STATE_DIR
    assert service["volumes"] == [f"state:{STATE_DIR}"]
    assert compose["volumes"] == {"state": None}
    assert service["read_only"] is True  # the state is the only writable place but /tmp


def test_the_image_makes_the_state_directory_for_the_service_user(windowed: Service) -> None:
    run([tool("hadolint"), "--failure-threshold", "info", "Dockerfile"], cwd=windowed.path)
    dockerfile = windowed.read("Dockerfile")
    final = dockerfile[dockerfile.index("AS runtime") :]
    assert f"install -d -o 10001 -g 10001 -m 0750 {STATE_DIR}" in final
    assert final.index(STATE_DIR) < final.index("USER 10001:10001")


def test_the_kubernetes_manifests_validate_and_give_each_pod_a_claim(windowed: Service) -> None:
    files = manifest_files(windowed.path)
    documents = windowed.manifests()
    built_in = sorted(
        path
        for path in files
        if not {doc["kind"] for doc in yaml.safe_load_all(path.read_text("utf-8"))} & OPERATOR_KINDS
    )
    run([tool("kubernetes-validate"), "--strict", "--quiet", *built_in], cwd=windowed.path)
    assert documents["ConfigMap"]["data"]["LOOM_STATE__DIR"] == STATE_DIR
    spec = documents["StatefulSet"]["spec"]
    [claim] = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    # PVCs made from the template carry its labels: the runbook selects them so.
    assert claim["metadata"]["labels"]["app.kubernetes.io/name"] == SERVICE
    [container] = spec["template"]["spec"]["containers"]
    assert {"name": "state", "mountPath": STATE_DIR} in container["volumeMounts"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    # The claim is writable by the service user.
    assert spec["template"]["spec"]["securityContext"]["fsGroup"] == 10001


def test_env_example_documents_the_state_settings(windowed: Service) -> None:
    text = windowed.read(".env.example")
    assert "\nLOOM_STATE__DIR=.state\n" in text
    assert "\n# LOOM_STATE__DURABILITY=durable\n" in text
    assert "\n# LOOM_STATE__SNAPSHOT_INTERVAL_MS=1000\n" in text
    assert "volatile" in text
    assert ".state/" in windowed.read(".gitignore").splitlines()


def test_the_readme_explains_windows_lateness_and_the_guarantee(windowed: Service) -> None:
    readme = windowed.read("README.md")
    for heading in (
        "### The example flow",
        "### Windows and late records",
        "### After a crash: exact results, from the state on a volume",
    ):
        assert f"\n{heading}\n" in readme, heading
    for phrase in (
        "**Results are exact.**",
        "**A whole result may come twice.**",
        "**The state directory must outlive the process**",
        "**Keep the number of workers**",
        "LOOM_STATE__DURABILITY=volatile",
        "dead letter of kind `late`",
    ):
        assert phrase in readme, phrase
    # Every runbook link of the README names a section of the runbook.
    runbook = windowed.read("docs/runbook.md")
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^## (.+)$", runbook, re.M)
    }
    links = set(re.findall(r"\(docs/runbook\.md#([a-z0-9-]+)\)", readme))
    assert links == {"state-lost", "scaling-replicas"}
    assert links <= anchors
    assert {"state-directory-full", "state-lost"} <= anchors


def test_the_runbook_covers_a_full_or_lost_state_and_a_new_worker_count(
    windowed: Service, windowed_without_k8s: Service
) -> None:
    runbook = windowed.read("docs/runbook.md")
    assert f"kubectl delete pvc -l app.kubernetes.io/name={SERVICE}" in runbook
    assert f"kubectl delete statefulset {SERVICE} --cascade=orphan" in runbook
    assert "- `LATE`:" in runbook
    compose_runbook = windowed_without_k8s.read("docs/runbook.md")
    assert "kubectl" not in compose_runbook
    assert "docker compose down -v" in compose_runbook


def deployment_tests(service: Path) -> str:
    """The service's own tests/test_deployment.py, on the kit's runtime."""
    env = {**os.environ, "PYTHONPATH": str(service / "src")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return run([*command, "tests/test_deployment.py"], cwd=service, env=env).stdout


def test_the_deployment_contract_tests_of_the_service_pass(
    windowed: Service, windowed_without_k8s: Service
) -> None:
    output = deployment_tests(windowed.path)
    assert re.search(r"^\d+ passed", output, re.M), output
    assert "passed" in deployment_tests(windowed_without_k8s.path)


def test_the_default_example_keeps_no_state(orders: Service) -> None:
    assert "LOOM_STATE__" not in orders.read(".env.example")
    assert "LOOM_STATE__" not in orders.read("docker-compose.yml")
    assert "volumes:" not in orders.yaml("docker-compose.yml")
    assert "volumeClaimTemplates" not in orders.read("k8s/statefulset.yaml")
    assert "/state" not in orders.read("Dockerfile")
    for text in (orders.read("README.md"), orders.read("docs/runbook.md")):
        assert "LOOM_STATE__" not in text
        assert "WindowAggregate" not in text
    assert "WithAsync(screen" in orders.read("src/orders_enricher/flow.py")


# ---------------------------------------------------------------- the service itself


def test_the_service_installs_and_passes_its_checks_and_its_own_tests(
    windowed: Service, service_venv: ServiceVenv, wheelhouse: Path
) -> None:
    path = windowed.path
    service_venv.pip("uninstall", "--yes", "loom-runtime", *service_venv.installed)
    # The bundled runtime needs no index; the wheelhouse has the build backend.
    service_venv.pip(
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        wheelhouse,
        "-r",
        "requirements-runtime.txt",
        "-e",
        ".[dev]",
        cwd=path,
    )
    service_venv.installed.append(SERVICE)
    script = (
        "import importlib.metadata as m; "
        "print(m.distribution('loom-runtime').read_text('direct_url.json'))"
    )
    origin = json.loads(run([service_venv.python, "-c", script], env=service_venv.env()).stdout)
    wheel = path / "wheels" / bundled_wheel(runtime_version())
    assert origin["archive_info"]["hashes"] == {
        "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()
    }

    service_venv.run("ruff", "check", ".", cwd=path)
    service_venv.run("ruff", "format", "--check", ".", cwd=path)
    service_venv.run("mypy", "--cache-dir", service_venv.mypy_cache, cwd=path)
    service_venv.run(
        "loom", "graph", f"{PACKAGE}.flow:flow", "--readme", "README.md", "--check", cwd=path
    )
    contract = service_venv.run("loom", "env", f"{PACKAGE}.flow:flow", cwd=path)
    assert "LOOM_STATE__DIR" in contract
    output = service_venv.run(
        "python", "-m", "pytest", "-p", "no:cacheprovider", cwd=path, timeout=600
    )
    # Flow, README diagram, service process (crash and restart included),
    # deployment files: every test ran and passed, none skipped.
    [summary] = re.findall(r"^=+ (.*) in [0-9.]+s\b.*=+$", output, re.M)
    assert re.fullmatch(r"\d+ passed", summary), output
    for name in ("test_flow.py", "test_service.py", "test_deployment.py", "test_readme.py"):
        assert (path / "tests" / name).exists(), name
