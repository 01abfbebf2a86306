"""One source of truth for topics: a generated service's own tests fail when
its flow declares a logical topic that a deployment file does not bind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.template.support import render, run

SERVICE = "orders-audit"
ADDED_TOPIC = """

# Added by the kit test: WIRE errors get a topic of their own.
from loom.streaming import ErrorKind  # noqa: E402

flow = StreamFlow(
    flow.name,
    source=flow.source,
    process=flow.process,
    output=flow.output,
    errors={
        kind: IntoTopic("quarantine" if kind is ErrorKind.WIRE else "dlq") for kind in ErrorKind
    },
)
"""
BINDINGS = {
    ".env.example": ("LOOM_TOPICS__DLQ=", "LOOM_TOPICS__QUARANTINE={prefix}.quarantine\n"),
    "docker-compose.yml": (
        "      LOOM_TOPICS__DLQ:",
        "      LOOM_TOPICS__QUARANTINE: {prefix}.quarantine\n",
    ),
    "k8s/configmap.yaml": (
        "  LOOM_TOPICS__DLQ:",
        "  LOOM_TOPICS__QUARANTINE: {prefix}.quarantine\n",
    ),
}


@pytest.fixture
def service(template_repo: Path, tmp_path: Path) -> Path:
    """A rendered service whose flow gained the logical topic ``quarantine``."""
    destination = render(
        template_repo,
        tmp_path / SERVICE,
        {"service_name": SERVICE, "loom_runtime_source": "path"},
    )
    flow_py = destination / "src/orders_audit/flow.py"
    flow_py.write_text(flow_py.read_text(encoding="utf-8") + ADDED_TOPIC, encoding="utf-8")
    return destination


def deployment_tests(service: Path, *, check: bool) -> str:
    """The service's own deployment tests, run with the kit's runtime."""
    env = {**os.environ, "PYTHONPATH": str(service / "src")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    done = run([*command, "tests/test_deployment.py"], cwd=service, env=env, check=check)
    return done.stdout + done.stderr


def bind_everywhere(service: Path) -> None:
    for name, (after, line) in BINDINGS.items():
        path = service / name
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        [index] = [i for i, text in enumerate(lines) if text.startswith(after)]
        lines.insert(index + 1, line.format(prefix=SERVICE))
        path.write_text("".join(lines), encoding="utf-8")


def test_a_new_logical_topic_fails_the_deployment_tests_naming_each_file(service: Path) -> None:
    output = deployment_tests(service, check=False)
    for name in (".env.example", "docker-compose.yml", "k8s"):
        assert f"{name}: LOOM_TOPICS__QUARANTINE is not set" in output, output


def test_binding_the_new_topic_in_every_deployment_file_passes_them_again(
    service: Path,
) -> None:
    bind_everywhere(service)
    deployment_tests(service, check=True)
