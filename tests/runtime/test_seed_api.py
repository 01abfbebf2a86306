"""The public surface of loom.streaming.bytewax.runner matches the seed document.

The seed (tests/spec/streaming-runner-api.txt, a copy of the API document the
kit implements) is parsed, and every class, method and function it lists is
compared by parameter names, kinds and defaults, so any drift fails CI.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from loom.streaming.bytewax import runner
from loom.structs import LoomFrozenStruct

SEED = Path(__file__).parent.parent / "spec" / "streaming-runner-api.txt"
MODULE = "loom.streaming.bytewax.runner"

_CLASS = re.compile(rf"^class {re.escape(MODULE)}\.(\w+)\((.*)\)\[source\]$")
_METHOD = re.compile(r"^(classmethod )?(\w+)\((.*)\)\[source\]$")
_SUMMARY = re.compile(r"^(\w+)\((.*)\)$")


def _split(params: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in params:
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += char in "([{"
        depth -= char in ")]}"
        current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _parse(params: str) -> list[tuple[str, str, Any]]:
    """(name, kind, default) triples; default is inspect.Parameter.empty if none."""
    result: list[tuple[str, str, Any]] = []
    keyword_only = False
    for part in _split(params):
        if part == "*":
            keyword_only = True
            continue
        if part.startswith("**"):
            result.append((part[2:], "VAR_KEYWORD", inspect.Parameter.empty))
            continue
        if part.startswith("*"):
            result.append((part[1:], "VAR_POSITIONAL", inspect.Parameter.empty))
            keyword_only = True
            continue
        name, _, default = part.partition("=")
        value = ast.literal_eval(default) if default else inspect.Parameter.empty
        kind = "KEYWORD_ONLY" if keyword_only else "POSITIONAL_OR_KEYWORD"
        result.append((name.strip(), kind, value))
    return result


def _actual(obj: Any, *, drop_first: bool = False) -> list[tuple[str, str, Any]]:
    params = list(inspect.signature(obj).parameters.values())
    if drop_first:
        params = params[1:]
    return [(p.name, p.kind.name, p.default) for p in params]


def _seed_entries() -> tuple[dict[str, str], dict[tuple[str, str], tuple[bool, str]], list[str]]:
    classes: dict[str, str] = {}
    methods: dict[tuple[str, str], tuple[bool, str]] = {}
    summaries: list[str] = []
    current: str | None = None
    for raw in SEED.read_text().splitlines():
        line = raw.strip()
        if match := _CLASS.match(line):
            current = match.group(1)
            classes[current] = match.group(2)
        elif (match := _METHOD.match(line)) and current:
            methods[(current, match.group(2))] = (bool(match.group(1)), match.group(3))
        elif (match := _SUMMARY.match(line)) and current is None:
            summaries.append(line)
    return classes, methods, summaries


CLASSES, METHODS, SUMMARIES = _seed_entries()


def test_seed_document_was_parsed() -> None:
    assert set(CLASSES) == {
        "BytewaxRecoverySettings",
        "BytewaxRuntimeConfig",
        "ErrorSink",
        "StreamingRunner",
    }
    assert len(METHODS) == 8
    assert any(line.startswith("_prepare_run(") for line in SUMMARIES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_class_signature_matches_seed(name: str) -> None:
    assert _actual(getattr(runner, name)) == _parse(CLASSES[name])


@pytest.mark.parametrize(("owner", "method"), sorted(METHODS))
def test_method_signature_matches_seed(owner: str, method: str) -> None:
    is_classmethod, params = METHODS[(owner, method)]
    cls = getattr(runner, owner)
    raw = inspect.getattr_static(cls, method)
    assert isinstance(raw, classmethod) == is_classmethod
    assert _actual(getattr(cls, method), drop_first=not is_classmethod) == _parse(params)


@pytest.mark.parametrize("line", SUMMARIES)
def test_listed_function_or_class_exists_with_leading_parameters(line: str) -> None:
    match = _SUMMARY.match(line)
    assert match
    name, params = match.groups()
    required = [p for p in _parse(params.split("[")[0].rstrip(", ")) if p[0]]
    actual = _actual(getattr(runner, name))
    assert actual[: len(required)] == [(n, k, d) for n, k, d in required]
    if params.startswith("*") or ", *" in params:
        tail = [kind for _, kind, _ in actual[len(required) :]]
        assert all(kind == "KEYWORD_ONLY" for kind in tail)


def test_settings_structs_are_frozen_loom_structs() -> None:
    for cls in (runner.BytewaxRuntimeConfig, runner.BytewaxRecoverySettings):
        assert issubclass(cls, LoomFrozenStruct)
        instance = cls("dir") if cls is runner.BytewaxRecoverySettings else cls()
        with pytest.raises(AttributeError):
            instance.db_dir = "x"  # type: ignore[misc, union-attr]
