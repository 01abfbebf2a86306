"""Session fixtures of the template tests.

Everything expensive happens once per session: the template snapshot (a git
repo tagged like a release), the wheelhouse (loom-runtime's wheel and the
build backend, as a private index or an offline Docker build would serve
them) and one virtual environment that every generated service is installed
into in turn (the heavy dependencies stay; loom-runtime and the service are
reinstalled each time from the source the service declares).
"""

from __future__ import annotations

import re
import sys
import venv
from pathlib import Path

import pytest

from tests.template.support import (
    REPO,
    ServiceVenv,
    run,
    runtime_version,
    snapshot_template_repo,
)


@pytest.fixture(scope="session")
def release_tag() -> str:
    return f"v{runtime_version()}"


@pytest.fixture(scope="session")
def template_repo(tmp_path_factory: pytest.TempPathFactory, release_tag: str) -> Path:
    """The working tree's template, committed and tagged as the current release."""
    return snapshot_template_repo(tmp_path_factory.mktemp("kit") / "loom", release_tag)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, template_repo: Path) -> Path:
    """loom-runtime's wheel and the build backend: enough to install offline."""
    wheels = tmp_path_factory.mktemp("wheelhouse")
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "--wheel-dir", wheels, template_repo / "runtime_lib"])
    # The build backend, also for editable installs (hatchling asks for editables then).
    run([*pip, "download", "--dest", wheels, "hatchling>=1.26,<2", "editables~=0.3"])
    return wheels


def template_dev_pins() -> list[str]:
    """The generated services' development tools, as the template pins them."""
    text = (REPO / "template/pyproject.toml.jinja").read_text(encoding="utf-8")
    block = re.search(r"^dev = \[(.*?)^\]", text, re.S | re.M)
    assert block, "no dev extra in template/pyproject.toml.jinja"
    pins = re.findall(r'"([^"]+)"', block.group(1))
    return [pin for pin in pins if not pin.startswith("loom-runtime")]


@pytest.fixture(scope="session")
def service_venv(tmp_path_factory: pytest.TempPathFactory, template_repo: Path) -> ServiceVenv:
    """A venv holding the runtime's dependencies and the services' dev tools."""
    root = tmp_path_factory.mktemp("service-venv")
    venv.create(root / "venv", with_pip=True)
    environment = ServiceVenv(root / "venv", root / "mypy-cache")
    runtime = template_repo / "runtime_lib"
    environment.pip("install", "--quiet", "--upgrade", "pip>=25.1")  # as the README says
    environment.pip("install", "--quiet", f"{runtime}[dev,uvloop,trio]", *template_dev_pins())
    environment.pip("uninstall", "--yes", "loom-runtime")
    return environment
