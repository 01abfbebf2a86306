"""The generated README's "Develop and test" block, run as a new team runs it.

A service rendered with copier's defaults, on a machine that reaches only the
public package index: the block, taken from the rendered README.md and run
with bash as written, makes its own virtual environment, upgrades pip,
installs every dependency from requirements-dev.lock.txt in pip's
hash-checking mode (loom-runtime as the committed wheel), then the service
itself, and runs the service's tests, lint and type checks. Nothing is installed
beforehand and no pip settings are added, so the test fails when loom-runtime
cannot be installed from what the service commits (the public index has no
loom-runtime). It downloads the service's dependencies (about two minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from tests.template.support import bundled_wheel, render, run, runtime_version


def develop_and_test_block(readme: str) -> str:
    """The first bash block of the README's "Develop and test" section."""
    section = re.search(r"^## Develop and test\n(.*?)^## ", readme, re.S | re.M)
    assert section, "no 'Develop and test' section in the README"
    block = re.search(r"^```bash\n(.*?)^```$", section.group(1), re.S | re.M)
    assert block, "no bash block in the README's 'Develop and test' section"
    return block.group(1)


def user_environment() -> dict[str, str]:
    """This environment without what the kit's venv and pytest add to it.

    Nothing is added: the block must work with the user's own settings.
    """
    kit_bin = Path(sys.prefix, "bin").resolve()
    path = [
        entry for entry in os.environ["PATH"].split(os.pathsep) if Path(entry).resolve() != kit_bin
    ]
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LOOM_", "OTEL_", "PYTHON", "VIRTUAL_ENV", "PYTEST_"))
    }
    env["PATH"] = os.pathsep.join(path)
    return env


def test_the_readme_develop_and_test_block_installs_and_passes_on_a_new_service(
    template_repo: Path, tmp_path: Path
) -> None:
    # The user's command: copier copy --trust --defaults --data service_name=payments-screening
    service = render(
        template_repo, tmp_path / "payments-screening", {"service_name": "payments-screening"}
    )
    block = develop_and_test_block((service / "README.md").read_text(encoding="utf-8"))
    assert "pip install --require-hashes -r requirements-dev.lock.txt" in block
    assert "pip install --no-deps -e ." in block

    done = run(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        cwd=service,
        env=user_environment(),
        timeout=900,
    )

    # The service's whole suite ran (integration test on the dev broker included).
    assert re.search(r"^=+ \d+ passed in ", done.stdout, re.M), done.stdout
    assert not re.search(r"\d+ (failed|skipped|error)", done.stdout), done.stdout
    assert "Success: no issues found" in done.stdout  # mypy, the block's last command
    # loom-runtime is the committed wheel, checked by its hash, not an index's package.
    wheel = service / "wheels" / bundled_wheel(runtime_version())
    script = (
        "import importlib.metadata as m; "
        "print(m.distribution('loom-runtime').read_text('direct_url.json'))"
    )
    origin = json.loads(run([service / ".venv/bin/python", "-c", script], cwd=service).stdout)
    assert origin["url"].endswith(f"/wheels/{wheel.name}")
    assert origin["archive_info"]["hashes"] == {
        "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()
    }
