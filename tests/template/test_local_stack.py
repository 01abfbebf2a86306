"""The repository's docker-compose.yml: Kafka (KRaft), observability and a demo
service built from a freshly generated service, validated without a Docker
engine (the real compose parser, the compose schema, hadolint)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.template.support import REPO, compose_binary, render, run, tool


def stack() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return compose


def demo_dockerfile() -> str:
    """The demo's inline Dockerfile as Docker receives it ($$ is compose's escape)."""
    text: str = stack()["services"]["demo"]["build"]["dockerfile_inline"]
    return text.replace("$$", "$")


def runtime_stage(dockerfile: str) -> str:
    start = dockerfile.index("FROM ${BASE_IMAGE} AS runtime")
    return dockerfile[start:].strip()


def test_the_stack_is_valid_compose() -> None:
    run([compose_binary(), "config", "--quiet"], cwd=REPO)
    run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=REPO,
    )


def test_the_stack_has_kafka_observability_and_the_demo() -> None:
    services = stack()["services"]
    assert set(services) == {"kafka", "topics", "demo", "demo-traffic", "jaeger", "prometheus"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    demo = services["demo"]
    environment = demo["environment"]
    assert "LOOM_KAFKA__CONSUMER" not in environment  # at-least-once is the default
    assert demo["depends_on"]["topics"] == {"condition": "service_completed_successfully"}
    assert environment["LOOM_TOPICS__INPUT"] in services["demo-traffic"]["command"][0]
    for topic in ("LOOM_TOPICS__INPUT", "LOOM_TOPICS__OUTPUT", "LOOM_TOPICS__DLQ"):
        assert environment[topic] in services["topics"]["command"][0]
    scrape = yaml.safe_load(stack()["configs"]["prometheus"]["content"])
    port = environment["LOOM_OBSERVABILITY__PROMETHEUS_PORT"]
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"demo:{port}"]


def test_the_demo_image_is_built_from_a_generated_service(
    template_repo: Path, tmp_path: Path
) -> None:
    dockerfile = demo_dockerfile()
    render_step = re.search(r"copier copy --trust --defaults (.*?) /kit /build", dockerfile)
    assert render_step, "the demo is generated with copier copy"
    data = dict(re.findall(r"--data (\w+)=(\S+)", render_step.group(1)))
    generated = render(template_repo, tmp_path / "demo", data)
    # The runtime stage is the generated one, verbatim: the demo runs as a team's would.
    assert runtime_stage(dockerfile) == runtime_stage((generated / "Dockerfile").read_text())
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base
    assert f"ARG BASE_IMAGE={base.group(1)}" in (generated / "Dockerfile").read_text()
    kit_copier = re.search(r'"copier==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert kit_copier
    assert f"copier=={kit_copier.group(1)}" in dockerfile


def test_the_demo_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(demo_dockerfile(), encoding="utf-8")
    run([tool("hadolint"), "--failure-threshold", "info", "Dockerfile"], cwd=tmp_path)


def test_the_stack_and_the_template_pin_the_same_images() -> None:
    config = yaml.safe_load((REPO / "copier.yml").read_text(encoding="utf-8"))
    services = stack()["services"]
    assert services["kafka"]["image"] == config["kafka_image"]["default"]
    assert services["jaeger"]["image"] == config["jaeger_image"]["default"]
    assert services["prometheus"]["image"] == config["prometheus_image"]["default"]
