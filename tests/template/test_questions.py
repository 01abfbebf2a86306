"""copier.yml: the question contract (docs/template.md, Questions), validators, settings."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.version import Version

from tests.template.support import REPO, run, runtime_version

QUESTIONS = (
    "service_name",
    "package_name",
    "team",
    "description",
    "input_topic",
    "output_topic",
    "dlq_topic",
    "python_version",
    "loom_runtime_version",
    "loom_runtime_source",
    "include_k8s",
)


def copier_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO / "copier.yml").read_text(encoding="utf-8"))
    return config


def test_the_contract_questions_exist_with_their_names() -> None:
    config = copier_config()
    assert set(QUESTIONS) <= set(config)
    assert config["_subdirectory"] == "template"
    assert config["_answers_file"] == ".copier-answers.yml"
    assert Version(config["_min_copier_version"]) >= Version("9.5")  # _copier_operation
    assert config["python_version"]["choices"] == ["3.11", "3.12"]
    source = config["loom_runtime_source"]
    assert set(source["choices"].values()) == {"bundled", "index", "git", "path"}
    # No default lets a public-index package named loom-runtime stand in for ours.
    assert source["default"] == "bundled"
    assert config["loom_runtime_index_url"]["default"] == ""  # refused: must be given
    assert config["include_k8s"]["type"] == "bool"


def test_tasks_and_migrations_are_ready() -> None:
    """git init on copy only; the runtime wheel task on copy and update alike, then
    the locks (bundled only), resolved by the uv the services' dev extra pins."""
    config = copier_config()
    git_init, runtime_wheel, locks = config["_tasks"]
    assert git_init["when"] == "{{ _copier_operation == 'copy' }}"
    assert "git" in git_init["command"][2]
    assert "when" not in runtime_wheel
    assert runtime_wheel["command"][3:] == [
        "{{ loom_runtime_source }}",
        "{{ _copier_conf.src_path }}/runtime_lib",
        "{{ runtime_wheel }}",
        "{{ runtime_build_backend }}",
    ]
    assert locks["when"] == "{{ loom_runtime_source == 'bundled' }}"
    assert locks["command"][3:] == [
        "{{ lock_tool }}",
        "{{ python_version }}",
        "{{ runtime_wheel }}",
    ]
    tool = config["lock_tool"]["default"]
    assert re.fullmatch(r"uv==[0-9.]+", tool)
    pyproject = (REPO / "template/pyproject.toml.jinja").read_text(encoding="utf-8")
    assert f'"{tool}",' in pyproject
    assert config["_migrations"] == []
    text = (REPO / "copier.yml").read_text(encoding="utf-8")
    assert "#   - version: v0.2.0" in text, "the commented example of a first migration"


def test_the_runtime_build_backend_is_pinned_by_hash() -> None:
    """Each requirement exact and hashed: the same backend gives the same wheel bytes."""
    backend = copier_config()["runtime_build_backend"]["default"].splitlines()
    assert backend[0].startswith("hatchling==")
    for line in backend:
        assert re.fullmatch(r"[a-z-]+==[0-9.]+( ; [^-]+)? --hash=sha256:[0-9a-f]{64}", line), line


def test_the_template_runtime_version_is_read_from_the_runtime_package() -> None:
    """One source of truth: copier.yml reads runtime_lib/src/loom/__init__.py."""
    default = copier_config()["template_runtime_version"]["default"]
    assert "runtime_lib/src/loom/__init__.py" in default
    assert copier_config()["loom_runtime_version"]["default"] == "{{ template_runtime_version }}"


def pretend_copy(template_repo: Path, tmp_path: Path, **data: str) -> tuple[int, str]:
    args = [sys.executable, "-m", "copier", "copy", "--trust", "--defaults", "--pretend"]
    for key, value in data.items():
        args += ["--data", f"{key}={value}"]
    done = run([*args, template_repo, tmp_path / "service"], check=False, timeout=120)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"service_name": "Orders_Enricher"}, "service_name must be kebab-case"),
        ({"service_name": "orders--enricher"}, "service_name must be kebab-case"),
        ({"service_name": "9orders"}, "service_name must be kebab-case"),
        ({"service_name": "a" * 41}, "service_name must have 3 to 40 characters"),
        ({"package_name": "orders-enricher"}, "package_name must be a snake_case"),
        ({"package_name": "loom"}, "would shadow another package"),
        ({"team": "Payments Team"}, "team must be lowercase"),
        ({"input_topic": "orders input"}, "is not a valid Kafka topic name"),
        ({"output_topic": "x" * 250}, "is not a valid Kafka topic name"),
        ({"dlq_topic": ".."}, "is not a valid Kafka topic name"),
        ({"output_topic": "orders-enricher.input"}, "output_topic must differ from input_topic"),
        ({"dlq_topic": "orders-enricher.output"}, "dlq_topic must differ"),
        ({"loom_runtime_version": "latest"}, "must be a release version X.Y.Z"),
        ({"loom_runtime_version": "0.0.1"}, "is older than"),
        ({"python_version": "3.10"}, "Invalid choice for 'python_version'"),
        (
            {"loom_runtime_version": "99.0.0"},
            "loom_runtime_source=bundled builds loom-runtime",
        ),
        (
            {"loom_runtime_source": "index"},
            "loom_runtime_source=index needs loom_runtime_index_url",
        ),
        (
            {"loom_runtime_source": "index", "loom_runtime_index_url": "https://pypi.org/simple"},
            "loom_runtime_index_url must be a private index",
        ),
        (
            {
                "loom_runtime_source": "index",
                "loom_runtime_index_url": "https://files.pythonhosted.org/simple",
            },
            "loom_runtime_index_url must be a private index",
        ),
        (
            {"loom_runtime_source": "git", "loom_runtime_git_url": "github.com/acme/loom"},
            "loom_runtime_git_url must be an https://",
        ),
        (
            {"loom_runtime_source": "path", "loom_runtime_path": "runtime_lib"},
            "loom_runtime_path must be an absolute path",
        ),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else None,
)
def test_invalid_answers_are_refused_with_a_clear_message(
    template_repo: Path, tmp_path: Path, data: dict[str, str], message: str
) -> None:
    code, output = pretend_copy(
        template_repo, tmp_path, **{"service_name": "orders-enricher", **data}
    )
    assert code != 0
    assert message in output, output
    assert not (tmp_path / "service").exists()


def test_valid_answers_are_accepted(template_repo: Path, tmp_path: Path) -> None:
    code, output = pretend_copy(
        template_repo,
        tmp_path,
        service_name="eu-orders-2",
        team="team.payments_eu",
        input_topic="EU_orders.v2",
        loom_runtime_version=runtime_version(),
    )
    assert code == 0, output
    # A newer runtime than the template's, from a private index.
    code, output = pretend_copy(
        template_repo,
        tmp_path,
        service_name="eu-orders-2",
        loom_runtime_version="99.0.0",
        loom_runtime_source="index",
        loom_runtime_index_url="https://pypi.internal.example/simple",
    )
    assert code == 0, output
