"""README.md's Python examples are code that type-checks and works as described.

Every ``python`` block of the README starts with a comment naming the file it
belongs to (``# src/orders_pricing/flow.py``); together they form a small
project that is type-checked with ``mypy --strict``, compiled and run.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loom.streaming import FlowValidationError, StreamFlow, compile_flow
from loom.streaming.plan import TopicSinkPlan

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
TOPICS = {
    "input": "orders.v1",
    "output": "orders.priced.v1",
    "large-orders": "orders.large.v1",
    "dlq": "orders.dlq",
}


def blocks() -> dict[str, str]:
    """The README's python blocks by the path their first line names."""
    found: dict[str, str] = {}
    for block in BLOCK.findall(README.read_text(encoding="utf-8")):
        first = block.splitlines()[0]
        assert re.fullmatch(r"# [\w/]+\.py", first), f"a README block without a path: {first}"
        found[first[2:]] = block
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    for path, code in blocks().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code, encoding="utf-8")
    for package in (root / "src").iterdir():
        (package / "__init__.py").touch()
    return root


def test_the_readme_examples_cover_flow_routing_windows_service_and_tests() -> None:
    assert set(blocks()) == {
        "src/orders_pricing/flow.py",
        "src/orders_pricing/routing.py",
        "src/orders_pricing/totals.py",
        "src/orders_pricing/__main__.py",
        "tests/test_flow.py",
    }


def test_the_readme_examples_pass_mypy_strict(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(project / ".mypy"), "."],
        cwd=project,
        env={**os.environ, "MYPYPATH": str(project / "src")},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def readme_flows(project: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, StreamFlow]:
    monkeypatch.syspath_prepend(str(project / "src"))
    flows = {
        "flow": importlib.import_module("orders_pricing.flow").flow,
        "routed": importlib.import_module("orders_pricing.routing").routed,
        "totals": importlib.import_module("orders_pricing.totals").totals,
    }
    for name in [name for name in sys.modules if name.startswith("orders_pricing")]:
        monkeypatch.delitem(sys.modules, name)
    return flows


@pytest.mark.parametrize("name", ["flow", "routed", "totals"])
def test_compile_flow_takes_the_config_as_a_plain_dict(
    readme_flows: dict[str, StreamFlow], name: str
) -> None:
    plan = compile_flow(readme_flows[name], {"topics": TOPICS})
    assert plan.source.binding.physical == "orders.v1"
    assert {
        terminal.binding.physical
        for terminal in plan.error_routes.values()
        if isinstance(terminal, TopicSinkPlan)
    } == {"orders.dlq"}


def test_compile_flow_checks_a_plain_dict_config_like_a_config_context(
    readme_flows: dict[str, StreamFlow],
) -> None:
    with pytest.raises(FlowValidationError, match="'large-orders' is not bound"):
        compile_flow(readme_flows["routed"], {"topics": {"input": "orders.v1"}})


def test_the_readme_test_example_passes(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "tests/test_flow.py"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
