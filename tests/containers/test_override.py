"""docker-compose.test.yml, checked without an engine: the test stack is the
user's stack (official images) changed only where host networking and a
network-less build need it, and the images only when asked to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.template.support import compose_binary, render, run, snapshot_template_repo

SERVICE = "orders-enricher"
LOOPBACK_NAMES = {"kafka", "jaeger", SERVICE}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("override")
    return render(snapshot_template_repo(root / "loom", "v0.0.0"), root / SERVICE, {})


def config(service: Path, *files: str, **variables: str) -> dict[str, Any]:
    arguments: list[str | Path] = [compose_binary()]
    for name in files:
        arguments += ["-f", name]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(service), **variables}
    done = run([*arguments, "config", "--format", "json"], cwd=service, env=env)
    services: dict[str, Any] = json.loads(done.stdout)["services"]
    return services


def test_the_override_changes_only_networking_and_the_build_network(service: Path) -> None:
    user = config(service, "docker-compose.yml")
    test = config(service, "docker-compose.yml", "docker-compose.test.yml")
    # Grafana (no stand-in image) runs in the test stack only with its profile.
    assert set(test) == set(user) - {"grafana"}
    test.update(
        config(service, "docker-compose.yml", "docker-compose.test.yml", COMPOSE_PROFILES="grafana")
    )
    for name, original in user.items():
        after = dict(test[name])
        after.pop("profiles", None)
        assert after.pop("network_mode") == "host", name
        hosts = after.pop("extra_hosts")
        names = {"prometheus"} if name == "grafana" else LOOPBACK_NAMES
        assert {entry.split("=")[0] for entry in hosts} == names, name
        assert all(entry.endswith("=127.0.0.1") for entry in hosts), hosts
        assert "ports" not in after, f"{name}: host networking publishes no ports"
        before = {key: value for key, value in original.items() if key not in ("ports", "networks")}
        after.pop("networks", None)
        if name == SERVICE:
            assert after["build"].pop("network") == "none"  # offline: wheels/ only
        if name == "kafka":
            listeners = after["environment"].pop("KAFKA_LISTENERS")
            assert all("://127.0.0.1:" in item for item in listeners.split(","))
            before["environment"].pop("KAFKA_LISTENERS")
        assert after == before, f"{name} differs beyond networking"


def test_the_override_keeps_the_official_images_unless_told_otherwise(service: Path) -> None:
    user = config(service, "docker-compose.yml")
    test = config(service, "docker-compose.yml", "docker-compose.test.yml")
    for name in ("kafka", "topics", "jaeger", "prometheus"):
        assert test[name]["image"] == user[name]["image"]
    swapped = config(
        service,
        "docker-compose.yml",
        "docker-compose.test.yml",
        KAFKA_IMAGE="local/kafka",
        JAEGER_IMAGE="local/jaeger",
        PROMETHEUS_IMAGE="local/prometheus",
    )
    assert {
        name: swapped[name]["image"] for name in ("kafka", "topics", "jaeger", "prometheus")
    } == {
        "kafka": "local/kafka",
        "topics": "local/kafka",
        "jaeger": "local/jaeger",
        "prometheus": "local/prometheus",
    }


def test_the_override_is_small_and_documented(service: Path) -> None:
    lines = (service / "docker-compose.test.yml").read_text(encoding="utf-8").splitlines()
    settings = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert len(settings) <= 40, "keep the override small: it is what differs from the user's stack"
    readme = (service / "README.md").read_text(encoding="utf-8")
    assert "docker-compose.test.yml" in readme
